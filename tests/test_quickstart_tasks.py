"""The shortened quickstart's image-to-video chain (--task ti2v|both): its own file, so `make test` runs it beside
test_quickstart.py instead of after it."""
import json

import numpy as np
import pytest
import yaml

from tests.helpers import run_script
from utils.lmdb_store import OdeLmdbReader


@pytest.mark.slow
def test_short_image_to_video_chain_starts_every_clip_from_its_image(tmp_path, random_teacher):
    """--task both (the image-to-video chain, with the text-to-video pairs and rollouts beside): first frames from the
    teacher's own pairs, pairs sampled from them, ODE init and DMD as ti2v; every judged clip starts from its given
    image, and its first frame is the VAE's reconstruction of that image; the same student is judged from text."""
    out = tmp_path / "qs"
    result = run_script(["scripts/quickstart.py", "--short", "--task", "both", "--out", str(out), "--teacher",
                         str(random_teacher), "--pairs_per_caption", "1"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    captions = (out / "first_frames" / "captions.tsv").read_text().splitlines()
    assert len(captions) == 8 and all((out / "first_frames" / line.split("\t")[0]).is_file() for line in captions)
    reader = OdeLmdbReader(out / "ode_pairs_ti2v.lmdb")
    rows = [reader.read(i) for i in range(reader.header["count"])]
    reader.close()
    # both kinds of pairs: from an image (frame 0 clean at every kept point) and from text
    held = [np.array_equal(row.latents[0, 0], row.latents[-1, 0]) for row in rows]
    assert len(rows) == 16 and sum(held) == 8
    for stage, data in (("ode_init", "ode_pairs_ti2v.lmdb"), ("dmd", "first_frames/captions.tsv")):
        config = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert config["video"]["task"] == "ti2v" and config["train"]["data_path"] == str(out / data)
    assert yaml.safe_load((out / "dmd" / "config.yaml").read_text())["train"]["image_share"] == 0.5
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["task"] == "both" and report["checks"]["dmd"]["first_frame"] is True
    vae_error = report["vae_first_frame"]["first_frame_error"]
    assert 0 < vae_error < 0.2
    for name in ("teacher", "ode_init", "dmd"):  # every model holds the image's latent clean
        assert report[name]["first_frame_error"] == pytest.approx(vae_error, abs=1e-4)
    records = [json.loads(path.read_text()) for path in (out / "videos" / "dmd").glob("*/inference_record.json")]
    assert {r["seed"]: (r["task"], r["image"]) for r in records} == {  # clip i from the image of clip i
        1000 + i: ("ti2v", str(out / "eval_images" / f"{i:03d}.png")) for i in range(2)}
    assert "the VAE's own reconstruction" in (out / "report.md").read_text()
    # the same student from text alone, against the teacher from text alone
    text = [json.loads(path.read_text()) for path in (out / "videos" / "dmd_t2v").glob("*/inference_record.json")]
    assert len(text) == 2 and all(r["task"] == "t2v" and r["image"] is None for r in text)
    student, teacher = report["dmd_t2v"], report["teacher_t2v"]  # (a random teacher may score 0)
    assert student["adherence_ratio"] == pytest.approx(student["adherence"] / teacher["adherence"] if teacher["adherence"]
                                                       else 0.0) and "first_frame_error" not in student
    assert student["seam_ratio_vs_teacher"] == pytest.approx(student["seam_ratio"] / teacher["seam_ratio"])
