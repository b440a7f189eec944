"""The shortened quickstart runs the whole chain with the real entry points and reuses finished stages."""
import json
from collections import Counter

import numpy as np
import pytest
import yaml

from tests.helpers import assert_one_line_error, run_script
from utils.lmdb_store import OdeLmdbReader

STAGES = ("ode_pairs", "lmdb", "ode_init", "dmd", "infer_ode_init", "infer_dmd", "infer_dmd_no_ema", "infer_dmd_long")


@pytest.mark.slow
def test_short_quickstart_runs_the_chain_and_reuses_stages(tmp_path, random_teacher):
    out = tmp_path / "qs"
    args = ["scripts/quickstart.py", "--short", "--out", str(out), "--teacher", str(random_teacher), "--pairs_per_caption", "2",
            "--processes", "2"]
    first = run_script(args, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # two trajectories of each of the 8 captions, from their own seeds, are all rows of the LMDB
    reader = OdeLmdbReader(out / "ode_pairs.lmdb")
    rows = [reader.read(i) for i in range(reader.header["count"])]
    reader.close()
    assert len(rows) == 16 and set(Counter(r.prompt for r in rows).values()) == {2}
    assert not np.array_equal(rows[0].latents, rows[1].latents) and rows[0].prompt == rows[1].prompt
    assert report["settings"]["ode_pairs_per_caption"] == 2
    # how long it took, stage by stage, in the report (the pairs sampled by --processes 2 ranks under torchrun)
    assert set(report["settings"]["stages"]) == set(STAGES)
    assert not any(t["reused"] for t in report["settings"]["stages"].values())
    assert "Time: " in (out / "report.md").read_text() and "ode_pairs " in (out / "report.md").read_text()
    assert set(report) >= {"teacher", "ode_init", "dmd", "checks", "criteria", "settings"}
    assert set(report["checks"]["dmd"]) == {"student_adherence_ratio", "nfe_ratio", "speedup"}
    # the speed check: teacher and EMA student timed back to back on each evaluation prompt
    assert report["speed"]["student"] == "dmd" and report["speed"]["num_pairs"] == 2
    assert report["dmd"]["speedup"] == report["speed"]["speedup"] > 0
    for name in ("teacher", "ode_init", "dmd", "dmd_no_ema"):
        line = report[name]
        assert 0.0 <= line["adherence"] <= 1.0 and line["num_videos"] == 2 and line["seconds_per_video"] > 0
        assert line["seam_ratio"] > 0 and 0 <= line["flicker"] <= 1.5  # the temporal columns
        assert len(line["seam_ratio_by_boundary"]) == 2  # 3 blocks
        assert sum(line["seam_ratio_by_boundary"]) / 2 == pytest.approx(line["seam_ratio"])
    # the long-video row: the DMD student at 4x its 9 latent frames (141 pixel frames), judged per 33-frame segment
    long_video = report["long_video"]
    assert long_video["num_frames"] == 141 and long_video["segment_frames"] == 33
    assert len(long_video["segments"]) == 4 and long_video["drift_per_segment"][0] == 0
    assert set(report["goals"]) == {"ode_init_seams", "dmd_seams", "long_video_appearance"}
    assert report["teacher"]["nfe"] == 16  # 8 steps x CFG (short run)
    # per frame: 4 steps + the context pass; 3 blocks of 3 frames -> 15 forward calls per video
    assert report["dmd"]["nfe"] == report["ode_init"]["nfe"] == 5
    assert report["dmd"]["forward_calls"] == 15 and report["teacher"]["forward_calls"] == 16
    for picture in ("training_curves.png", "frames.png", "long_video.png", "long_video_segments.png", "report.md"):
        assert (out / picture).stat().st_size > 0
    assert "seam ratio" in (out / "report.md").read_text() and "## Long video" in (out / "report.md").read_text()
    assert "seam ratio by block boundary, first to last: teacher " in (out / "report.md").read_text()
    assert len(list((out / "videos").glob("*/*.mp4"))) + len(list((out / "videos").glob("*/*/video.mp4"))) == 10
    assert all((out / f"{stage}.done").exists() for stage in STAGES)
    # one log line covers the window of 4 iterations: the generator's loss (iterations 0 and 2) is averaged in
    records = [json.loads(line) for line in (out / "dmd" / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if "critic_loss" in r]
    assert last["step"] == 4 and "generator_loss" in last and "critic_loss" in last
    # evaluation during training: the miniature judge and the temporal report at steps 2 and 4
    assert [r["step"] for r in records if "eval/adherence" in r] == [2, 4]
    assert [r["step"] for r in records if r.get("eval/seam_ratio_pixels", 0) > 0] == [2, 4]  # as the report measures
    # a second run reuses every finished stage and still writes the report
    second = run_script(args, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(f"{stage}: done earlier with the same inputs, reused" in second.stdout for stage in STAGES)
    assert "reused from an earlier run: " + ", ".join(STAGES) in (out / "report.md").read_text()
    # the bounded world's report shows what that world can judge of a long video: appearance, not adherence
    assert report["long_video"]["judged"] == ["appearance"] and "adherence" not in report["long_video"]["segments"][-1]
    long_table = (out / "report.md").read_text().split("## Long video")[1].split("##")[0]
    assert "appearance" in long_table and "adherence" not in long_table
    # long tuning's report judges long videos in full: the bounded world's run is refused in one line
    refused = run_script(["scripts/long_tuning_report.py", "--quickstart", str(out), "--seeds", "0"], timeout=300)
    assert_one_line_error(refused, "bounded world", "--world wrap")
    # another evaluation set: 3 clips instead of 2, so the students' clips are made again, the training reused
    third = run_script([*args, "--eval_clips", "3"], timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(f"{stage}: done earlier with the same inputs, reused" in third.stdout
               for stage in ("ode_pairs", "lmdb", "ode_init", "dmd"))
    assert "infer_ode_init: running it again: a prompt list it reads changed (ode_init_prompts.txt)" in third.stdout
    assert "infer_dmd: running it again" in third.stdout
    report = json.loads((out / "report.json").read_text())
    assert all(report[name]["num_videos"] == 3 for name in ("teacher", "ode_init", "dmd", "dmd_no_ema"))
    assert report["settings"]["num_eval"] == 3 and len(list((out / "videos" / "dmd").glob("*/video.mp4"))) == 3
    # (another option changing an early stage reruns it and every later one from scratch: tests/test_stages.py; the
    # student's shift reaching the stages' recipes: test_short_causal_chain_reports_the_causal_teacher)



@pytest.mark.slow
def test_short_causal_chain_reports_the_causal_teacher(tmp_path, random_teacher):
    """--chain causal_forcing: teacher forcing, the causal teacher's pairs, and its own row in the report; with
    --student_shift 1 the student's list and the pairs it regresses on are unwarped, the causal teacher's are not."""
    out = tmp_path / "qs"
    result = run_script(["scripts/quickstart.py", "--short", "--chain", "causal_forcing", "--out", str(out), "--world", "wrap",
                         "--pairs_per_caption", "1", "--teacher", str(random_teacher), "--student_shift", "1"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all((out / f"{stage}.done").exists() for stage in ("causal_teacher", "ode_pairs_causal", "lmdb_causal"))
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["chain"] == "causal_forcing" and report["settings"]["student_shift"] == 1.0
    # the short run's 8-step ODE keeps points 0, 2, 4, 6 of 8: at shift 1 the plain [1000, 750, 500, 250], on
    # the student's list; the bidirectional pairs that train the causal teacher keep the recipe's shift 5
    def kept(lmdb):
        reader = OdeLmdbReader(out / lmdb)
        timesteps = reader.header["trajectory_timesteps"]
        reader.close()
        return timesteps

    # (the sampler's timesteps: 1000 x sigma, sigma from 0.999)
    assert kept("ode_pairs_causal.lmdb")[:4] == pytest.approx([1000, 750, 500, 250], rel=2e-3)
    assert kept("ode_pairs.lmdb")[:4] == pytest.approx([1000, 937.5, 833.3, 625], rel=2e-3)
    for name in ("ode_init", "dmd", "dmd_long"):
        record = json.loads(next((out / "videos" / name).glob("*/inference_record.json")).read_text())
        assert record["parameters"]["denoising_timesteps"] == [1000, 750, 500, 250], name
    assert "timestep_shift: 5.0" in (out / "causal_teacher" / "config.yaml").read_text()
    # the causal chain's ODE stage as Causal Forcing runs it: the student starts from the causal teacher, and
    # regresses against clean context only
    ode_init = yaml.safe_load((out / "ode_init" / "config.yaml").read_text())
    assert ode_init["generator"]["checkpoint"] == str((out / "causal_teacher" / "latest").resolve())
    assert ode_init["real_score"]["checkpoint"] == ode_init["generator"]["checkpoint"]  # not the recipe's own folder
    assert ode_init["train"]["ode_teacher_forcing"] is True
    assert "timestep_shift: 1.0" in (out / "dmd" / "config.yaml").read_text()
    causal = report["causal_teacher"]
    # block by block: 8 steps x CFG + a context pass per CFG branch for each frame, 3 blocks -> 3x the calls
    assert causal["nfe"] == 18 and causal["forward_calls"] == 54
    assert causal["num_videos"] == 2 and len(causal["seam_ratio_by_boundary"]) == 2
    # another model than the bidirectional teacher (same weights, same seeds, but made block by block)
    assert causal["seam_ratio"] != pytest.approx(report["teacher"]["seam_ratio"])
    assert "causal_teacher" in (out / "report.md").read_text()
    assert len(list((out / "videos" / "causal_teacher").glob("*.mp4"))) == 2
    assert "causal_teacher_seams" not in report["goals"]  # the goals are the students'
    # the wrapping world judges long videos in full
    assert report["long_video"]["judged"] == ["adherence", "appearance"] and "long_video_adherence" in report["goals"]
    # long tuning from the DMD student, judged at 2x its length and after a prompt switch (scripts/long_tuning_report.py)
    tuned = run_script(["scripts/long_tuning_report.py", "--quickstart", str(out), "--seeds", "0", "--factors", "2",
                        "--eval_clips", "1", "--steps", "2"], timeout=900)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    long_tuning = json.loads((out / "long_tuning.json").read_text())
    assert set(long_tuning["students"]) == {"dmd", "long_tuned_s0"}
    for rows in long_tuning["students"].values():
        assert len(rows["lengths"]["2x"]["segments"]) == 2 and rows["lengths"]["2x"]["num_frames"] == 69
        assert rows["switch"]["num_clips"] == 1 and 0 <= rows["switch"]["adherence_after_switch"] <= 1
        assert 0 <= rows["switch"]["adherence_from_start"] <= 1  # the same caption made from the start, beside it
    assert (out / "long_tuning_segments.png").stat().st_size > 0 and "| long_tuned_s0 | 2x |" in tuned.stdout
    assert "generator/prompt_switched" in (out / "long_tuning_s0" / "metrics.jsonl").read_text()
    # no factors: the switch alone is judged, the tuning reused
    switch_only = run_script(["scripts/long_tuning_report.py", "--quickstart", str(out), "--seeds", "0", "--factors",
                              "--eval_clips", "1", "--steps", "2"], timeout=900)
    assert switch_only.returncode == 0, switch_only.stdout[-3000:] + switch_only.stderr[-3000:]
    again = json.loads((out / "long_tuning.json").read_text())
    assert again["factors"] == [] and all(rows["lengths"] == {} for rows in again["students"].values())
    assert again["students"]["long_tuned_s0"]["switch"] == long_tuning["students"]["long_tuned_s0"]["switch"]


@pytest.mark.slow
def test_compare_inits_runs_the_longlive_chain_over_seeds_sharing_its_stages(tmp_path, random_teacher):
    """scripts/compare_inits.py on the LongLive form: no ODE stage, DMD starts from the causal teacher; the second
    seed's run takes the pairs and the causal teacher from the first and trains only its own DMD stage."""
    out = tmp_path / "inits"
    result = run_script(["scripts/compare_inits.py", "--short", "--chains", "longlive", "--seeds", "0", "1", "--out", str(out),
                         "--teacher", str(random_teacher), "--world", "wrap"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = out / "longlive_s0", out / "longlive_s1"
    assert "(copied from earlier runs: ode_pairs, lmdb, causal_teacher)" in result.stdout
    report = json.loads((second / "report.json").read_text())
    assert set(report["settings"]["stages"]) >= {"ode_pairs", "lmdb", "causal_teacher", "dmd"}
    assert "ode_init" not in report and not (second / "ode_init").exists() and "causal_teacher" in report
    assert [name for name, t in report["settings"]["stages"].items() if not t["reused"]][0] == "dmd"
    for run, seed in ((first, 0), (second, 1)):
        dmd = yaml.safe_load((run / "dmd" / "config.yaml").read_text())
        assert dmd["generator"]["checkpoint"] == str(run / "causal_teacher" / "latest" / "generator.safetensors")
        assert dmd["train"]["seed"] == seed
    summary = json.loads((out / "inits.json").read_text())
    rows = summary["runs"]["longlive"]
    assert set(rows) == {"0", "1"} and rows["0"]["seam_ratio_vs_teacher"] != rows["1"]["seam_ratio_vs_teacher"]
    assert summary["chains"]["longlive"]["seeds"] == [0, 1]
    assert "LongLive 2.0 (DMD from the causal teacher)" in (out / "inits.md").read_text()
    assert (out / "inits.png").stat().st_size > 0


def _long_clips(world, frozen_after=None):
    from miniature.judge import eval_prompts
    from miniature.world import parse_caption, render

    prompts = eval_prompts()[:4]
    clips = []
    for text, seed in prompts:
        clip = render(parse_caption(text), seed, world, num_frames=4 * world.num_frames + 9)  # 141 frames
        if frozen_after is not None:
            clip[frozen_after:] = clip[frozen_after - 1]  # the shape stops
        clips.append(clip)
    return [p for p, _ in prompts], clips


def test_long_video_goal_is_adherence_in_the_wrapping_world_and_appearance_in_the_bounded_one(tmp_path):
    from miniature.report import long_video_summary, summarise, write_report
    from miniature.world import WORLDS

    wrap = WORLDS["wrap"]
    captions, clips = _long_clips(wrap)
    moving = long_video_summary("dmd", clips, captions, wrap.num_frames, wrap)
    assert moving["world"] == "wrap" and len(moving["segments"]) == 4
    assert moving["adherence_ratio"] > 0.95 and min(s["adherence"] for s in moving["segments"]) > 0.95
    _, stopped_clips = _long_clips(wrap, frozen_after=wrap.num_frames)
    stopped = long_video_summary("dmd", stopped_clips, captions, wrap.num_frames, wrap)
    assert stopped["adherence_ratio"] < 0.1 and stopped["appearance_ratio"] > 0.95  # the look kept, the motion lost
    # in the bounded world the same long clips are judged by appearance only
    bounded = long_video_summary("dmd", stopped_clips, captions, wrap.num_frames, WORLDS["bounded"])
    assert bounded["world"] == "bounded" and bounded["judged"] == ["appearance"]
    assert all(set(segment) == {"start", "appearance"} for segment in bounded["segments"])
    assert "adherence_ratio" not in bounded and bounded["appearance_ratio"] > 0.95
    from miniature.pictures import segment_adherence

    picture = segment_adherence(tmp_path / "segments.png", {"moving": moving, "stopped": stopped}, fps=16)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    # the bounded world's picture draws appearance alone: one panel, half the width
    from PIL import Image

    alone = segment_adherence(tmp_path / "bounded.png", {"stopped": bounded}, fps=16)
    assert Image.open(alone).size[0] < 0.7 * Image.open(picture).size[0]

    def report(long_video):
        line = summarise("teacher", [c[:33] for c in clips], captions, [64] * 4, [1.0] * 4, [64] * 4, [3, 3, 3], 4, wrap)
        student = {**line, "model": "dmd", "nfe": 5, "seconds_per_video": 0.1}
        return write_report(tmp_path, {"teacher": line, "dmd": student, "long_video": long_video}, {})["goals"]

    assert report(moving)["long_video_adherence"] is True
    assert report(stopped)["long_video_adherence"] is False
    assert report(bounded)["long_video_appearance"] is True and "long_video_adherence" not in report(bounded)


def test_speed_check_pairs_cancel_the_machine_drifting(tmp_path):
    from miniature.report import summarise, time_alternately, write_report
    from miniature.world import WORLDS

    # the machine slows 3x half-way through: a teacher clip costs 1.0 units and a student clip 0.2
    clock = {"calls": 0}

    def timed(cost):
        def run(prompt, seed):
            clock["calls"] += 1
            return cost * (3.0 if clock["calls"] > 8 else 1.0)
        return run

    prompts = [(f"p{i}", i) for i in range(8)]
    speed = time_alternately(timed(1.0), timed(0.2), prompts)
    assert speed["speedup"] == pytest.approx(5.0) and speed["num_pairs"] == 8
    # timed in separate stages (the teacher before the slowdown, the student after), the medians say 1.7x
    clock["calls"] = 0
    teacher_alone = [timed(1.0)(p, s) for p, s in prompts]
    student_alone = [timed(0.2)(p, s) for p, s in prompts]
    assert sorted(teacher_alone)[4] / sorted(student_alone)[4] < 2

    wrap = WORLDS["wrap"]
    captions, clips = _long_clips(wrap)
    line = summarise("teacher", [c[:33] for c in clips], captions, [64] * 4, [1.0] * 4, [64] * 4, [3, 3, 3], 4, wrap)
    students = {name: {**line, "model": name, "nfe": 5, "seconds_per_video": 0.5} for name in ("dmd", "dmd_no_ema")}
    report = write_report(tmp_path, {"teacher": line, **students, "speed": {"student": "dmd", **speed}}, {})
    assert report["dmd"]["speedup"] == pytest.approx(5.0) and report["checks"]["dmd"]["speedup"] is True
    assert report["dmd_no_ema"]["speedup"] == pytest.approx(2.0)  # not paired: the ratio of the medians
    assert report["speed"]["num_pairs"] == 8 and "timed back to back" in (tmp_path / "report.md").read_text()
    failing = write_report(tmp_path, {"teacher": line, **students, "speed": {"student": "dmd", **speed, "speedup": 4.0}}, {})
    assert failing["checks"]["dmd"]["speedup"] is False


@pytest.mark.parametrize("args, message", [
    (["--world", "wrap", "--teacher", "<tmp>/missing"], "has no config.json"),
    (["--pairs_per_caption", "0"], "--pairs_per_caption 0: expected at least 1"),
    (["--eval_clips", "0"], "--eval_clips 0: expected 1 to 1000"),
    (["--eval_clips", "1001"], "would reach the teacher's validation seeds"),
    (["--student_shift", "0"], "--student_shift 0.0: expected a shift above 0"),
    (["--processes", "0"], "--processes 0: expected at least 1"),
    (["--seed", "-1"], "--seed -1: expected a seed of 0 or more"),
    (["--task", "ti2v", "--chain", "causal_forcing"], "--task ti2v runs the published chain with DMD"),
    (["--task", "ti2v", "--world", "wrap"], "the image-to-video teacher is the bounded world's"),
])
def test_quickstart_refuses_bad_options_before_work(tmp_path, args, message):
    args = [arg.replace("<tmp>", str(tmp_path)) for arg in args]
    result = run_script(["scripts/quickstart.py", *args, "--out", str(tmp_path / "qs")], timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "qs").exists()


def test_report_gives_standard_errors_that_follow_the_clips_spread(tmp_path):
    """± in the report: the standard error of the per-clip seam ratios and adherence, and of the ratio to the
    teacher's; clips that disagree give their spread over sqrt(n), a single clip gives 0."""
    import statistics

    from miniature.report import summarise, write_report
    from miniature.world import WORLDS
    from utils.temporal import seam_ratio

    wrap = WORLDS["wrap"]
    captions, clips = _long_clips(wrap)
    clips = [c[:33] for c in clips]
    jumped = []
    for index, clip in enumerate(clips):  # a jump of its own size in each clip at the first block boundary (pixel 8)
        clip = clip.clone()
        clip[9:] = (clip[9:] + 0.1 * (index + 1)).clamp(-1, 1)
        jumped.append(clip)
    args = ([64] * 4, [1.0] * 4, [64] * 4, [3, 3, 3], 4, wrap)
    teacher = summarise("teacher", clips, captions, *args)
    student = {**summarise("dmd", jumped, captions, *args), "nfe": 5, "seconds_per_video": 0.1}
    per_clip = [seam_ratio(c, [3, 3, 3], 4) for c in jumped]
    assert student["seam_ratio"] == pytest.approx(statistics.mean(per_clip))
    assert student["seam_ratio_se"] == pytest.approx(statistics.stdev(per_clip) / 2) and student["seam_ratio_se"] > 0.1
    assert 0 <= teacher["seam_ratio_se"] < student["seam_ratio_se"]
    report = write_report(tmp_path, {"teacher": teacher, "dmd": student}, {})
    ratio, ratio_se = report["dmd"]["seam_ratio_vs_teacher"], report["dmd"]["seam_ratio_vs_teacher_se"]
    expected = ratio * ((student["seam_ratio_se"] / student["seam_ratio"]) ** 2
                        + (teacher["seam_ratio_se"] / teacher["seam_ratio"]) ** 2) ** 0.5
    assert ratio > 1.2 and ratio_se == pytest.approx(expected)
    assert f"dmd {ratio:.3f} ± {ratio_se:.3f}" in (tmp_path / "report.md").read_text()
    one = summarise("teacher", clips[:1], captions[:1], [64], [1.0], [64], [3, 3, 3], 4, wrap)
    assert one["seam_ratio_se"] == 0 and one["adherence_se"] == 0
