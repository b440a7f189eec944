"""The ODE-pair LMDB: exact round trip, a header built from all pairs, duplicates, determinism, refusals."""
import importlib.util
import os
import types

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT, assert_one_line_error, run_script
from utils.config import load_config
from utils.errors import UserError
from utils.geometry import derive_geometry
from utils.lmdb_store import (
    OdeLmdbReader,
    geometry_fingerprint,
    make_header,
    pair_file_name,
    read_pair_tensors,
    scan_pair_folder,
    write_ode_lmdb,
    write_pair_file,
)

TIMESTEPS = torch.tensor([999.0, 900.5, 700.25, 0.0])
KEEP = [0, 2, 4, -1]


def tiny_geometry(*overrides):
    return derive_geometry(load_config("configs/tiny/ode.yaml", list(overrides)), check_weights=False)


def write_pairs(folder, prompts_by_index, geometry, seed=0, noise_seeds=None):
    """Random pairs for the given {index: prompt}, noise seed = index unless noise_seeds names another;
    returns {index: float16 latents}."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(TIMESTEPS), *geometry.latent_shape[1:])
    written = {}
    for index, prompt in prompts_by_index.items():
        latents = torch.randn(shape, generator=generator).half()
        noise_seed = (noise_seeds or {}).get(index, index)
        write_pair_file(folder, index, latents, TIMESTEPS, prompt=prompt, seed=noise_seed, geometry=geometry, keep_indices=KEEP)
        written[index] = latents
    return written


def all_records(path):
    reader = OdeLmdbReader(path)
    try:
        return list(reader.items())
    finally:
        reader.close()


def load_script(script):
    """A script under scripts/ as a module (scripts are entry points, not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{os.path.basename(script)[:-3]}", os.path.join(REPO_ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script, argv, capsys):
    """Call a script's main(argv) here (no interpreter start-up); returns a CompletedProcess-like result."""
    module = load_script(script)
    capsys.readouterr()
    try:
        returncode = module.main([str(a) for a in argv]) or 0
    except SystemExit as exit_:
        returncode = exit_.code
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=returncode, stdout=out.out, stderr=out.err)


def create(data, out, capsys):
    return run_in_process("scripts/create_lmdb.py", ["--data_path", data, "--lmdb_path", out], capsys)


def test_round_trip_is_exact_with_a_header_from_all_pairs(tmp_path):
    geometry = tiny_geometry()
    prompts = {0: "zebra at dawn", 1: "a cat walks", 2: "moon over sea", 3: "b dog runs"}
    latents = write_pairs(tmp_path / "pairs", prompts, geometry)
    # the command line once as a real process; the other tests call main() in this process
    proc = run_script(["scripts/create_lmdb.py", "--data_path", str(tmp_path / "pairs"), "--lmdb_path", str(tmp_path / "db")])
    assert proc.returncode == 0, proc.stderr
    assert "4 pairs (0 copies of a prompt and seed dropped)" in proc.stdout

    reader = OdeLmdbReader(tmp_path / "db")
    header = reader.header
    assert header["count"] == 4
    assert header["shape"] == [4, *geometry.latent_shape[1:]]
    assert header["dtype"] == "float16"
    assert header["trajectory_timesteps"] == TIMESTEPS.tolist()
    assert header["keep_indices"] == KEEP
    assert header["fingerprint"] == geometry_fingerprint(geometry, TIMESTEPS.tolist())
    # rows come in prompt order, whatever the indices, and hold the exact float16 bytes
    order = sorted(prompts, key=prompts.get)
    for row_index, pair_index in enumerate(order):
        row = reader.read(row_index)
        assert row.prompt == prompts[pair_index]
        assert np.array_equal(row.latents, latents[pair_index].numpy())
    with pytest.raises(IndexError):
        reader.read(4)
    reader.close()


def test_a_repeated_prompt_keeps_each_seed_copies_keep_the_lowest_index_and_builds_are_identical(tmp_path, capsys):
    geometry = tiny_geometry()
    # "same prompt" three times: indices 1 and 3 from two noise seeds, index 4 a copy of index 1 (same seed)
    latents = write_pairs(tmp_path / "pairs", {4: "same prompt", 0: "other", 1: "same prompt", 2: "third", 3: "same prompt"},
                          geometry, noise_seeds={4: 1})
    proc = create(tmp_path / "pairs", tmp_path / "a.lmdb", capsys)
    assert proc.returncode == 0 and "4 pairs (1 copies of a prompt and seed dropped)" in proc.stdout, proc
    assert create(tmp_path / "pairs", tmp_path / "b.lmdb", capsys).returncode == 0
    # the same pairs written to another folder in another order give the same database too
    for index in (3, 2, 1, 0, 4):
        source = tmp_path / "pairs" / pair_file_name(index)
        (tmp_path / "shuffled").mkdir(exist_ok=True)
        (tmp_path / "shuffled" / pair_file_name(index)).write_bytes(source.read_bytes())
    assert create(tmp_path / "shuffled", tmp_path / "c.lmdb", capsys).returncode == 0

    records = all_records(tmp_path / "a.lmdb")
    assert records == all_records(tmp_path / "b.lmdb") == all_records(tmp_path / "c.lmdb")
    reader = OdeLmdbReader(tmp_path / "a.lmdb")
    assert reader.header["count"] == 4
    assert [reader.read(i).prompt for i in range(4)] == ["other", "same prompt", "same prompt", "third"]
    assert np.array_equal(reader.read(1).latents, latents[1].numpy())  # index 1, not its copy 4
    assert np.array_equal(reader.read(2).latents, latents[3].numpy())  # the prompt's second seed is a row of its own
    reader.close()


