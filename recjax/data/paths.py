"""Where the data lives: an explicit path, else the RECJAX_DATA_DIR environment variable."""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "RECJAX_DATA_DIR"

GROUPLENS_URLS = {
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
}

_HOW_TO_GET = (
    "To get the data: `from recjax.data import download; download('ml-1m', DIR)` (or 'ml-100k'), which "
    "fetches and verifies the official GroupLens archives "
    + ", ".join(GROUPLENS_URLS.values())
    + f"; then pass data_dir=DIR or set {ENV_VAR}=DIR. The SASRec-form file ml-1m/ml-1m.sasrec.txt.gz "
    "(data/ml-1m.txt of the SASRec reference implementation, gzipped) is optional: without it "
    "load_ml1m_sequential builds the same sequences from the official archive."
)


def data_dir(explicit: str | os.PathLike | None = None, *, required: str | None = None) -> pathlib.Path:
    """Resolve the data root: ``explicit`` if given, else $RECJAX_DATA_DIR.

    ``required`` (a path relative to the root, e.g. "ml-1m/movies.dat") must exist too. Raises
    FileNotFoundError listing every place looked at, the environment variable and how to get the data.
    """
    env = os.environ.get(ENV_VAR)
    candidates: list[tuple[str, pathlib.Path]] = []
    if explicit is not None:
        candidates.append(("explicit data_dir argument", pathlib.Path(explicit).expanduser()))
    elif env:
        candidates.append((f"${ENV_VAR}", pathlib.Path(env).expanduser()))
    for _, root in candidates:
        if root.is_dir() and (required is None or (root / required).exists()):
            return root
    looked = [f"{why}: {root / required if required else root}" for why, root in candidates]
    if explicit is None and not env:
        looked.append(f"${ENV_VAR}: not set")
    what = f"'{required}'" if required else "the data directory"
    raise FileNotFoundError(f"could not find {what}. Looked at: " + "; ".join(looked) + ". " + _HOW_TO_GET)


def require_file(path: pathlib.Path) -> pathlib.Path:
    """A file a loader needs; missing -> FileNotFoundError with the path and how to get the data."""
    if not path.is_file():
        raise FileNotFoundError(f"could not find {path}. {_HOW_TO_GET}")
    return path
