"""scripts/probe_continuation.py: its teacher and student rows measure what the quickstart and inference.py measure,
and bad input is one line with exit status 2."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_script

RECIPE = "configs/miniature/dmd.yaml"
# The shipped teacher's weights as a causal student: an official folder (config.json + weights), no training needed.
STUDENT = "checkpoints/miniature/teacher"


def test_rows_match_the_teacher_sampler_and_inference(tmp_path):
    from miniature.judge import eval_prompts
    from miniature.report import TeacherSampler
    from pipeline.causal_inference import CausalInferencePipeline
    from utils.config import load_config
    from utils.geometry import resolve_recipe
    from utils.temporal import temporal_report
    from wan.loading import recipe_for_checkpoint

    out = tmp_path / "probe.json"
    result = run_script(["scripts/probe_continuation.py", "--config_path", RECIPE, "--checkpoint", STUDENT,
                         "--num_prompts", "1", "--json_out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "teacher block 0 + student" in result.stdout
    figures = json.loads(out.read_text())
    config = recipe_for_checkpoint(load_config(RECIPE, []), STUDENT)
    resolved = resolve_recipe(config, need_scores=True)
    geometry = resolved.geometry
    for row in figures.values():
        assert len(row["seam_ratio_by_boundary"]) == geometry.num_blocks - 1
        assert row["seam_ratio"] == pytest.approx(sum(row["seam_ratio_by_boundary"]) / (geometry.num_blocks - 1))
        assert 0.0 <= row["adherence"] <= 1.0

    prompt, seed = eval_prompts()[0]
    teacher_video, _, _ = TeacherSampler(config, torch.device("cpu"))(prompt, seed)
    teacher = temporal_report(teacher_video, geometry.block_sizes, geometry.vae_stride[0])
    assert figures["teacher"]["seam_ratio_by_boundary"] == pytest.approx(teacher["seam_ratio_by_boundary"], rel=1e-3)
    pipe = CausalInferencePipeline(config, resolved, "cpu", torch.float32, checkpoint=STUDENT)
    student = pipe.generate(prompt, seed=seed).temporal
    assert figures["student"]["seam_ratio_by_boundary"] == pytest.approx(student["seam_ratio_by_boundary"], rel=1e-3)
    # The continuation starts from the teacher's block, not the student's: its first seam is another measurement.
    assert figures["teacher block 0 + student"]["seam_ratio_by_boundary"] != pytest.approx(
        student["seam_ratio_by_boundary"], rel=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--num_prompts", "0"], "--num_prompts 0"),
    (["--checkpoint", "no/such/folder"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    base = {"--config_path": RECIPE, "--checkpoint": STUDENT}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    out = tmp_path / "probe.json"
    result = run_script(["scripts/probe_continuation.py", *[x for kv in base.items() for x in kv],
                         "--json_out", str(out)])
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
