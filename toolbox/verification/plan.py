"""Before a long job: every input a recipe needs, whether it is here, and the command that makes it if not.

`python scripts/verify.py plan --config_path <recipe>` prints one line per input (model folders, VAE, umT5 and
tokenizer, the ODE LMDB or the prompt file, the export of the stage a recipe starts from: ode_init, the causal
teacher, the causal ode_init); a missing one FAILs with the command that makes it. Nothing is loaded: it reads
the recipe and looks at the disk.
"""
from __future__ import annotations

import functools
from pathlib import Path

from model.registry import objective_class
from utils.config import Config, load_config

Check = tuple[str, "bool | None", str]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROMPTS_HINT = ("a text file of prompts, one per line: the published recipe trained on the VidProM-derived list "
                "vidprom_filtered_extended.txt (from the Self-Forcing authors' release; VidProM is CC BY-NC 4.0), "
                "or any prompts of your own")


# Where each shipped training stage writes its export (the --logdir of README's commands), and so where the
# recipes of the following stages read it: <logdir>/latest/generator.safetensors.
STAGE_LOGDIRS = {
    "configs/ode.yaml": "checkpoints/ode_init_1.3B",
    "configs/ode_5B.yaml": "checkpoints/ode_init_5B",
    "configs/ode_a14b.yaml": "checkpoints/ode_init_a14b",
    "configs/causal_teacher.yaml": "checkpoints/causal_teacher_1.3B",
    "configs/causal_teacher_5B.yaml": "checkpoints/causal_teacher_5B",
    "configs/ode_causal.yaml": "checkpoints/ode_init_causal_1.3B",
    "configs/ode_causal_5B.yaml": "checkpoints/ode_init_causal_5B",
    "configs/ode_ti2v_5B.yaml": "checkpoints/ode_init_ti2v_5B",
    "configs/ode_both_5B.yaml": "checkpoints/ode_init_both_5B",
    "configs/self_forcing_dmd.yaml": "logs/dmd_1.3B",
    "configs/self_forcing_dmd_5B.yaml": "logs/dmd_5B",
}


# Stage recipes whose LMDB packs the pairs other recipes make (one student for both tasks).
PACKED_PAIRS = {"configs/ode_both_5B.yaml": ("configs/ode_5B.yaml", "configs/ode_ti2v_5B.yaml")}


def _packed_recipe(config_path: str) -> str | None:
    return next((recipe for recipe in PACKED_PAIRS if str(config_path).endswith(recipe)), None)


def _stage_recipe_for(checkpoint: str) -> tuple[str, str] | None:
    """The shipped stage recipe whose `--logdir <folder>` export is `checkpoint` (<folder>/latest/generator*.safetensors)."""
    path = Path(checkpoint)
    if path.parent.name != "latest":
        return None
    logdir = str(path.parent.parent)
    for recipe, stage_logdir in STAGE_LOGDIRS.items():
        if logdir.endswith(stage_logdir):
            return recipe, logdir
    return None


@functools.lru_cache(maxsize=None)
def _shipped(recipe: str) -> Config:
    """A shipped stage recipe, loaded once per process."""
    return load_config(CONFIGS.parent / recipe)


def _pairs_recipe_for(data_path: str, config_path: str) -> str:
    """The recipe that samples the pairs of `data_path`: the shipped ODE recipe training on them (its ode settings
    make pairs at its student's steps), else this one."""
    for recipe in STAGE_LOGDIRS:
        config = _shipped(recipe)
        if objective_class(config).reads_point_timesteps and config.train.data_path == data_path:
            return recipe
    return config_path


def _text_pairs_for(config: Config) -> str:
    """The folder of text-to-video pairs that first frames come from: the shipped t2v ODE recipe of the same model."""
    for recipe in STAGE_LOGDIRS:
        other = _shipped(recipe)
        if other.video.task == "t2v" and other.generator.preset == config.generator.preset \
                and objective_class(other).reads_point_timesteps and not other.ode.causal_teacher:  # fmt: skip
            return str(Path(other.train.data_path).with_suffix(""))
    return "<text-to-video pairs>"


def _first_frames_make(config: Config, config_path: str) -> str:
    return (f"make them from the teacher's text-to-video pairs: python scripts/first_frames.py --config_path {config_path} "
            f"--data_path {_text_pairs_for(config)} --output_folder {config.train.image_root}")


def _exists(name: str, path: str | None, what: str, make: str) -> Check:
    if not path:
        return name, None, f"not set: {what} is not used by this recipe"
    if Path(path).exists():
        return name, True, f"{path}"
    return name, False, f"{path} is missing: {make}"


def check_plan(config: Config, config_path: str) -> list[Check]:
    checks: list[Check] = []
    download = "download the official folder (or its -Diffusers twin) into it; see README, Weights"
    needs = objective_class(config)
    roles = {"generator": config.generator}
    if needs.uses_teacher or needs.data == "ode_pairs" and needs.reads_point_timesteps:
        roles["real_score"] = config.real_score  # runs in training, or samples this stage's pairs
    if needs.has_critic:
        roles["critic"] = config.critic
    pairs_stage = needs.data == "ode_pairs"
    for role, ref in roles.items():
        make = download
        found = _stage_recipe_for(ref.checkpoint) if ref.checkpoint else None
        if found:
            recipe, logdir = found
            make = f"train that stage first: torchrun --nproc_per_node 8 train.py --config_path {recipe} --logdir {logdir}"
        checks.append(_exists(f"{role}.checkpoint", ref.checkpoint, f"a {role} checkpoint", make))
    if config.model_folder:
        checks.append(_exists("model_folder", config.model_folder, "a model folder", download))
    checks.append(_exists("vae.checkpoint", config.vae.checkpoint, "a VAE file", download))
    checks.append(_exists("text_encoder.checkpoint", config.text_encoder.checkpoint, "an umT5 file", download))
    checks.append(_exists("text_encoder.tokenizer", config.text_encoder.tokenizer, "a tokenizer folder", download))
    data = config.train.data_path
    image_to_video = config.video.task == "ti2v"
    if image_to_video:
        checks.append(_exists("train.image_root (first frames)", config.train.image_root, "a folder of first frames",
                              _first_frames_make(config, config_path)))
    if pairs_stage:
        pairs = str(Path(data).with_suffix("")) if data else "data/ode_pairs"
        sampler = _pairs_recipe_for(data, config_path) if data else config_path
        captions = f"{config.train.image_root}/captions.tsv" if image_to_video else "<prompts.txt>"
        make = (f"make the pairs, then pack them: torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --config_path "
                f"{sampler} --caption_path {captions} --output_folder {pairs} && python scripts/create_lmdb.py "
                f"--data_path {pairs} --lmdb_path {data}")
        packed = _packed_recipe(config_path)
        if packed:
            folders = " ".join(str(Path(_shipped(r).train.data_path).with_suffix("")) for r in PACKED_PAIRS[packed])
            make = (f"pack the two tasks' pairs (each made as `verify.py plan` on {' and '.join(PACKED_PAIRS[packed])} "
                    f"says): python scripts/create_lmdb.py --data_path {folders} --lmdb_path {data}")
        checks.append(_exists("train.data_path (ODE LMDB)", data, "an ODE LMDB", make))
    elif image_to_video:
        checks.append(_exists("train.data_path (prompts)", data, "an image<TAB>prompt list",
                              _first_frames_make(config, config_path)))
    else:
        checks.append(_exists("train.data_path (prompts)", data, "a prompt file", f"put {PROMPTS_HINT} there"))
    return checks
