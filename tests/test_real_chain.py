"""README's real-scale chain, command by command, on tiny replicas of the published folders.

From a fresh working folder holding only wan_models/<the downloaded folders> and a prompt file, the commands
run as README writes them (the shipped recipes, their paths) with size overrides only (video size, the tiny
replica's presets, step counts): ODE pairs -> LMDB -> ode_init -> DMD -> inference; each step's output is the
next step's default input, and `verify.py plan` names what is missing and how to make it. The causal and
image-to-video chains continue from the bidirectional pairs of README step 1-2 (made once per model in this module).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures.published import official_folder
from tests.helpers import REPO_ROOT, run_script

CHAINS = {
    "5B": dict(folders=("Wan2.2-TI2V-5B",), ode="configs/ode_5B.yaml", dmd="configs/self_forcing_dmd_5B.yaml",
               causal_teacher="configs/causal_teacher_5B.yaml", ode_causal="configs/ode_causal_5B.yaml",
               dmd_causal="configs/self_forcing_dmd_causal_5B.yaml", dmd_longlive="configs/self_forcing_dmd_longlive_5B.yaml",
               long_tuning="configs/long_tuning_5B.yaml",
               pairs="data/ode_pairs_5B", video=["video.height=64", "video.width=96", "video.image_or_video_shape=[1,3,48,4,6]"],
               vae="tiny-wan2.2"),
    "1.3B": dict(folders=("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B"), ode="configs/ode.yaml", dmd="configs/self_forcing_dmd.yaml",
                 causal_teacher="configs/causal_teacher.yaml", ode_causal="configs/ode_causal.yaml",
                 dmd_causal="configs/self_forcing_dmd_causal.yaml", dmd_longlive="configs/self_forcing_dmd_longlive.yaml",
                 long_tuning="configs/long_tuning.yaml", pairs="data/ode_pairs_1.3B", video=["video.height=32", "video.width=48",
                                                     "video.image_or_video_shape=[1,3,16,4,6]"], vae="tiny-wan2.1"),
    "a14b": dict(folders=("Wan2.1-T2V-1.3B", "Wan2.2-T2V-A14B"), ode="configs/ode_a14b.yaml",
                 dmd="configs/self_forcing_dmd_a14b.yaml", pairs="data/ode_pairs_a14b",
                 video=["video.height=32", "video.width=48", "video.image_or_video_shape=[1,3,16,4,6]"], vae="tiny-wan2.1"),
}
CAUSAL_CHAINS = [name for name, chain in CHAINS.items() if "causal_teacher" in chain]


def _sizes(chain: dict) -> list[str]:
    """Only sizes: the video, the tiny replica's architecture (read from its config.json: no preset), step counts."""
    return [*chain["video"], "video.num_frames=9", "generator.preset=null", "real_score.preset=null",
            "critic.preset=null", f"vae.preset={chain['vae']}", "ode.num_steps=4", "ode.keep_indices=[0,1,2,3,-1]",
            "teacher.num_steps=2", "train.max_steps=1", "train.save_iters=1", "train.log_iters=1",
            "train.total_batch_size=null", "train.mixed_precision=false", "train.ema_start_step=0"]


def _run(cwd: Path, *args: str):
    script = str(Path(REPO_ROOT) / args[0])
    proc = run_script([script, *args[1:]], cwd=str(cwd))
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _moe_sizes(work: Path, chain: dict) -> list[str]:
    """The official A14B folder names no boundary (its preset does): a tiny MoE preset of the replica's shape."""
    if "Wan2.2-T2V-A14B" not in chain["folders"]:
        return []
    from utils.presets import read_checkpoint_config

    arch = read_checkpoint_config(work / "wan_models" / "Wan2.2-T2V-A14B" / "high_noise_model")
    preset = work / "tiny-a14b.yaml"
    preset.write_text(json.dumps({**arch, "vae": "tiny-wan2.1", "moe": {"boundary": 0.875}}))
    return [f"real_score.preset={preset}"]


