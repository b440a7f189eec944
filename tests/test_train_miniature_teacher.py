"""scripts/train_miniature_teacher.py: a few steps from the shipped teacher, validated and exported in the official
layout; the evaluation-only mode; bad arguments refused in one line."""
import json
import shutil

from tests.helpers import assert_one_line_error, run_script


def _final(stdout: str) -> dict:
    return json.loads(stdout[stdout.index('{\n  "final"'):])["final"]


def test_fine_tune_validates_and_exports_a_teacher_that_evaluates_again(tmp_path):
    out = tmp_path / "miniature"
    out.mkdir()
    shutil.copy("checkpoints/miniature/text_encoder.safetensors", out)  # the shipped encoder, as the docstring asks
    trained = run_script(["scripts/train_miniature_teacher.py", "--out", str(out), "--init", "checkpoints/miniature/teacher",
                          "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--val-clips", "2", "--threads", "1",
                          "--warmup", "1"], timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    steps = [json.loads(line) for line in trained.stdout.splitlines() if line.startswith('{"step"')]
    assert [s["step"] for s in steps] == [1, 2]
    for setting in ("teacher", "ode"):  # both recipe samplers, with the standard error over the 2 x 2 clips
        assert 0 <= steps[-1][setting]["total"] <= 1 and steps[-1][setting]["total_se"] >= 0
    assert {p.name for p in (out / "teacher").iterdir()} == {"config.json", "model.safetensors"}
    shipped = json.loads(open("checkpoints/miniature/teacher/config.json").read())
    assert json.loads((out / "teacher" / "config.json").read_text()) == shipped  # the same fields as the shipped one
    again = run_script(["scripts/train_miniature_teacher.py", "--eval-only", "--out", str(out), "--val-clips", "2",
                        "--threads", "1"], timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _final(again.stdout) == _final(trained.stdout)  # the exported weights are the ones validated last


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    refused = run_script(["scripts/train_miniature_teacher.py", "--out", str(tmp_path), "--val-clips", "0"], timeout=120)
    assert_one_line_error(refused, "--val-clips")
