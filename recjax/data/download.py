"""Fetch and verify the official GroupLens MovieLens archives (urllib; http(s) and file:// URLs).

Published MD5 checksums: GroupLens serves ``<archive>.zip.md5`` next to each archive. Values below as quoted
from those files in public code (not fetched here, no network): ml-1m from a verification script whose
comment reads "From: curl -O http://files.grouplens.org/datasets/movielens/ml-1m.zip.md5"
("MD5 (ml-1m.zip) = c4d9eecfca2ab87c1945afe126590906"); both values also in
github.com/eli-osherovich/papers_with_code, datasets/movielens/dl_config.py. A caller may pass its own
``checksum`` ("sha256:<hex>", "md5:<hex>", or bare hex: 32 digits = MD5, 64 = SHA-256).

The archives hold the official files only (ml-1m/ratings.dat, movies.dat, users.dat; ml-100k/u.data, ...):
load them with ``load_ml1m_ratings(dest_dir / "ml-1m")`` and ``load_ml100k(dest_dir)``. The SASRec-form file
``ml-1m.sasrec.txt.gz`` is not part of them; ``load_ml1m_ratings`` rebuilds the same sequences.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.request
import zipfile

from recjax.data.paths import GROUPLENS_URLS

PUBLISHED_MD5 = {
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
}
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """The downloaded archive does not match the expected checksum (the file has been removed)."""


def _parse_checksum(name: str, checksum: str | None) -> tuple[str, str]:
    if checksum is None:
        return "md5", PUBLISHED_MD5[name]
    algo, _, digest = checksum.rpartition(":")
    digest = digest.strip().lower()
    algo = algo.lower() or {32: "md5", 64: "sha256"}.get(len(digest), "")
    want_len = {"md5": 32, "sha256": 64}.get(algo)
    if want_len is None or len(digest) != want_len or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(
            f"checksum: expected 'sha256:<64 hex>', 'md5:<32 hex>' or bare hex (32/64), got {checksum!r}"
        )
    return algo, digest


def _fetch(url: str, part: pathlib.Path, algo: str, timeout: float) -> str:
    hasher = hashlib.new(algo)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
        while chunk := response.read(_CHUNK):
            hasher.update(chunk)
            out.write(chunk)
    return hasher.hexdigest()


def _file_digest(path: pathlib.Path, algo: str) -> str:
    hasher = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _safe_extract(archive: pathlib.Path, dest: pathlib.Path) -> None:
    root = dest.resolve()
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            target = (root / member).resolve()
            if not target.is_relative_to(root):
                raise ValueError(f"{archive}: member {member!r} would extract outside {root}; refusing")
        z.extractall(root)


def download(
    name: str,
    dest_dir: str | os.PathLike,
    *,
    url: str | None = None,
    checksum: str | None = None,
    timeout: float = 120.0,
) -> pathlib.Path:
    """Download ``name`` ("ml-1m" or "ml-100k") into ``dest_dir``, verify it, extract it.

    Returns the extracted folder ``dest_dir / name``. ``url`` overrides the GroupLens address (e.g. a mirror
    or a file:// URL); ``checksum`` overrides the published MD5. An archive already in ``dest_dir`` that
    verifies is reused. On a mismatch the downloaded file is deleted and ChecksumError is raised.
    """
    if name not in GROUPLENS_URLS:
        raise ValueError(f"name: expected one of {sorted(GROUPLENS_URLS)}, got {name!r}")
    algo, expected = _parse_checksum(name, checksum)
    url = url or GROUPLENS_URLS[name]
    dest = pathlib.Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"{name}.zip"
    if not (archive.is_file() and _file_digest(archive, algo) == expected):
        part = dest / f"{name}.zip.part"
        try:
            got = _fetch(url, part, algo, timeout)
        except BaseException as e:
            part.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise OSError(f"download of {name} from {url} failed: {e}") from e
            raise
        if got != expected:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"checksum mismatch for {name} from {url}: expected {algo} {expected}, got {got}; "
                "the downloaded file was removed (a corrupt or different archive: retry, or pass the "
                "checksum of the file you trust)"
            )
        part.replace(archive)
    _safe_extract(archive, dest)
    out = dest / name
    if not out.is_dir():
        raise ValueError(f"{archive}: expected the archive to hold a top-level folder {name}/")
    return out