def test_an_existing_file_is_replaced_only_when_it_is_a_database(tmp_path, capsys):
    write_pairs(tmp_path / "pairs", {0: "a"}, tiny_geometry())
    notes = tmp_path / "notes.txt"
    notes.write_text("someone's notes")
    assert_one_line_error(create(tmp_path / "pairs", notes, capsys), "notes.txt", "not an LMDB database")
    assert notes.read_text() == "someone's notes"
    first = create(tmp_path / "pairs", tmp_path / "db.lmdb", capsys)
    assert first.returncode == 0 and "replaced" not in first.stdout
    again = create(tmp_path / "pairs", tmp_path / "db.lmdb", capsys)  # its own output: replaced, and said so
    assert again.returncode == 0 and "replaced the earlier database" in again.stdout
    assert OdeLmdbReader(tmp_path / "db.lmdb").header["count"] == 1


def test_mixed_geometries_and_an_empty_folder_are_refused(tmp_path, capsys):
    write_pairs(tmp_path / "pairs", {0: "a"}, tiny_geometry())
    write_pairs(tmp_path / "pairs", {1: "b"}, tiny_geometry("video.height=64"))
    assert_one_line_error(create(tmp_path / "pairs", tmp_path / "db.lmdb", capsys), "different geometries", "000001.safetensors")
    assert not (tmp_path / "db.lmdb").exists()
    (tmp_path / "empty").mkdir()
    assert_one_line_error(create(tmp_path / "empty", tmp_path / "db.lmdb", capsys), "holds no .safetensors pairs")


def test_a_failed_write_leaves_the_old_database_and_no_temp_file(tmp_path):
    path = tmp_path / "db.lmdb"
    shape = [2, 1, 2, 2, 2]
    fields = {"latent_shape": shape[1:], "vae": "v", "latent_channels": 2}

    def header(count):
        return make_header(count=count, shape=shape, dtype="float16", trajectory_timesteps=[999.0, 0.0], keep_indices=[0, -1],
                           geometry_fields=fields, fingerprint="f")

    write_ode_lmdb(path, header(1), [("p", np.zeros(shape, np.float16))])
    before = path.read_bytes()

    def broken_rows():
        yield "p", np.ones(shape, np.float16)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_ode_lmdb(path, header(2), broken_rows())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["db.lmdb"]


def test_scan_skips_unfinished_temp_files(tmp_path):
    geometry = tiny_geometry()
    write_pairs(tmp_path, {3: "p"}, geometry)
    (tmp_path / ".000004.safetensors.abc.tmp").write_bytes(b"half")
    infos = scan_pair_folder(tmp_path)
    assert [(i.index, i.prompt, i.seed) for i in infos] == [(3, "p", 3)]
    assert read_pair_tensors(infos[0].path)["ode_timesteps"].tolist() == TIMESTEPS.tolist()


# --------------------------------------------------------------------------------------------- integrity
def _tiny_db(tmp_path):
    from tests.train_helpers import write_tiny_ode_lmdb

    return write_tiny_ode_lmdb(load_config("configs/tiny/ode.yaml"), tmp_path / "pairs.lmdb")


def _row_bytes(path, index):
    reader = OdeLmdbReader(path)
    try:
        return reader.read(index).latents.tobytes(), reader.header["count"]
    finally:
        reader.close()


def _train_on(db, tmp_path):
    return run_script(["train.py", "--config_path", "configs/tiny/ode.yaml", "--logdir", str(tmp_path / "run"),
                       "--disable-wandb", f"train.data_path={db}", "train.max_steps=2"])


def test_a_truncated_database_is_one_line_at_open_not_a_signal(tmp_path):
    db = _tiny_db(tmp_path)
    size = db.stat().st_size
    with open(db, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(UserError, match="is truncated"):
        OdeLmdbReader(db)
    result = _train_on(db, tmp_path)
    assert_one_line_error(result, "is truncated", str(size // 2))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("damage", ["random bytes", "zeroed"])
def test_damaged_rows_fail_their_checksum(tmp_path, damage):
    db = _tiny_db(tmp_path)
    content = bytearray(db.read_bytes())
    _, count = _row_bytes(db, 0)
    rng = np.random.default_rng(0)
    for index in range(count):  # damage 64 bytes inside every row's stored latents
        row, _ = _row_bytes(db, index)
        start = content.find(row)
        assert start >= 0
        patch = rng.integers(0, 256, 64, dtype=np.uint8).tobytes() if damage == "random bytes" else bytes(64)
        content[start + 100:start + 164] = patch
        db.write_bytes(bytes(content))
    reader = OdeLmdbReader(db)
    with pytest.raises(UserError, match="row 0 fails its checksum"):
        reader.read(0)
    reader.close()
    assert_one_line_error(_train_on(db, tmp_path), "is damaged", "fails its checksum", "create_lmdb.py",
                          after_progress=True)


def test_rows_carry_checksums_and_a_header_without_them_still_reads(tmp_path):
    import lmdb

    db = _tiny_db(tmp_path)
    reader = OdeLmdbReader(db)
    assert reader.header["version"] == 2 and len(reader.header["row_crc32"]) == reader.header["count"]
    first = reader.read(0).latents.copy()
    reader.close()
    env = lmdb.open(str(db), subdir=False, lock=False)
    with env.begin(write=True) as txn:  # rewrite as a version-1 database (before checksums)
        import json

        header = json.loads(txn.get(b"__header__"))
        header["version"] = 1
        del header["row_crc32"]
        txn.put(b"__header__", json.dumps(header).encode())
    env.close()
    with pytest.warns(UserWarning, match="without row checksums"):
        old = OdeLmdbReader(db)
    assert np.array_equal(old.read(0).latents, first)
    old.close()
