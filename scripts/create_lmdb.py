"""Pack a folder of ODE pairs (from generate_ode_pairs.py) into one LMDB for ODE regression.

    python scripts/create_lmdb.py --data_path DIR [DIR ...] --lmdb_path data/ode_pairs.lmdb

Several folders of one geometry pack into one LMDB: e.g. text-to-video and image-conditioned pairs of the 5B, for
one student of both tasks (the trainer tells the rows apart: an image-conditioned row holds its first frame clean).

Pairs are ordered by prompt text (then index), not by file order. A prompt that occurs more than once in the
caption file was sampled from another noise seed each time (generate_ode_pairs.py seeds by index), and each of
its trajectories is a row: repeat a caption to take more pairs of it. Only the same prompt with the same seed
twice (a copy) keeps its lowest index. Pairs of different geometries are refused. The header (count, shape, dtype,
trajectory timesteps, keep_indices, geometry fingerprint) is built from all pairs. The database is written
to <lmdb_path>.tmp and renamed, so running twice gives the same records and a crash leaves no half file.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils import lmdb_store
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.lmdb_store import PairInfo


def select_pairs(pairs: list[PairInfo], folders: list[int] | None = None) -> list[PairInfo]:
    """One row per (prompt, noise seed, folder), the lowest index of copies, ordered by prompt text, folder, then
    index: the same list whatever the file order. `folders`: each pair's folder (its position in --data_path)."""
    folders = folders or [0] * len(pairs)
    chosen: dict[tuple[str, int, int], PairInfo] = {}
    for folder, pair in sorted(zip(folders, pairs), key=lambda fp: (fp[1].prompt, fp[0], fp[1].index)):
        chosen.setdefault((pair.prompt, pair.seed, folder), pair)
    return list(chosen.values())


def check_one_geometry(pairs: list[PairInfo]) -> None:
    first = pairs[0]
    for pair in pairs[1:]:
        if pair.fingerprint != first.fingerprint:
            raise UserError(
                f"pairs of different geometries: {first.path.name} has fingerprint {first.fingerprint}, "
                f"{pair.path.name} has {pair.fingerprint}: keep one recipe's pairs per folder"
            )


def build_header(pairs: list[PairInfo]) -> dict:
    """The header from the first selected pair (every row is checked against it while writing)."""
    first = pairs[0]
    tensors = lmdb_store.read_pair_tensors(first.path)
    latents, timesteps = tensors["ode_latents"], tensors["ode_timesteps"].tolist()
    if lmdb_store.fingerprint_of(first.geometry, timesteps) != first.fingerprint:
        raise UserError(f"{first.path} has fingerprint {first.fingerprint} that does not match its own metadata: "
                        "the file is damaged, delete it and generate it again")
    return lmdb_store.make_header(count=len(pairs), shape=list(latents.shape), dtype=str(latents.numpy().dtype),
                       trajectory_timesteps=timesteps, keep_indices=first.keep_indices, geometry_fields=first.geometry,
                       fingerprint=first.fingerprint)


def rows(pairs: list[PairInfo], header: dict, progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    for pair in tqdm(pairs, desc="lmdb", disable=not progress):
        tensors = lmdb_store.read_pair_tensors(pair.path)
        latents, timesteps = tensors["ode_latents"].numpy(), tensors["ode_timesteps"].tolist()
        if list(latents.shape) != header["shape"] or str(latents.dtype) != header["dtype"]:
            raise UserError(f"{pair.path} holds latents {list(latents.shape)} {latents.dtype}: expected "
                            f"{header['shape']} {header['dtype']} like {pairs[0].path.name}")
        if timesteps != header["trajectory_timesteps"]:
            raise UserError(f"{pair.path} has trajectory timesteps {timesteps}: expected {header['trajectory_timesteps']}")
        yield pair.prompt, latents


LMDB_MAGIC = bytes.fromhex("dec0efbe")  # an LMDB data file's meta page: 0xBEEFC0DE after the 16-byte page header


def check_lmdb_target(path: Path) -> bool:
    """True when `path` holds an LMDB (ours to replace, a damaged one included); a folder or any other file is
    refused in one line before any work, so no one's data is overwritten."""
    if path.is_dir():
        raise UserError(f"--lmdb_path {path} is a folder: expected a file name (the database is one file)")
    if not path.exists():
        return False
    with open(path, "rb") as handle:
        head = handle.read(20)
    if head[16:20] != LMDB_MAGIC:
        raise UserError(f"--lmdb_path {path} is an existing file that is not an LMDB database: it is not replaced; "
                        "give a new path (or remove it yourself)")
    return True


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, nargs="+",
                        help="folder(s) of <index>.safetensors pairs, of one geometry")
    parser.add_argument("--lmdb_path", required=True, help="the LMDB file to write")
    args = parser.parse_args(argv)

    # 1. Where it goes (never over a file of another kind), then every pair's metadata and the rows.
    replacing = check_lmdb_target(Path(args.lmdb_path))
    pairs, folders = [], []
    for position, data in enumerate(map(Path, args.data_path)):
        if not data.is_dir():
            raise UserError(f"--data_path {data} is not a folder: expected the output folder of generate_ode_pairs.py")
        found = lmdb_store.scan_pair_folder(data)
        if not found:
            raise UserError(f"--data_path {data} holds no .safetensors pairs: run scripts/generate_ode_pairs.py first")
        pairs += found
        folders += [position] * len(found)
    check_one_geometry(pairs)
    selected = select_pairs(pairs, folders)

    # 2. Write the database (temp file, then rename).
    header = build_header(selected)
    lmdb_store.write_ode_lmdb(args.lmdb_path, header, rows(selected, header, progress=True))
    if replacing:
        print(f"lmdb: replaced the earlier database at {args.lmdb_path}")
    print(f"lmdb: {len(selected)} pairs ({len(pairs) - len(selected)} copies of a prompt and seed dropped) of shape "
          f"{header['shape']} {header['dtype']}, fingerprint {header['fingerprint']} -> {args.lmdb_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
