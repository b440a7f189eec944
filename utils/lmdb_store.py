"""ODE-pair storage: one safetensors file per prompt (written by generate_ode_pairs.py), and the LMDB
that create_lmdb.py builds from a folder of them (read by the ODE dataset).

Pair file DIR/<index:06d>.safetensors: tensors ode_latents (float16 [P, F, C, H, W]) and ode_timesteps
(float32 [P]); string metadata prompt, seed, index, fingerprint, geometry (JSON fields), keep_indices (JSON),
and free-form extras (the teacher's name, for the record).

LMDB layout (a single-file LMDB, `subdir=False`):
    b"__header__"        JSON: format, version, count, shape [P, F, C, H, W], dtype, trajectory_timesteps [P],
                         keep_indices, geometry (latent_shape [F, C, H, W], vae, latent_channels), fingerprint,
                         row_crc32 [count] (CRC-32 of each row's latents bytes followed by its prompt bytes)
    b"latents_%08d"      raw little-endian bytes of one [P, F, C, H, W] array in the header's dtype
    b"prompts_%08d"      the prompt, UTF-8
Rows are numbered 0..count-1. The header is written from the full set of rows (never from one file), and
nothing in it depends on time or file order, so building twice from the same pairs gives the same records.

Integrity: opening checks that the file holds every page the database says it has (a truncated copy would
otherwise kill the reader with SIGBUS on the first row past the end), and every row read is checked against
its CRC-32, so damaged bytes are one clear error instead of training on garbage. Version 1 databases (no
checksums) are still read, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import DiskFull, UserError, is_disk_full
from utils.geometry import Geometry
from utils.io import atomic_save_safetensors

FORMAT_NAME = "self-forcing-ode-pairs"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no row checksums
HEADER_KEY = b"__header__"
FINGERPRINT_LENGTH = 12  # hex characters: short enough to read, long enough never to collide by chance
TIMESTEP_DECIMALS = 3  # timesteps enter the fingerprint rounded, so CPU and GPU schedules agree
MAP_SIZE_SLACK = 1.25  # LMDB needs room for page headers and the B-tree beside the raw rows
MAP_SIZE_FLOOR = 64 << 20  # bytes; small databases still need a few pages of bookkeeping


# --------------------------------------------------------------------------------------------- fingerprint
def fingerprint_fields(geometry: Geometry) -> dict:
    """What an ODE pair's latents depend on in the recipe's geometry (JSON-ready)."""
    return {
        "latent_shape": list(geometry.latent_shape[1:]),  # [F, C, H, W], without the batch
        "vae": geometry.vae,
        "latent_channels": geometry.latent_channels,
    }


def fingerprint_of(fields: dict, trajectory_timesteps: Sequence[float]) -> str:
    """A short stable hash of geometry fields (`fingerprint_fields`) and the kept trajectory timesteps."""
    payload = {**fields, "trajectory_timesteps": [round(float(t), TIMESTEP_DECIMALS) for t in trajectory_timesteps]}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


def geometry_fingerprint(geometry: Geometry, trajectory_timesteps: Sequence[float]) -> str:
    """A short stable hash of the latent shape, VAE, latent channels and kept trajectory timesteps."""
    return fingerprint_of(fingerprint_fields(geometry), trajectory_timesteps)


def describe_geometry(fields: dict) -> str:
    """One-line human form of `fingerprint_fields`, for error messages."""
    return f"latents {fields['latent_shape']} of VAE {fields['vae']} ({fields['latent_channels']} channels)"


# --------------------------------------------------------------------------------------------- pair files
PAIR_SUFFIX = ".safetensors"
PAIR_METADATA_KEYS = ("prompt", "seed", "index", "fingerprint", "geometry", "keep_indices")


def pair_file_name(index: int) -> str:
    return f"{index:06d}{PAIR_SUFFIX}"


@dataclass(frozen=True)
class PairInfo:
    """A pair file's metadata (read without loading its tensors)."""

    path: Path
    index: int
    prompt: str
    seed: int
    fingerprint: str
    geometry: dict  # fingerprint_fields of the recipe that made it
    keep_indices: list[int]


def write_pair_file(folder: str | os.PathLike, index: int, ode_latents: torch.Tensor, ode_timesteps: torch.Tensor, *,
                    prompt: str, seed: int, geometry: Geometry, keep_indices: Sequence[int],
                    extra: dict[str, str] | None = None) -> Path:
    """Write one prompt's trajectory atomically: a crash leaves either the whole file or none."""
    metadata = {
        "prompt": prompt,
        "seed": str(seed),
        "index": str(index),
        "fingerprint": geometry_fingerprint(geometry, ode_timesteps.tolist()),
        "geometry": json.dumps(fingerprint_fields(geometry), sort_keys=True),
        "keep_indices": json.dumps([int(i) for i in keep_indices]),
        **(extra or {}),
    }
    tensors = {"ode_latents": ode_latents.to(torch.float16), "ode_timesteps": ode_timesteps.to(torch.float32)}
    return atomic_save_safetensors(Path(folder) / pair_file_name(index), tensors, metadata=metadata)