def _fresh_folder(tmp_path: Path, chain: dict) -> Path:
    """A working folder holding only the downloaded folders and the prompt files."""
    work = tmp_path / "work"
    for folder in chain["folders"]:
        official_folder(work / "wan_models" / folder, folder)
    (work / "prompts").mkdir()
    prompts = "a red cat moving left\na blue dog on the background\n"
    (work / "prompts" / "my_prompts.txt").write_text(prompts)
    (work / "prompts" / "vidprom_filtered_extended.txt").write_text(prompts)
    return work


class MadePairs:
    """README steps 1-2 (bidirectional pairs and their LMDB) made once per chain in this module: the first test that
    needs them makes them in its own folder; later ones copy them into theirs."""

    def __init__(self) -> None:
        self.folders: dict[str, Path] = {}

    def make(self, work: Path, name: str, sizes: list[str], lmdb: bool = True) -> None:
        chain = CHAINS[name]
        if name in self.folders:
            source = self.folders[name] / chain["pairs"]
            shutil.copytree(source, work / chain["pairs"])
            if lmdb:  # one file (and its lock file) beside the pairs folder
                for made in source.parent.glob(f"{source.name}.lmdb*"):
                    shutil.copy2(made, work / chain["pairs"].rsplit("/", 1)[0] / made.name)
            return
        _run(work, "scripts/generate_ode_pairs.py", "--config_path", str(Path(REPO_ROOT) / chain["ode"]), "--caption_path",
             "prompts/my_prompts.txt", "--output_folder", chain["pairs"], *sizes)
        _run(work, "scripts/create_lmdb.py", "--data_path", chain["pairs"], "--lmdb_path", f"{chain['pairs']}.lmdb")
        self.folders[name] = work


@pytest.fixture(scope="module")
def made_pairs() -> MadePairs:
    return MadePairs()


def _plan(work: Path, recipe: str) -> dict:
    proc = run_script([str(Path(REPO_ROOT) / "scripts/verify.py"), "plan", "--config_path", recipe, "--json"], cwd=str(work))
    return {item["check"]: item for item in json.loads(proc.stdout)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAINS))
