"""The typed configuration schema: every default lives here, once, with a one-line doc.

A recipe (YAML under configs/) changes a few fields; `key=value` overrides on the command line change
more. Unknown keys and wrong types are errors. `load_config` returns a validated `Config`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING kept for recipes that want required fields)
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from utils.errors import UserError
from utils.registry import JUDGES

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


# --------------------------------------------------------------------------------------------- models
@dataclass
class ModelRef:
    """One DiT: a geometry preset, a checkpoint (folder or file) whose config.json gives the geometry, or both."""

    preset: Optional[str] = None  # name of configs/models/<preset>.yaml (geometry without weights)
    checkpoint: Optional[str] = None  # weights folder or file; a folder's config.json gives the geometry


@dataclass
class VaeRef:
    """The VAE: a preset (configs/vae/<preset>.yaml) and optionally its weights."""

    preset: Optional[str] = None  # empty: the generator preset's VAE
    checkpoint: Optional[str] = None  # Wan2.1_VAE.pth / Wan2.2_VAE.pth / a diffusers vae/ folder; empty: random (tiny only)
    tiling: bool = False  # spatial tiling in decode, for memory


@dataclass
class TextEncoderRef:
    """The text encoder: umT5-XXL from the official file, or a tiny preset."""

    preset: str = "umt5-xxl"  # configs/text_encoders/<preset>.yaml
    checkpoint: Optional[str] = None  # models_t5_umt5-xxl-enc-bf16.pth (or a tiny encoder's safetensors)
    tokenizer: Optional[str] = None  # local google/umt5-xxl folder (umt5-xxl only)
    device: str = "auto"  # where it runs: auto (the training/inference device), cpu or cuda
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT  # the unconditional prompt for CFG


# --------------------------------------------------------------------------------------------- video
@dataclass
class VideoConfig:
    """What is generated: pixel size and frame count; the latent shape is derived from these and the VAE."""

    height: int = 480  # pixels
    width: int = 832  # pixels
    num_frames: int = 81  # pixel frames; latent frames = (num_frames - 1) / vae temporal stride + 1
    num_frame_per_block: int = 3  # latent frames denoised together in the causal rollout
    fps: int = 16  # frames per second of written videos
    task: str = "t2v"  # t2v, or ti2v (first frame given as an image)
    image_or_video_shape: Optional[List[int]] = None  # upstream's [B,F,C,H,W]; if given it must match the derived shape


# --------------------------------------------------------------------------------------------- flow
@dataclass
class FlowConfig:
    """Flow-matching constants shared by the student rollout and the score timesteps."""

    num_train_timesteps: int = 1000  # timestep = num_train_timesteps * sigma
    timestep_shift: float = 5.0  # shift applied to score timesteps and to the warped student step list


@dataclass
class SamplingConfig:
    """Bidirectional teacher sampling (teacher baselines and verification)."""

    sampler: str = "unipc"  # unipc (official, order 2, flow prediction) or euler
    num_steps: int = 50  # denoising steps
    shift: float = 5.0  # sigma shift of the sampling schedule
    guidance_scale: float = 5.0  # CFG scale (the low-noise expert's for a MoE teacher)
    guidance_scale_high_noise: Optional[float] = None  # MoE only: CFG scale of the high-noise expert
    guidance_form: str = "standard"  # standard: uncond + g*(cond-uncond); dmd: cond + g*(cond-uncond)
    cfg_truncation_steps: int = 0  # skip the unconditional pass in the last N steps
    cfg_truncation_high_noise_steps: int = 0  # MoE: skip it in the last N high-noise steps before the switch


@dataclass
class OdeConfig(SamplingConfig):
    """Teacher sampling for ODE pairs: 48 Euler steps, CFG 6 (Self-Forcing's and CausVid's published pairs).

    shift 5 (= flow.timestep_shift): the kept points 0, 12, 24, 36 then sit on the student's warped steps
    [1000, 937.5, 833.3, 625], as Causal Forcing samples them; train.ode_point_timesteps checks it. Self-Forcing's
    pairs used shift 8 and labelled the points with the student's list (train.ode_point_timesteps=student_steps).
    """

    sampler: str = "euler"
    num_steps: int = 48
    shift: float = 5.0
    guidance_scale: float = 6.0
    keep_indices: List[int] = field(default_factory=lambda: [0, 12, 24, 36, -1])  # trajectory points kept; -1 = clean
    # true: the official schedule of num_steps at shift gets the student's warped steps inserted, and the kept points
    # are the start, those steps and the clean end (keep_indices is not read): a teacher sampled with its own
    # schedule (the A14B: 40 steps at shift 12) still gives points exactly on the student's steps
    insert_student_steps: bool = False
    # false (published): the bidirectional teacher makes the pairs. true ("causal ODE init", the remedy reported
    # for seams at block boundaries): real_score is a causal teacher (train.trainer=teacher_forcing) sampled
    # block by block with KV caches (conditional and unconditional), each block with the full sampler and CFG
    causal_teacher: bool = False


@dataclass
class RolloutConfig:
    """The causal student's few-step, block-wise rollout (training and inference)."""

    denoising_step_list: List[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # student timesteps
    warp_denoising_step: bool = True  # map the list through the shifted schedule (flow.timestep_shift)
    context_noise: int = 0  # timestep of the context pass that writes a finished block into the KV cache
    local_attn_size: int = -1  # frames the KV cache holds; -1: all frames of the video (global attention)
    sink_size: int = 0  # frames at the start kept in a rolling cache (attention sink)
    same_step_across_blocks: bool = True  # one exit step for every block of a rollout
    last_step_only: bool = False  # always exit at the last step
    independent_first_frame: bool = False  # first block holds one frame (TI2V image), then blocks of num_frame_per_block


@dataclass
class InferenceConfig:
    """How the causal student runs at inference (inference.py, the benchmarks, a server)."""

    # torch.compile each transformer block (the cache bookkeeping and attention kernel stay eager, so one
    # compilation per block size serves every block and cache fill); empty: on for CUDA, off on a CPU
    compile: Optional[bool] = None
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead adds CUDA graphs for the steady state
    # full: the recipe's Wan VAE decoder; light: a TAEHV decoder (inference.light_decoder: taew2_1 for Wan2.1
    # latents, taew2_2 for the 5B), about 20x faster at slightly lower quality, as published streaming demos use
    decoder: str = "full"
    light_decoder: Optional[str] = None  # the TAEHV .pth / .safetensors file, with decoder: light
    # decode block k while block k+1 denoises (a second CUDA stream, or a thread on a CPU); the frames are the
    # same. Empty: on for CUDA, off on a CPU (two cores gain nothing from it)
    overlap_decode: Optional[bool] = None


# --------------------------------------------------------------------------------------------- training
@dataclass
class DistillConfig:
    """Score distillation (DMD or SiD) with the real (teacher) and fake (critic) scores."""

    distribution_loss: str = "dmd"  # dmd or sid
    guidance_scale: float = 3.0  # CFG of the real score
    guidance_form: str = "dmd"  # dmd: cond + g*(cond-uncond) (upstream); standard: uncond + g*(cond-uncond)
    min_score_timestep_ratio: float = 0.02  # score timesteps are clamped to [min, max] * num_train_timesteps
    max_score_timestep_ratio: float = 0.98
    # shift of the score and critic timesteps; None: flow.timestep_shift, as published (one shift for the step
    # list and the scores). An option for small latents, where a large shift leaves few low-noise draws.
    score_timestep_shift: Optional[float] = None
    sid_alpha: float = 1.0  # SiD's alpha
    dfake_gen_update_ratio: int = 5  # the generator steps every N-th iteration, the critic every iteration
    # Long tuning (LongLive's streaming long tuning), off at 1 (Self-Forcing trains on the training length). N > 1:
    # each sample rolls out to a length drawn in whole blocks from the training length to N times it, through the
    # rolling cache (rollout.local_attn_size, or the training length when -1; rollout.sink_size), and the teacher and
    # critic score only its last training-length window, the only frames with gradient: memory stays one window's.
    long_rollout_factor: int = 1
    # Long tuning's prompt switches (LongLive's interactive tuning), off at 0 (published Self-Forcing and long tuning
    # keep one prompt). A share of long rollouts (those longer than the training length) switch, at the block where
    # the scored window starts, to another prompt of the data, re-caching the held frames under it; the teacher and
    # critic score that window under the new prompt, so the student learns to follow a switch.
    prompt_switch_share: float = 0.0
    # Where a switch goes: None, another prompt of the data; or a file of `prompt<TAB>next prompt` lines (LongLive
    # trains on continuations written for each prompt: the scene goes on, the action changes), a row switching to
    # one of its own prompt's next prompts, drawn from the seed (every training prompt needs at least one).
    switch_prompts: Optional[str] = None


@dataclass
class OptimConfig:
    """AdamW for the generator and the critic."""

    lr: float = 2.0e-6  # generator learning rate
    lr_critic: float = 4.0e-7  # fake-score (critic) learning rate
    beta1: float = 0.0
    beta2: float = 0.999
    beta1_critic: float = 0.0
    beta2_critic: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0  # max grad norm, both models


@dataclass
class TrainConfig:
    """The loop: stage, batch, length, checkpoints, precision and memory options."""

    # ode (ODE regression -> ode_init), score_distillation (DMD/SiD), or teacher_forcing (the teacher turned causal
    # and tuned on clean context from the ODE LMDB's clean videos: the causal teacher of ode.causal_teacher)
    trainer: str = "score_distillation"
    seed: int = 0  # global seed (never "random")
    batch_size: int = 1  # per GPU, per micro-step
    # global batch; gradient accumulation = total / (batch_size * world); empty: no accumulation
    total_batch_size: Optional[int] = None
    max_steps: int = 600  # optimizer iterations, then the run stops
    log_iters: int = 50  # log every N iterations
    save_iters: int = 100  # checkpoint every N iterations (and at the end)
    keep_last: int = 3  # checkpoints kept
    ema_weight: float = 0.99  # generator EMA decay; 0 disables EMA
    ema_start_step: int = 200  # EMA starts at this iteration
    mixed_precision: bool = True  # bf16 compute through FSDP2's MixedPrecisionPolicy (fp32 master weights)
    gradient_checkpointing: bool = True  # activation checkpointing per transformer block
    sharding_strategy: str = "hybrid_full"  # full (shard across all ranks) or hybrid_full (shard within a node, replicate across)
    real_score_cpu: bool = False  # keep the frozen teacher on the CPU between uses
    lora_rank: int = 0  # LoRA rank for generator and critic; 0: full fine-tuning
    lora_alpha: float = 0.0  # LoRA alpha; 0: equal to the rank
    max_consecutive_nonfinite: int = 5  # stop after this many NaN/Inf steps in a row
    # ODE regression draws each block's point among ALL kept points, the clean one included (the published
    # Self-Forcing/CausVid method): a block at t = 0 has no loss and is clean context for later blocks, as the KV
    # cache holds at inference. false: noisy points only (every block gets a loss; not the published method)
    ode_clean_context: bool = True
    # Causal Forcing's ODE stage (pairs from a causal teacher): each sample regresses one block, at a noisy point,
    # against the clean point of every earlier block, so a block's context is never noisy (ode_clean_context unused)
    ode_teacher_forcing: bool = False
    # The timesteps ODE regression gives the kept noisy points. stored: the times the teacher sampled them at,
    # which must be the student's warped rollout.denoising_step_list (checked before any model is built, and
    # before pairs are generated): ODE init then practises exactly the steps the student rolls out at (Causal
    # Forcing, CausVid). student_steps: Self-Forcing's published ODE init, which labels the kept points with the
    # student's list whatever times they were sampled at (its pairs: shift 8, so 3 of 4 labels are off by up to
    # 100 timesteps); for reproducing it.
    ode_point_timesteps: str = "stored"
    data_path: Optional[str] = None  # ODE LMDB (trainer=ode, teacher_forcing) or a prompt file (score distillation)
    image_root: Optional[str] = None  # TI2V: folder of first-frame images named in the prompt file
    # TI2V from a prompt file: the share of samples given their first frame; the others are text-to-video, so one
    # student learns both tasks, as the base model does. 1: an image-to-video student only (LongLive's 5B trains the
    # two tasks as two students; that is the default). ODE pairs: the LMDB's rows decide instead (image-conditioned
    # and text-to-video pairs packed into one LMDB by create_lmdb.py).
    image_share: float = 1.0




@dataclass
class ParallelConfig:
    """Splitting one sample over several ranks (training, teacher sampling for ODE pairs, inference).

    Ulysses sequence parallelism: the `sp_size` ranks of a sequence group share one sample (prompt, noise, exit
    steps), each holding 1/sp_size of its tokens and, inside self-attention, all tokens of 1/sp_size of the heads
    (the KV cache too). sp_size divides the heads of every DiT in the recipe and the tokens of a latent frame; the
    data-parallel size is ranks / sp_size, so the global batch is batch_size x ranks / sp_size x accumulation."""

    sp_size: int = 1  # ranks per sample; 1: off (the published recipes)
    cfg_parallel: bool = False  # teacher sampling: the conditional and unconditional passes on two rank groups



@dataclass
class EvaluationConfig:
    """Evaluation during training: every `every` iterations the generator (its EMA weights once EMA has started)
    rolls out fixed prompts and seeds; the temporal report of the latents (seam ratio, flicker, drift), and the
    miniature judge's adherence when `judge` names a miniature world's judge, are logged with the losses and
    plotted. It draws from its own seeded generators, so a run with evaluation trains exactly like one without.
    0: off, as in the published recipes (they do not evaluate during training)."""

    every: int = 0
    prompts: Optional[str] = None  # prompt file; empty: the first num_prompts lines of train.data_path
    num_prompts: int = 4
    seed: int = 0  # prompt i uses seed + i
    judge: Optional[str] = None  # a registered judge (utils.registry.JUDGES): decode and score the clips with it


@dataclass
class LoggingConfig:
    """Console and JSONL always; wandb when enabled (its key comes from WANDB_API_KEY, never from here)."""

    wandb: bool = False
    wandb_project: str = "self-forcing"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "online"  # online or offline


@dataclass
class Config:
    """A whole recipe."""

    # a downloaded Wan folder (official or diffusers root): the VAE, text encoder and tokenizer inside it are
    # used unless vae.checkpoint / text_encoder.checkpoint / text_encoder.tokenizer are set (those win)
    model_folder: Optional[str] = None
    generator: ModelRef = field(default_factory=ModelRef)  # the causal student
    real_score: ModelRef = field(default_factory=ModelRef)  # the frozen bidirectional teacher
    critic: ModelRef = field(default_factory=ModelRef)  # the critic (DMD's "fake score"); empty: same as real_score
    vae: VaeRef = field(default_factory=VaeRef)
    text_encoder: TextEncoderRef = field(default_factory=TextEncoderRef)
    attention_backend: str = "sdpa"  # sdpa, flash (flash-attn 2/3) or flex (flex_attention for block-causal masks)
    video: VideoConfig = field(default_factory=VideoConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    teacher: SamplingConfig = field(default_factory=SamplingConfig)
    ode: OdeConfig = field(default_factory=OdeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------- choices
CHOICES = {
    "attention_backend": ("sdpa", "flash", "flex"),
    "video.task": ("t2v", "ti2v"),
    "teacher.sampler": ("unipc", "euler"),
    "teacher.guidance_form": ("standard", "dmd"),
    "ode.sampler": ("unipc", "euler"),
    "ode.guidance_form": ("standard", "dmd"),
    "distill.distribution_loss": ("dmd", "sid"),
    "distill.guidance_form": ("standard", "dmd"),
    "train.trainer": ("ode", "score_distillation", "teacher_forcing"),
    "train.sharding_strategy": ("full", "hybrid_full"),
    "train.ode_point_timesteps": ("stored", "student_steps"),
    "text_encoder.device": ("auto", "cpu", "cuda"),
    "logging.wandb_mode": ("online", "offline"),
    "inference.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "inference.decoder": ("full", "light"),
}


# --------------------------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise UserError(f"config file {path} is a folder: expected a YAML recipe file (e.g. configs/self_forcing_dmd_5B.yaml)")
    if not path.is_file():
        raise UserError(f"config file {path} not found: expected a YAML recipe")
    try:
        data = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry multi-line context; keep the first line and the position
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {str(err).splitlines()[0]}") from None
    if not OmegaConf.is_dict(data):
        raise UserError(f"config file {path} holds a {type(data).__name__.removesuffix('Config').lower() or 'value'} at "
                        "its top level: expected a mapping of settings (key: value)")
    return data


def _recipe_layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """A recipe may name a `base:` recipe (relative to itself) that it overrides."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"config file {path} includes itself through `base:`")
    data = _read_yaml(path)
    base = data.pop("base", None) if hasattr(data, "pop") else None
    layers = _recipe_layers((path.parent / str(base)), seen + (path,)) if base else []
    if hasattr(data, "keys") and ALIASES["fake_score"] in data.keys() and "fake_score" in data.keys():
        raise UserError(f"{path} sets both critic and fake_score (its older name): keep critic")
    if hasattr(data, "pop") and "fake_score" in data.keys():
        data["critic"] = data.pop("fake_score")
    return layers + [data]


ALIASES = {"fake_score": "critic"}  # older names of recipe sections, read as the new ones (recipes and overrides)


def _aliased(item: str) -> str:
    """A key=value override with an older section name renamed."""
    head, _, rest = item.partition(".")
    return f"{ALIASES[head]}.{rest}" if head in ALIASES and rest else item


def recipe_files(path: str | Path) -> list[Path]:
    """The recipe and the `base:` recipes it builds on, the deepest base first (what a run of it reads)."""
    path = Path(path).resolve()
    data = _read_yaml(path)
    base = data.get("base") if hasattr(data, "get") else None
    return (recipe_files(path.parent / str(base)) if base else []) + [path]


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        value = OmegaConf.select(node, str(key)) if OmegaConf.is_config(node) else None
        if OmegaConf.is_dict(value):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _explain(err: OmegaConfBaseException, source: str) -> UserError:
    full_key = getattr(err, "full_key", None) or "?"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError):
        schema_keys = _all_keys(OmegaConf.structured(Config))
        close = difflib.get_close_matches(full_key, schema_keys, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return UserError(
            f"unknown config key '{full_key}' in {source}{hint}: expected one of the schema's keys (utils/config.py)"
        )
    if isinstance(err, ValidationError):
        return UserError(f"config key '{full_key}' in {source} has a wrong type: {first_line}")
    return UserError(f"config error at '{full_key}' in {source}: {first_line}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge schema defaults, the recipe (with its bases) and `key=value` overrides; validate; return a Config."""
    merged = OmegaConf.structured(Config)
    OmegaConf.set_struct(merged, True)
    if path is not None:
        for layer in _recipe_layers(Path(path)):
            try:
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as err:
                raise _explain(err, str(path)) from None
    overrides = [_aliased(item) for item in overrides]
    for item in overrides:
        if "=" not in item:
            raise UserError(f"command-line override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _explain(err, "the command line") from None
    try:
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    validate_choices(config)
    return apply_model_folder(config)


def apply_model_folder(config: Config) -> Config:
    """Fill the VAE, text-encoder and tokenizer paths that the recipe leaves empty from `model_folder`."""
    if not config.model_folder:
        return config
    from dataclasses import replace

    from utils.folders import folder_components
    from utils.presets import load_model_preset, load_vae_preset

    vae_preset = config.vae.preset or (load_model_preset(config.generator.preset).get("vae") if config.generator.preset else None)
    if not vae_preset:
        raise UserError("model_folder needs the VAE's kind: set vae.preset (configs/vae/) or a generator preset")
    found = folder_components(config.model_folder, load_vae_preset(vae_preset)["kind"])
    text = config.text_encoder
    return replace(
        config,
        vae=replace(config.vae, checkpoint=config.vae.checkpoint or found.vae),
        text_encoder=replace(text, checkpoint=text.checkpoint or found.text_encoder, tokenizer=text.tokenizer or found.tokenizer),
    )


def validate_choices(config: Config) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(config), key)
        if value not in allowed:
            raise UserError(f"config key '{key}' is '{value}': expected one of {', '.join(allowed)}")
    _check_finite(OmegaConf.structured(config))
    checks = [
        ("train.max_steps", config.train.max_steps >= 1, "at least 1 iteration"),
        ("train.log_iters", config.train.log_iters >= 1, "at least 1"),
        ("optim.lr", config.optim.lr > 0, "a positive learning rate"),
        ("optim.lr_critic", config.optim.lr_critic > 0, "a positive learning rate"),
        ("optim.weight_decay", config.optim.weight_decay >= 0, "0 or more"),
        ("optim.grad_clip", config.optim.grad_clip > 0, "a positive gradient-norm limit"),
        ("distill.guidance_scale", config.distill.guidance_scale >= 0, "0 or more"),
        ("distill.score_timestep_shift", config.distill.score_timestep_shift is None or config.distill.score_timestep_shift > 0,
         "a positive shift, or null (flow.timestep_shift)"),
        ("teacher.num_steps", config.teacher.num_steps >= 1, "at least 1"),
        ("ode.num_steps", config.ode.num_steps >= 1, "at least 1"),
        ("video.num_frame_per_block", config.video.num_frame_per_block >= 1, "at least 1"),
        ("video.height", config.video.height > 0, "a positive number of pixels"),
        ("video.width", config.video.width > 0, "a positive number of pixels"),
        ("video.num_frames", config.video.num_frames >= 1, "at least 1"),
        ("video.fps", config.video.fps >= 1, "a positive frame rate"),
        ("optim.beta1", 0 <= config.optim.beta1 < 1, "AdamW's beta in [0, 1)"),
        ("optim.beta2", 0 <= config.optim.beta2 < 1, "AdamW's beta in [0, 1)"),
        ("optim.beta1_critic", 0 <= config.optim.beta1_critic < 1, "AdamW's beta in [0, 1)"),
        ("optim.beta2_critic", 0 <= config.optim.beta2_critic < 1, "AdamW's beta in [0, 1)"),
        ("train.max_consecutive_nonfinite", config.train.max_consecutive_nonfinite >= 1,
         "at least 1 (the non-finite steps in a row that stop a run)"),
        ("train.batch_size", config.train.batch_size >= 1, "at least 1"),
        ("train.save_iters", config.train.save_iters >= 1, "at least 1"),
        ("train.keep_last", config.train.keep_last >= 1, "at least 1"),
        ("distill.dfake_gen_update_ratio", config.distill.dfake_gen_update_ratio >= 1, "at least 1"),
        ("distill.long_rollout_factor", config.distill.long_rollout_factor >= 1,
         "1 (the training length, as published) or more (long tuning)"),
        ("distill.prompt_switch_share", 0 <= config.distill.prompt_switch_share <= 1, "a share in [0, 1]"),
        ("train.image_share", 0 < config.train.image_share <= 1, "a share in (0, 1]"),
        ("train.image_share", config.train.image_share == 1 or config.video.task == "ti2v",
         "1 unless video.task is ti2v (the share of samples given their first frame)"),
        ("distill.prompt_switch_share", config.distill.prompt_switch_share == 0 or config.distill.long_rollout_factor > 1,
         "0 unless distill.long_rollout_factor > 1 (a switch happens inside a long rollout)"),
        ("distill.switch_prompts", config.distill.switch_prompts is None or config.distill.prompt_switch_share > 0,
         "unset unless distill.prompt_switch_share > 0 (the prompts switches go to)"),
        ("rollout.denoising_step_list", len(config.rollout.denoising_step_list) >= 1, "at least one timestep"),
        ("rollout.sink_size", config.rollout.sink_size >= 0, "0 or more frames"),
        ("evaluation.every", config.evaluation.every >= 0, "0 (off) or a number of iterations"),
        ("evaluation.num_prompts", config.evaluation.num_prompts >= 1, "at least 1"),
        ("evaluation.seed", config.evaluation.seed >= 0, "0 or more"),
        ("evaluation.judge", config.evaluation.judge is None or config.evaluation.judge in JUDGES,
         f"empty or a registered judge ({', '.join(JUDGES.kinds())})"),
        ("inference.light_decoder", config.inference.decoder != "light" or bool(config.inference.light_decoder),
         "the TAEHV file (taew2_1 for Wan2.1 latents, taew2_2 for Wan2.2-TI2V-5B) when inference.decoder is light"),
    ]
    for key, ok, expected in checks:
        if not ok:
            value = OmegaConf.select(OmegaConf.structured(config), key)
            raise UserError(f"config key '{key}' is {value}: expected {expected}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float setting must be a number: NaN or Inf would train or sample silently wrong."""
    import math

    for key in node.keys():
        value = node[key]
        name = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            _check_finite(value, name + ".")
        elif OmegaConf.is_list(value):
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise UserError(f"config key '{name}' holds {list(value)}: expected finite numbers")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{name}' is {value}: expected a finite number")


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (saved beside checkpoints and outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def parse_cli(parser: Any, argv: Sequence[str] | None) -> tuple[Any, list[str]]:
    """argparse for an entry point whose extra arguments are `key=value` config overrides; others are an error."""
    known, rest = parser.parse_known_args(argv)
    overrides, unknown = split_cli(rest)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return known, overrides


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `key=value` overrides from ordinary arguments (for argparse's parse_known_args leftovers)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    rest = [a for a in argv if a not in overrides]
    return overrides, rest
