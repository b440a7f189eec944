"""How much memory one rank needs for a recipe, before launching it: the real training step on fake tensors.

The recipe's models are built as training builds them (build_models: LoRA, activation checkpointing, FSDP2 over
the launch's mesh, sequence parallelism), on a FakeTensorMode with a fake process group of the launch's world
size, so nothing is allocated and no weights are read. One generator step and one critic step of the recipe's
objective run (rollout, scores, loss, backward, clipping, AdamW step) under PyTorch's MemTracker, which follows
every tensor's storage and reports the peak by category. The same code with real tensors under torchrun measures
a run (`fake=False`), which is how the estimate is checked.

Persistent per-rank memory (parameters, optimizer states, EMA) is read exactly from each model's local shards;
gradients and everything transient (activations, gathered FSDP weights, the KV cache, temporaries) come from the
tracker's snapshot at the peak. Text encoder and VAE weights sit beside the step on the device (unless moved to
the CPU) and are added.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from model.objective import Batch, Models, frozen
from model.registry import build_objective, objective_class, random_batch
from trainer.parallel import build_data_parallel, build_mesh
from trainer.setup import ModelSet, accumulation_steps, build_models
from utils.config import Config
from utils.dist import DistInfo
from utils.errors import UserError
from utils.geometry import ResolvedRecipe, resolve_recipe
from utils.memory import MemoryProfiler
from utils.presets import load_text_encoder_preset
from utils.tables import human_bytes

GIB = 1024**3
CPU = torch.device("cpu")


@dataclass
class MemoryReport:
    """Per-rank bytes: rows (component, bytes, note), the peak, and what the launch was."""

    world_size: int
    nproc_per_node: int
    sp_size: int
    rows: list[tuple[str, int, str]] = field(default_factory=list)
    peak_bytes: int = 0  # tracked step peak + weights beside it on the device
    step_peak_bytes: int = 0  # the tracker's peak alone (the figure compared with a measured run)
    phase_peaks: dict[str, int] = field(default_factory=dict)

    def fits(self, gpu_memory_gb: float, reserve_fraction: float) -> bool:
        return self.peak_bytes <= gpu_memory_gb * GIB * (1.0 - reserve_fraction)


# ---- pieces ---------------------------------------------------------------------------------------


def step_tracker():
    """PyTorch's MemTracker keeping device totals only. Its per-module statistics are switched off: the rollout
    calls the DiT through entries other than `forward`, many times per step, which they do not support."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepMemTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            return None

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            return None

        def _pre_bw_hook(self, module, args) -> None:
            return None

        def _post_bw_hook(self, module, args) -> None:
            return None

        def reset_peak(self) -> None:
            """Start a new phase: the peak becomes what is allocated now."""
            self._peak_mem = {dev: snap["Total"] for dev, snap in self._curr_mem_snap.items()}

    return StepMemTracker()


def local_bytes(tensors) -> int:
    """Bytes this rank holds for the tensors (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _parameters(model: Optional[nn.Module], trainable: Optional[bool] = None) -> list[torch.Tensor]:
    if model is None:
        return []
    return [p for p in model.parameters() if trainable is None or p.requires_grad == trainable]


def without_weights(recipe: ResolvedRecipe) -> ResolvedRecipe:
    """The recipe's models at their architectures, with no checkpoint to read (random init on fake tensors)."""
    strip = {name: dataclasses.replace(getattr(recipe, name), checkpoint=None)
             for name in ("generator", "real_score", "critic") if getattr(recipe, name) is not None}
    return dataclasses.replace(recipe, **strip)


def init_adam_states(optimizer: Optional[torch.optim.Optimizer]) -> None:
    """AdamW's states as after its first step (they exist through every later step's peak)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def text_encoder_bytes(config: Config) -> int:
    """The text encoder's weights in the dtype training builds it in (counted on the meta device)."""
    from pipeline.components import text_encoder_dtype
    from wan.text_encoder import WanTextEncoder

    preset = load_text_encoder_preset(config.text_encoder.preset)
    encoder = WanTextEncoder.from_preset(preset, device="meta")
    dtype = text_encoder_dtype(config)
    return sum(p.numel() for p in encoder.model.parameters()) * torch.empty((), dtype=dtype).element_size()