def read_pair_info(path: str | os.PathLike) -> PairInfo:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises several types for a damaged header
        raise UserError(f"pair file {path} cannot be read ({type(err).__name__}): delete it and run generation again") from None
    missing = [key for key in PAIR_METADATA_KEYS if key not in metadata]
    if missing:
        raise UserError(f"pair file {path} lacks metadata {', '.join(missing)}: expected a file from generate_ode_pairs.py")
    return PairInfo(path=path, index=int(metadata["index"]), prompt=metadata["prompt"], seed=int(metadata["seed"]),
                    fingerprint=metadata["fingerprint"], geometry=json.loads(metadata["geometry"]),
                    keep_indices=json.loads(metadata["keep_indices"]))


def read_pair_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{"ode_latents": float16 [P, F, C, H, W], "ode_timesteps": float32 [P]}."""
    from safetensors.torch import load_file

    return load_file(str(path))


def scan_pair_folder(folder: str | os.PathLike) -> list[PairInfo]:
    """Metadata of every finished pair file in `folder`, in index order (temp files of unfinished writes are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((read_pair_info(p) for p in folder.glob(f"*{PAIR_SUFFIX}") if not p.name.startswith(".")),
                  key=lambda info: info.index)


# --------------------------------------------------------------------------------------------- header
def make_header(
    *,
    count: int,
    shape: Sequence[int],
    dtype: str,
    trajectory_timesteps: Sequence[float],
    keep_indices: Sequence[int],
    geometry_fields: dict,
    fingerprint: str,
) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "count": int(count),
        "shape": [int(s) for s in shape],
        "dtype": dtype,
        "trajectory_timesteps": [float(t) for t in trajectory_timesteps],
        "keep_indices": [int(i) for i in keep_indices],
        "geometry": geometry_fields,
        "fingerprint": fingerprint,
    }


def latents_key(index: int) -> bytes:
    return b"latents_%08d" % index


def prompts_key(index: int) -> bytes:
    return b"prompts_%08d" % index


def row_checksum(latents_bytes: bytes, prompt_bytes: bytes) -> int:
    return zlib.crc32(prompt_bytes, zlib.crc32(latents_bytes))


