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
                          "--warmup", "1", "--image-share", "0.5"], timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    steps = [json.loads(line) for line in trained.stdout.splitlines() if line.startswith('{"step"')]
    assert [s["step"] for s in steps] == [1, 2]
    # both recipe samplers and (--image-share) the teacher's from first frames, with the standard error over 2 x 2 clips
    for setting in ("teacher", "ode", "teacher_ti2v"):
        assert 0 <= steps[-1][setting]["total"] <= 1 and steps[-1][setting]["total_se"] >= 0
    assert {p.name for p in (out / "teacher").iterdir()} == {"config.json", "model.safetensors"}
    shipped = json.loads(open("checkpoints/miniature/teacher/config.json").read())
    assert json.loads((out / "teacher" / "config.json").read_text()) == shipped  # the same fields as the shipped one
    again = run_script(["scripts/train_miniature_teacher.py", "--eval-only", "--out", str(out), "--val-clips", "2",
                        "--threads", "1", "--image-share", "0.5"], timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _final(again.stdout) == _final(trained.stdout)  # the exported weights are the ones validated last


def test_image_to_video_rows_hold_their_first_frame_clean_and_out_of_the_loss():
    import torch

    from scripts.train_miniature_teacher import noisy_clips

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 6, 2, 2, generator=generator), torch.randn(3, 4, 6, 2, 2, generator=generator)
    x_t, timestep, weight = noisy_clips(x0, noise, torch.tensor([0.5, 0.9, 0.2]), torch.tensor([False, True, False]))
    assert torch.equal(x_t[1, 0], x0[1, 0]) and timestep[1].tolist() == [0.0, 900.0, 900.0, 900.0]
    assert weight.flatten(1).tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    assert torch.allclose(x_t[0], 0.5 * x0[0] + 0.5 * noise[0], atol=1e-6) and timestep[0].tolist() == [500.0] * 4
    assert torch.allclose(x_t[1, 1:], 0.1 * x0[1, 1:] + 0.9 * noise[1, 1:], atol=1e-6)


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    refused = run_script(["scripts/train_miniature_teacher.py", "--out", str(tmp_path), "--val-clips", "0"], timeout=120)
    assert_one_line_error(refused, "--val-clips")
