"""HyperCast's store (arXiv 2508.02929): target-aware embeddings (TAE) written by the foundation model's
inference, keyed by (user, item, FM version), read by expert training through the input pipeline.

Format (tensorstore zarr v3 arrays under one root; tensorstore is installed here and on the GPU image)::

    ROOT/manifest.json                  {"format": "recjax-tae-store/1", "versions": {"1": {...}}}
    ROOT/v<version>/<table>/tae         (2**40, D) float16/float32, chunks of ``chunk_rows`` rows
    ROOT/v<version>/<table>/keys        (2**40, 2) int32 (user, item), same chunks

A version holds named tables (e.g. "train", "valid", "test": one impression set each, every (user, item)
once). Arrays are created with an unbounded-in-practice row count and only written chunks take space.

Appends and crash safety: ``TAEWriter.append`` writes the new rows at [rows, rows + k) of both arrays, then
commits by rewriting the manifest (temporary file, fsync, ``os.replace``, fsync of the directory), so the
committed row count only moves after the data is on disk. Readers read rows below the committed count only.
A process killed mid-append leaves at most uncommitted rows past the count (overwritten by the next
append) and never touches another version's directory; the one chunk shared by committed and new rows is
rewritten whole by tensorstore's file driver (write to a temporary file, then rename), so it holds either
the old or the new bytes, both of which contain the committed rows. ``seal`` makes a version read-only.
One writer per table at a time (manifest updates take an ``fcntl`` lock on ``ROOT/.lock``).

Versions: a reader is pinned to one version (its snapshot of the row count); ``TAEReader.check_version``
and ``get(..., version=)`` reject another one with an error naming both, so an expert never mixes two FM
versions. A new version can be written (rolled forward) while readers of an older one keep reading.

Letters: K keys, D TAE width.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import re

import numpy as np
import tensorstore as ts

FORMAT = "recjax-tae-store/1"
MANIFEST = "manifest.json"
_MAX_ROWS = 2**40
_DTYPES = {"float16": ts.float16, "float32": ts.float32}
_TABLE_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class VersionMismatchError(ValueError):
    """An expert or batch asked for TAE of one FM version from a reader of another."""


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return (np.asarray(users, np.int64) << 32) | np.asarray(items, np.int64)


class TAEStore:
    """The store at ``path`` (created if absent); ``chunk_rows`` applies to versions created through it."""

    def __init__(self, path: str | os.PathLike, *, chunk_rows: int = 4096):
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows: expected > 0, got {chunk_rows}")
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.chunk_rows = chunk_rows
        if not (self.path / MANIFEST).exists():
            with self._locked():
                if not (self.path / MANIFEST).exists():
                    self._write_manifest({"format": FORMAT, "versions": {}})

    # -- manifest ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        with open(self.path / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def manifest(self) -> dict:
        m = json.loads((self.path / MANIFEST).read_text())
        if m.get("format") != FORMAT:
            raise ValueError(
                f"path: {self.path} is not a TAE store (format {m.get('format')!r}, want {FORMAT})"
            )
        return m

    def _write_manifest(self, m: dict) -> None:
        tmp = self.path / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(m, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)
        _fsync_dir(self.path)

    def versions(self) -> dict[int, dict]:
        return {int(v): info for v, info in self.manifest()["versions"].items()}

    def version_info(self, version: int) -> dict:
        info = self.versions().get(int(version))
        if info is None:
            raise KeyError(
                f"version: FM version {version} is not in the store {self.path} "
                f"(versions {sorted(self.versions())})"
            )
        return info

    def create_version(self, version: int, dim: int, *, dtype: str = "float16", note: str = "") -> None:
        """Registers FM ``version`` (a positive int) with TAE width ``dim``; it must not exist yet."""
        if not isinstance(version, int | np.integer) or version <= 0:
            raise ValueError(f"version: expected a positive int, got {version!r}")
        if dim <= 0:
            raise ValueError(f"dim: expected > 0, got {dim}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        with self._locked():
            m = self.manifest()
            if str(version) in m["versions"]:
                raise ValueError(f"version: FM version {version} already exists in {self.path}")
            m["versions"][str(version)] = {
                "dim": int(dim),
                "dtype": dtype,
                "note": note,
                "sealed": False,
                "chunk_rows": self.chunk_rows,
                "tables": {},
            }
            self._write_manifest(m)

    def seal(self, version: int) -> None:
        """Makes ``version`` read-only (experts train on sealed versions)."""
        with self._locked():
            m = self.manifest()
            self.version_info(version)
            m["versions"][str(version)]["sealed"] = True
            self._write_manifest(m)

    def _commit_rows(self, version: int, table: str, old_rows: int, new_rows: int) -> None:
        with self._locked():
            m = self.manifest()
            info = m["versions"][str(version)]
            if info["sealed"]:
                raise ValueError(f"version: FM version {version} is sealed (read-only)")
            got = info["tables"].get(table, {"rows": 0})["rows"]
            if got != old_rows:
                raise RuntimeError(
                    f"table {table!r} of version {version}: another writer appended "
                    f"({got} rows committed, this writer expected {old_rows})"
                )
            info["tables"][table] = {"rows": int(new_rows)}
            self._write_manifest(m)

    # -- arrays -----------------------------------------------------------------------------------------
    def _open(self, version: int, table: str, name: str, *, create: bool):
        info = self.version_info(version)
        width, dtype = (info["dim"], _DTYPES[info["dtype"]]) if name == "tae" else (2, ts.int32)
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(self.path / f"v{version}" / table / name)},
        }
        if create:
            layout = ts.ChunkLayout(chunk_shape=[info["chunk_rows"], width])
            return ts.open(
                spec, open=True, create=True, dtype=dtype, shape=[_MAX_ROWS, width], chunk_layout=layout
            ).result()
        return ts.open(spec, open=True).result()

    def writer(self, version: int, table: str) -> TAEWriter:
        if not _TABLE_RE.match(table):
            raise ValueError(f"table: expected letters, digits, '_' or '-', got {table!r}")
        if self.version_info(version)["sealed"]:
            raise ValueError(f"version: FM version {version} is sealed (read-only)")
        return TAEWriter(self, int(version), table)

    def reader(self, version: int, table: str, *, require_sealed: bool = False) -> TAEReader:
        info = self.version_info(version)
        if require_sealed and not info["sealed"]:
            raise ValueError(f"version: FM version {version} is not sealed yet (still being written)")
        if table not in info["tables"]:
            raise KeyError(
                f"table: version {version} has no table {table!r} (tables {sorted(info['tables'])})"
            )
        return TAEReader(self, int(version), table, info["tables"][table]["rows"], info["dim"])


class TAEWriter:
    """Appends (user, item) -> TAE rows to one table of one version; each ``append`` is committed."""

    def __init__(self, store: TAEStore, version: int, table: str):
        self.store, self.version, self.table = store, version, table
        self.dim = store.version_info(version)["dim"]
        self.rows = store.version_info(version)["tables"].get(table, {"rows": 0})["rows"]
        self._tae = store._open(version, table, "tae", create=True)
        self._keys = store._open(version, table, "keys", create=True)
        keys = (
            np.asarray(self._keys[: self.rows].read().result()) if self.rows else np.zeros((0, 2), np.int32)
        )
        self._seen = np.sort(_key(keys[:, 0], keys[:, 1]))

    def append(self, users: np.ndarray, items: np.ndarray, tae_KxD: np.ndarray) -> None:
        users, items, tae_KxD = np.asarray(users), np.asarray(items), np.asarray(tae_KxD)
        k = len(users)
        if users.shape != (k,) or items.shape != (k,):
            raise ValueError(f"users / items: expected equal 1-D shapes, got {users.shape} / {items.shape}")
        if tae_KxD.shape != (k, self.dim):
            raise ValueError(f"tae_KxD: expected shape ({k}, {self.dim}), got {tae_KxD.shape}")
        if tae_KxD.dtype.kind != "f" or not np.isfinite(tae_KxD).all():
            raise ValueError("tae_KxD: expected finite floating values")
        if k and (users.min() < 0 or items.min() < 0 or max(users.max(), items.max()) >= 2**31):
            raise ValueError("users / items: expected ids in [0, 2**31)")
        keys = _key(users, items)
        new = np.sort(keys)
        dup = (len(np.unique(new)) != k) or np.isin(new, self._seen).any()
        if dup:
            raise ValueError(
                f"users / items: a (user, item) key is already in table {self.table!r} of "
                f"version {self.version} (or repeated in this append)"
            )
        if not k:
            return
        lo, hi = self.rows, self.rows + k
        w1 = self._tae[lo:hi].write(tae_KxD.astype(self._tae.dtype.numpy_dtype))
        w2 = self._keys[lo:hi].write(np.stack([users, items], 1).astype(np.int32))
        w1.result()
        w2.result()
        self.store._commit_rows(self.version, self.table, lo, hi)
        self.rows = hi
        self._seen = np.sort(np.concatenate([self._seen, new]))


class TAEReader:
    """A snapshot (committed rows at open) of one table of one version: random reads by (user, item)."""

    def __init__(self, store: TAEStore, version: int, table: str, rows: int, dim: int):
        self.store, self.version, self.table, self.rows, self.dim = store, version, table, rows, dim
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 30}})

        def spec(n):
            path = str(store.path / f"v{version}" / table / n)
            return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}

        self._tae = ts.open(spec("tae"), open=True, context=ctx).result()
        keys = np.asarray(ts.open(spec("keys"), open=True).result()[:rows].read().result())
        k = _key(keys[:, 0], keys[:, 1])
        self._order = np.argsort(k, kind="stable")
        self._sorted = k[self._order]

    def check_version(self, expected: int) -> None:
        if int(expected) != self.version:
            raise VersionMismatchError(
                f"FM version mismatch: expected TAE of version {expected}, this reader holds version "
                f"{self.version} (table {self.table!r}); an expert never mixes two FM versions"
            )

    def rows_of(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = _key(users, items)
        idx = np.minimum(np.searchsorted(self._sorted, keys), max(len(self._sorted) - 1, 0))
        found = (self._sorted[idx] == keys) if len(self._sorted) else np.zeros(len(keys), bool)
        if not found.all():
            i = int(np.argmin(found))
            raise KeyError(
                f"users / items: no TAE for (user {int(np.asarray(users)[i])}, item "
                f"{int(np.asarray(items)[i])}) in table {self.table!r} of version {self.version} "
                f"({int((~found).sum())} of {len(keys)} keys missing)"
            )
        return self._order[idx]

    def get(self, users: np.ndarray, items: np.ndarray, *, version: int | None = None) -> np.ndarray:
        """(K, D) float32 TAE of each (user, item); ``version``, if given, must be this reader's."""
        if version is not None:
            self.check_version(version)
        rows = self.rows_of(users, items)
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 4 * len(rows):  # near-contiguous (evaluation reads rows in order): one slab
            return np.asarray(self._tae[lo:hi].read().result(), np.float32)[rows - lo]
        return np.asarray(self._tae[rows].read().result(), np.float32)

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys_Kx2 (user, item), tae_KxD float32) in row order."""
        if not self.rows:
            return np.zeros((0, 2), np.int32), np.zeros((0, self.dim), np.float32)
        keys = self._sorted[np.argsort(self._order)]
        k2 = np.stack([keys >> 32, keys & 0xFFFFFFFF], 1).astype(np.int32)
        return k2, np.asarray(self._tae[: self.rows].read().result(), np.float32)