# --------------------------------------------------------------------------------------------- writing
def write_ode_lmdb(path: str | os.PathLike, header: dict, rows: Iterable[tuple[str, np.ndarray]],
                   commit_every: int = 64) -> Path:
    """Write `header` and `rows` ((prompt, latents [P, F, C, H, W])) to `path` atomically (via `path`.tmp).

    `rows` may be a generator, so the pairs never all sit in memory; each must match the header's shape and
    dtype, and there must be exactly header["count"] of them.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"LMDB path {path} is a folder: expected a file name (the database is one file)")
    tmp = path.with_name(path.name + ".tmp")
    for leftover in (tmp, path.with_name(tmp.name + "-lock")):
        if leftover.exists():  # from an interrupted earlier run; ours to replace
            leftover.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    shape, dtype = tuple(header["shape"]), np.dtype(header["dtype"])
    row_bytes = math.prod(shape) * dtype.itemsize
    map_size = max(MAP_SIZE_FLOOR, int(header["count"] * row_bytes * MAP_SIZE_SLACK))

    import lmdb

    # lock=False: the temp file is ours alone; subdir=False: one file, so the final rename is atomic.
    env = lmdb.open(str(tmp), map_size=map_size, subdir=False, lock=False, meminit=True)
    try:
        written = 0
        checksums: list[int] = []
        txn = env.begin(write=True)
        for prompt, latents in rows:
            if tuple(latents.shape) != shape or latents.dtype != dtype:
                raise ValueError(f"row {written}: latents {tuple(latents.shape)} {latents.dtype}, header says {shape} {dtype}")
            latents_bytes = np.ascontiguousarray(latents).astype(dtype.newbyteorder("<")).tobytes()
            prompt_bytes = prompt.encode("utf-8")
            txn.put(latents_key(written), latents_bytes)
            txn.put(prompts_key(written), prompt_bytes)
            checksums.append(row_checksum(latents_bytes, prompt_bytes))
            written += 1
            if written % commit_every == 0:
                txn.commit()
                txn = env.begin(write=True)
        if written != header["count"]:
            raise ValueError(f"header says {header['count']} rows but {written} were written")
        header = {**header, "row_crc32": checksums}
        txn.put(HEADER_KEY, json.dumps(header, sort_keys=True).encode("utf-8"))
        txn.commit()
        env.sync(True)
    except BaseException as err:
        env.close()
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise DiskFull(path) from err
        raise
    env.close()
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- reading
@dataclass
class OdeRow:
    prompt: str
    latents: np.ndarray  # [P, F, C, H, W] in the header's dtype


# LMDB allows one environment per file per process: readers of the same file share it, counted here.
_SHARED_ENVS: dict[tuple[str, int], list] = {}  # (path, pid) -> [environment, number of readers]


def _open_shared(path: Path):
    import lmdb

    key = (str(path.resolve()), os.getpid())
    if key not in _SHARED_ENVS:
        try:
            env = lmdb.open(key[0], subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as err:
            raise UserError(f"ODE LMDB {path} cannot be opened ({err}): rebuild it with scripts/create_lmdb.py") from None
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = path.stat().st_size
        if size < needed:
            env.close()
            raise UserError(f"ODE LMDB {path} is truncated: {size} bytes, its pages need {needed} "
                            "(an interrupted copy?); copy it again or rebuild it with scripts/create_lmdb.py")
        _SHARED_ENVS[key] = [env, 0]
    _SHARED_ENVS[key][1] += 1
    return key, _SHARED_ENVS[key][0]


def _release_shared(key: tuple[str, int]) -> None:
    entry = _SHARED_ENVS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        entry[0].close()
        del _SHARED_ENVS[key]


class OdeLmdbReader:
    """Read-only access to an ODE-pair LMDB. Opens lazily per process, so it survives DataLoader workers' fork."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            hint = " (a folder: expected the single-file LMDB written by scripts/create_lmdb.py)" if self.path.is_dir() else ""
            raise UserError(f"ODE LMDB {self.path} not found{hint}: build it with scripts/create_lmdb.py")
        self._env = None
        self._key: tuple[str, int] | None = None
        self.header = self._read_header()
        self.shape = tuple(self.header["shape"])
        self.dtype = np.dtype(self.header["dtype"]).newbyteorder("<")

    def _environment(self):
        if self._key is None or self._key[1] != os.getpid():  # first use, or first use in a forked worker
            self._key, self._env = _open_shared(self.path)
        return self._env

    def _damaged(self, what: str) -> UserError:
        return UserError(f"ODE LMDB {self.path} is damaged ({what}): rebuild it with scripts/create_lmdb.py")

    def _get(self, key: bytes) -> bytes | None:
        import lmdb

        try:
            with self._environment().begin() as txn:
                return txn.get(key)
        except lmdb.Error as err:  # a corrupted page of the B-tree
            raise self._damaged(f"{type(err).__name__} reading {key.decode()}") from None

    def _read_header(self) -> dict:
        raw = self._get(HEADER_KEY)
        if raw is None:
            raise UserError(f"ODE LMDB {self.path} has no header record: expected a database built by scripts/create_lmdb.py")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._damaged("the header is not JSON") from None
        if header.get("format") != FORMAT_NAME or header.get("version") not in READABLE_VERSIONS:
            raise UserError(
                f"ODE LMDB {self.path} is format {header.get('format')} v{header.get('version')}: expected "
                f"{FORMAT_NAME} v{FORMAT_VERSION} (rebuild it with scripts/create_lmdb.py)"
            )
        checksums = header.get("row_crc32")
        if checksums is None:
            warnings.warn(f"ODE LMDB {self.path} is version {header['version']}, without row checksums: damaged rows "
                          "cannot be detected (rebuild it with scripts/create_lmdb.py to add them)", stacklevel=3)
        elif len(checksums) != header.get("count"):
            raise self._damaged(f"{len(checksums)} checksums for {header.get('count')} rows")
        return header

    def __len__(self) -> int:
        return int(self.header["count"])

    def read(self, index: int) -> OdeRow:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        latents_bytes, prompt_bytes = self._get(latents_key(index)), self._get(prompts_key(index))
        if latents_bytes is None or prompt_bytes is None:
            raise self._damaged(f"row {index} is missing")
        checksums = self.header.get("row_crc32")
        if checksums is not None and row_checksum(latents_bytes, prompt_bytes) != checksums[index]:
            raise self._damaged(f"row {index} fails its checksum")
        if len(latents_bytes) != math.prod(self.shape) * self.dtype.itemsize:
            raise self._damaged(f"row {index} holds {len(latents_bytes)} bytes, expected {self.shape} {self.dtype.name}")
        latents = np.frombuffer(latents_bytes, dtype=self.dtype).reshape(self.shape)
        return OdeRow(prompt=prompt_bytes.decode("utf-8", errors="replace"), latents=latents)

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        """Every key/value pair in key order (for comparing two databases)."""
        with self._environment().begin() as txn:
            yield from txn.cursor()

    def close(self) -> None:
        if self._key is not None and self._key[1] == os.getpid():
            _release_shared(self._key)
        self._env, self._key = None, None


__all__ = [
    "OdeLmdbReader",
    "OdeRow",
    "PairInfo",
    "pair_file_name",
    "read_pair_info",
    "read_pair_tensors",
    "scan_pair_folder",
    "write_pair_file",
    "describe_geometry",
    "fingerprint_fields",
    "fingerprint_of",
    "geometry_fingerprint",
    "make_header",
    "write_ode_lmdb",
]
