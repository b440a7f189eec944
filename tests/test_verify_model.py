"""verify.py model builds generator, real score and fake score on the meta device and counts their parameters."""
import json

import pytest

from tests.helpers import run_script


@pytest.mark.parametrize(
    "recipe,generator,real,fake",
    [
        ("configs/self_forcing_dmd_5B.yaml", 4_999_787_712, 4_999_787_712, 4_999_787_712),
        ("configs/self_forcing_dmd.yaml", 1_418_996_800, 14_288_491_584, 1_418_996_800),
    ],
)
def test_parameter_counts(recipe, generator, real, fake):
    proc = run_script(["scripts/verify.py", "model", "--config_path", recipe, "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["generator_params"], data["real_score_params"], data["critic_params"]) == (generator, real, fake)
    assert data["bf16_weights_total_bytes"] == 2 * (generator + real + fake)


def test_moe_teacher_counts_both_experts():
    proc = run_script(["scripts/verify.py", "model", "--config_path", "configs/self_forcing_dmd.yaml",
                       "real_score.preset=wan2.2-t2v-a14b", "real_score.checkpoint=null", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["real_score_experts"] == 2 and data["real_score_params"] == 2 * 14_288_491_584


def test_verify_vae_and_text_checklists():
    for check, recipe, expected in (("vae", "configs/self_forcing_dmd_5B.yaml", "(1, 21, 48, 44, 80)"),
                                    ("vae", "configs/self_forcing_dmd.yaml", "(1, 21, 16, 60, 104)"),
                                    ("text", "configs/tiny/self_forcing_dmd.yaml", "(2, 16, 32)")):
        proc = run_script(["scripts/verify.py", check, "--config_path", recipe])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "FAIL" not in proc.stdout and expected in proc.stdout, proc.stdout


def test_verify_all_and_train_on_the_tiny_recipe():
    for check in ("all", "train"):
        proc = run_script(["scripts/verify.py", check, "--config_path", "configs/tiny/self_forcing_dmd.yaml"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "FAIL" not in proc.stdout and proc.stdout.count("PASS") >= 7, proc.stdout


def test_verify_all_fails_on_a_broken_checkpoint(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    proc = run_script(["scripts/verify.py", "all", "--config_path", "configs/tiny/self_forcing_dmd.yaml",
                       f"generator.checkpoint={folder}"])
    assert proc.returncode != 0 and "FAIL" in proc.stdout + proc.stderr