def test_readme_chain_runs_on_the_downloaded_folders(tmp_path, name, made_pairs):
    chain = CHAINS[name]
    work = _fresh_folder(tmp_path, chain)
    recipe = lambda key: str(Path(REPO_ROOT) / chain[key])  # noqa: E731
    sizes = _sizes(chain) + _moe_sizes(work, chain)

    # 0. plan: the folders are there; the LMDB is not, and the line says how to make it.
    proc = run_script([str(Path(REPO_ROOT) / "scripts/verify.py"), "plan", "--config_path", recipe("ode"), "--json"],
                      cwd=str(work))
    plan = {item["check"]: item for item in json.loads(proc.stdout)}
    assert proc.returncode == 1 and plan["generator.checkpoint"]["result"] == "PASS"
    assert plan["train.data_path (ODE LMDB)"]["result"] == "FAIL"
    assert "generate_ode_pairs.py" in plan["train.data_path (ODE LMDB)"]["detail"]

    # 1-3. ODE pairs -> LMDB -> ode_init, at README's paths.
    made_pairs.folders.pop(name, None)  # this chain makes its own pairs, from its fresh folder
    made_pairs.make(work, name, sizes)
    logdir = f"checkpoints/ode_init_{name}"
    _run(work, "train.py", "--config_path", recipe("ode"), "--logdir", logdir, "--disable-wandb", *sizes)
    assert (work / logdir / "latest" / "generator.safetensors").is_file()

    # 4. DMD: its generator is the ode_init export by default; plan now finds every input.
    proc = run_script([str(Path(REPO_ROOT) / "scripts/verify.py"), "plan", "--config_path", recipe("dmd")], cwd=str(work))
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout
    _run(work, "train.py", "--config_path", recipe("dmd"), "--logdir", f"logs/dmd_{name}", "--disable-wandb", *sizes)

    # 5. Inference with the DMD export.
    _run(work, "inference.py", "--config_path", recipe("dmd"), "--checkpoint", f"logs/dmd_{name}/latest", "--use_ema",
         "--prompt", "a red cat moving left", "--output_folder", "videos", *sizes)
    assert len(list((work / "videos").glob("*/video.mp4"))) == 1
    # 6. Long tuning from the DMD export (its EMA weights), at README's paths.
    if "long_tuning" in chain:
        log = _run(work, "train.py", "--config_path", recipe("long_tuning"), "--logdir", f"logs/long_tuning_{name}",
                   "--disable-wandb", *sizes)
        metrics = (work / f"logs/long_tuning_{name}" / "metrics.jsonl").read_text()
        assert "rollout_frames" in metrics and "prompt_switched" in metrics, log.stdout[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("name", CAUSAL_CHAINS)
def test_causal_chain_runs_on_the_downloaded_folders(tmp_path, name, made_pairs):
    """README's causal chain: bidirectional pairs -> causal teacher -> causal pairs -> causal ode_init -> DMD, and the
    LongLive form (DMD from the causal teacher), every recipe reading where the stage before it wrote."""
    chain = CHAINS[name]
    work = _fresh_folder(tmp_path, chain)
    recipe = lambda key: str(Path(REPO_ROOT) / chain[key])  # noqa: E731
    sizes = _sizes(chain) + _moe_sizes(work, chain)
    causal_pairs = chain["pairs"].replace("ode_pairs_", "ode_pairs_causal_")

    # 1. The bidirectional pairs the causal teacher trains on; plan names the recipe that makes them.
    item = _plan(work, recipe("causal_teacher"))["train.data_path (ODE LMDB)"]
    assert item["result"] == "FAIL" and f"--config_path {chain['ode']}" in item["detail"]
    made_pairs.make(work, name, sizes)
    # 2. The causal teacher by teacher forcing; plan for the next stage points at it until it exists.
    item = _plan(work, recipe("ode_causal"))["real_score.checkpoint"]
    assert item["result"] == "FAIL" and f"--config_path {chain['causal_teacher']}" in item["detail"]
    _run(work, "train.py", "--config_path", recipe("causal_teacher"), "--logdir", f"checkpoints/causal_teacher_{name}",
         "--disable-wandb", *sizes)
    # 3. Causal pairs from it, block by block; 4. causal ODE init from its weights, against clean context.
    _run(work, "scripts/generate_ode_pairs.py", "--config_path", recipe("ode_causal"), "--caption_path",
         "prompts/my_prompts.txt", "--output_folder", causal_pairs, *sizes)
    _run(work, "scripts/create_lmdb.py", "--data_path", causal_pairs, "--lmdb_path", f"{causal_pairs}.lmdb")
    plan = _plan(work, recipe("ode_causal"))
    assert all(item["result"] != "FAIL" for item in plan.values()), plan
    _run(work, "train.py", "--config_path", recipe("ode_causal"), "--logdir", f"checkpoints/ode_init_causal_{name}",
         "--disable-wandb", *sizes)
    # 5. DMD from the causal ODE init, and the LongLive form from the causal teacher.
    for key, logdir in (("dmd_causal", f"logs/dmd_causal_{name}"), ("dmd_longlive", f"logs/dmd_longlive_{name}")):
        plan = _plan(work, recipe(key))
        assert all(item["result"] != "FAIL" for item in plan.values()), plan
        _run(work, "train.py", "--config_path", recipe(key), "--logdir", logdir, "--disable-wandb", *sizes)
        assert (work / logdir / "latest" / "generator_ema.safetensors").is_file()


@pytest.mark.slow
def test_image_to_video_chain_runs_on_the_downloaded_folders(tmp_path, made_pairs):
    """README's image-to-video chain for the 5B: text-to-video pairs -> their first frames (the teacher's own images)
    -> image-conditioned pairs -> ode_init -> DMD -> a video from an image; plan names each missing input. Then the
    student of both tasks from both kinds of pairs, packed."""
    chain = CHAINS["5B"]
    work = _fresh_folder(tmp_path, chain)
    ode, dmd = str(Path(REPO_ROOT) / "configs/ode_ti2v_5B.yaml"), str(Path(REPO_ROOT) / "configs/self_forcing_dmd_ti2v_5B.yaml")
    sizes = _sizes(chain)

    # 1. The text-to-video pairs (README step 1), then their first frames.
    made_pairs.make(work, "5B", sizes, lmdb=False)
    item = _plan(work, ode)["train.image_root (first frames)"]
    assert item["result"] == "FAIL" and "scripts/first_frames.py" in item["detail"] and chain["pairs"] in item["detail"]
    _run(work, "scripts/first_frames.py", "--config_path", ode, "--data_path", chain["pairs"], "--output_folder",
         "data/first_frames_5B", *sizes)
    lines = (work / "data/first_frames_5B/captions.tsv").read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["a red cat moving left", "a blue dog on the background"]
    # 2. Image-conditioned pairs from those images, packed; 3. ode_init; 4. DMD; each recipe reads the one before.
    item = _plan(work, ode)["train.data_path (ODE LMDB)"]
    assert item["result"] == "FAIL" and "data/first_frames_5B/captions.tsv" in item["detail"]
    _run(work, "scripts/generate_ode_pairs.py", "--config_path", ode, "--caption_path", "data/first_frames_5B/captions.tsv",
         "--output_folder", "data/ode_pairs_ti2v_5B", *sizes)
    _run(work, "scripts/create_lmdb.py", "--data_path", "data/ode_pairs_ti2v_5B", "--lmdb_path", "data/ode_pairs_ti2v_5B.lmdb")
    _run(work, "train.py", "--config_path", ode, "--logdir", "checkpoints/ode_init_ti2v_5B", "--disable-wandb", *sizes)
    plan = _plan(work, dmd)
    assert all(item["result"] != "FAIL" for item in plan.values()), plan
    _run(work, "train.py", "--config_path", dmd, "--logdir", "logs/dmd_ti2v_5B", "--disable-wandb", *sizes)
    # 5. A video from an image; the student refuses to start without one.
    _run(work, "inference.py", "--config_path", dmd, "--checkpoint", "logs/dmd_ti2v_5B/latest", "--use_ema", "--image",
         "data/first_frames_5B/000000.png", "--prompt", "a red cat moving left", "--output_folder", "videos", *sizes)
    assert len(list((work / "videos").glob("*/video.mp4"))) == 1
    proc = run_script([str(Path(REPO_ROOT) / "inference.py"), "--config_path", dmd, "--checkpoint", "logs/dmd_ti2v_5B/latest",
                       "--prompt", "a red cat moving left", *sizes], cwd=str(work))
    assert proc.returncode == 2 and "--image" in proc.stderr
    # One student for both tasks: both kinds of pairs packed into one LMDB, ODE init, DMD with half the rollouts
    # given their image; its videos start from an image or from text alone.
    both_ode, both_dmd = (str(Path(REPO_ROOT) / f"configs/{name}_both_5B.yaml") for name in ("ode", "self_forcing_dmd"))
    item = _plan(work, both_ode)["train.data_path (ODE LMDB)"]
    assert item["result"] == "FAIL" and "--data_path data/ode_pairs_5B data/ode_pairs_ti2v_5B" in item["detail"]
    _run(work, "scripts/create_lmdb.py", "--data_path", "data/ode_pairs_5B", "data/ode_pairs_ti2v_5B", "--lmdb_path",
         "data/ode_pairs_both_5B.lmdb")
    _run(work, "train.py", "--config_path", both_ode, "--logdir", "checkpoints/ode_init_both_5B", "--disable-wandb", *sizes)
    assert all(item["result"] != "FAIL" for item in _plan(work, both_dmd).values())
    _run(work, "train.py", "--config_path", both_dmd, "--logdir", "logs/dmd_both_5B", "--disable-wandb", *sizes)
    for image in (["--image", "data/first_frames_5B/000000.png"], []):
        _run(work, "inference.py", "--config_path", both_dmd, "--checkpoint", "logs/dmd_both_5B/latest", "--use_ema",
             *image, "--prompt", "a red cat moving left", "--output_folder", "videos_both", *sizes)
    records = [json.loads(p.read_text()) for p in (work / "videos_both").glob("*/inference_record.json")]
    assert sorted(r["task"] for r in records) == ["t2v", "ti2v"]