def vae_bytes(recipe: ResolvedRecipe) -> int:
    from pipeline.components import build_vae

    with torch.device("meta"):
        vae = build_vae(recipe.vae, device="meta")
    return sum(p.numel() * p.element_size() for p in vae.parameters())


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch: Batch,
             grad_clip: float, freeze: Optional[nn.Module], autocast) -> None:
    """The loop's optimizer step for one micro-batch: loss, backward, clipping, AdamW (no logging)."""
    optimizer.zero_grad(set_to_none=True)
    with frozen(freeze) if freeze is not None else contextlib.nullcontext():
        with autocast():
            loss, _ = loss_fn(batch)
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- the estimate ---------------------------------------------------------------------------------


def measure_step(config: Config, info: DistInfo, *, fake: bool) -> MemoryReport:
    """Build the recipe's models for `info`'s mesh and run one generator and one critic step under MemTracker.

    fake=True: inside a FakeTensorMode (the caller set up a fake process group of info.world_size ranks).
    fake=False: real tensors (a measured run, under torchrun or alone)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recipe = without_weights(resolve_recipe(config, check_weights=False))
    accumulation_steps(config, info.world_size)
    data_parallel = build_data_parallel(info, config.parallel.sp_size, config.train.sharding_strategy)
    mesh = build_mesh(info, config.train.sharding_strategy)  # device meshes are built outside the fake mode
    objective = build_objective(config, recipe.geometry)
    if getattr(objective, "long_rollout_factor", 1) > 1:  # long tuning: the longest rollout it may draw
        objective.fixed_rollout_frames = objective.longest_rollout_frames
    device = info.device
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    single_bf16 = config.train.mixed_precision and info.world_size == 1

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if single_bf16 else contextlib.nullcontext()

    torch.manual_seed(config.train.seed)  # the same exit steps and draws every time: a reproducible estimate
    with mode:
        models: ModelSet = build_models(config, recipe, device, mesh, data_parallel.sequence,
                                        MemoryProfiler(False, device))
        init_adam_states(models.generator_optimizer)
        init_adam_states(models.critic_optimizer)
        batch = random_batch(config, recipe.geometry, config.train.batch_size, device)
        nets = Models(generator=models.generator, real_score=models.real_score, critic=models.critic)
        tracker = step_tracker()
        externals = [m for m in (models.generator, models.critic, models.real_score) if m is not None]
        externals += [o for o in (models.generator_optimizer, models.critic_optimizer) if o is not None]
        if models.ema is not None:
            externals += list(models.ema.shadow.values())
        tracker.track_external(*externals)
        phase_peaks: dict[str, int] = {}
        grad_clip = config.optim.grad_clip
        with tracker:
            one_step(models.generator, models.generator_optimizer,
                     lambda b: objective.generator_loss(nets, b), batch, grad_clip, models.critic, autocast)
            phase_peaks["generator step"] = _peak_total(tracker)
            if models.critic is not None:
                tracker.reset_peak()
                one_step(models.critic, models.critic_optimizer,
                         lambda b: objective.critic_loss(nets, b), batch, grad_clip, None, autocast)
                phase_peaks["critic step"] = _peak_total(tracker)

    return _report(config, info, recipe, models, phase_peaks)


def _peak_total(tracker) -> int:
    return max(tracker._peak_mem.values(), default=0)


def _report(config: Config, info: DistInfo, recipe: ResolvedRecipe, models: ModelSet,
            phase_peaks: dict[str, int]) -> MemoryReport:
    sp = config.parallel.sp_size
    report = MemoryReport(world_size=info.world_size, nproc_per_node=info.local_world_size, sp_size=sp,
                          phase_peaks=phase_peaks)
    hybrid = config.train.sharding_strategy == "hybrid_full" and info.num_nodes > 1
    shard_ranks = info.local_world_size if hybrid else info.world_size
    shard_note = "fp32, whole" if info.world_size == 1 else f"fp32, 1/{shard_ranks} per rank (FSDP2" + (
        f" within a node, replicated over {info.num_nodes} nodes)" if hybrid else ")")
    persistent = 0

    def add(name: str, nbytes: int, note: str, counts: bool = True) -> None:
        nonlocal persistent
        report.rows.append((name, nbytes, note))
        persistent += nbytes if counts else 0

    lora = f"LoRA rank {config.train.lora_rank}: adapters only" if config.train.lora_rank else ""
    for role, model, optimizer in (("generator", models.generator, models.generator_optimizer),
                                   ("critic", models.critic, models.critic_optimizer)):
        if model is None:
            continue
        add(f"{role} parameters", local_bytes(_parameters(model)), shard_note)
        states = [s for state in optimizer.state.values() for k, s in state.items() if k != "step"]
        add(f"{role} optimizer states", local_bytes(states), "AdamW exp_avg + exp_avg_sq" + (f"; {lora}" if lora else ""))
    if models.ema is not None:
        add("generator EMA", local_bytes(models.ema.shadow.values()), "fp32 shadow of the trained parameters")
    if models.real_score is not None:
        where = "on the CPU (train.real_score_cpu): not counted" if config.train.real_score_cpu else shard_note
        add("frozen teacher (real score)", local_bytes(_parameters(models.real_score)), where,
            counts=not config.train.real_score_cpu)
    step_peak = max(phase_peaks.values())
    # What the step allocates beyond the persistent state: gradients, activations, gathered weights, the KV cache.
    trained = [m for m in (models.generator, models.critic) if m is not None]
    gradients = max(local_bytes(_parameters(m, trainable=True)) for m in trained)
    g = recipe.geometry
    kv_note = ""
    if objective_class(config).rolls_out:
        heads = g.num_heads // sp
        itemsize, kind = (2, "bf16") if config.train.mixed_precision else (4, "fp32")
        kv_bytes = 2 * g.num_layers * config.train.batch_size * g.cache_frames * g.frame_seq_length * heads * g.head_dim
        kv_note = f"; KV cache {human_bytes(kv_bytes * itemsize)} ({kind}, {heads} of {g.num_heads} heads)"
    report.rows.append(("step working memory at the peak", step_peak - persistent,
                        f"gradients (up to {human_bytes(gradients)}), activations, gathered FSDP weights" + kv_note))
    report.step_peak_bytes = step_peak
    # 5. Weights beside the step on the device.
    beside = 0
    on_device = config.text_encoder.device != "cpu"
    encoder = text_encoder_bytes(config)
    report.rows.append(("text encoder", encoder, "on the device" if on_device else "on the CPU: not counted"))
    beside += encoder if on_device else 0
    if config.video.task == "ti2v" and objective_class(config).encodes_first_frames:
        vae = vae_bytes(recipe)
        report.rows.append(("VAE (TI2V first frames)", vae, "fp32, on the device"))
        beside += vae
    report.peak_bytes = step_peak + beside
    return report


def fake_process_group(world_size: int) -> None:
    """A process group of `world_size` ranks in which this process is rank 0 and collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())


def estimate(config: Config, nnodes: int, nproc_per_node: int) -> MemoryReport:
    """Rank 0's memory for a launch of nnodes x nproc_per_node ranks, on fake tensors, on this CPU."""
    if nnodes < 1 or nproc_per_node < 1:
        raise UserError(f"--nnodes {nnodes} --nproc_per_node {nproc_per_node}: expected positive numbers of nodes and ranks")
    world = nnodes * nproc_per_node
    fake_process_group(world)
    try:
        info = DistInfo(rank=0, world_size=world, local_rank=0, local_world_size=nproc_per_node, device=CPU)
        return measure_step(config, info, fake=True)
    finally:
        dist.destroy_process_group()
