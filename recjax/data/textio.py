"""The one reader of data text files: plain or gzip (detected by the magic bytes, so ``.gz`` or not).

Every loader in ``recjax.data`` reads through ``read_text`` so that a truncated or corrupt gzip file, or a
file that is not valid text in its encoding, raises ``ValueError`` naming the file (and, for a decoding
error, the line) instead of a bare ``EOFError`` / ``zlib.error`` from deep inside the decompressor.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

_GZIP_MAGIC = b"\x1f\x8b"


def read_text(path: str | os.PathLike, *, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The whole file decoded as text; gzip content is decompressed transparently.

    Raises FileNotFoundError for a missing file and ValueError naming the file for a truncated/corrupt gzip
    stream or (``errors="strict"``) bytes that do not decode, with the line number of the first bad byte.
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC or path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip file ({type(e).__name__}: {e})") from None
    try:
        return raw.decode(encoding, errors=errors)
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}, line {lineno}: not valid {encoding} text (byte {e.object[e.start : e.start + 1]!r} "
            f"at offset {e.start})"
        ) from None
