"""MovieLens loaders: the SASRec form of ML-1M, the official ML-1M archive, and ML-100K.

All loaders return a ``SequenceDataset`` (ids 1-based, each user's items oldest first) with side features:

- item ``genres`` (num_items + 1, 18) multi-hot over the 18 MovieLens genres (``GENRES`` order);
  item ``year_bucket`` (num_items + 1, 1): 1 + index of the release year among ``YEAR_EDGES`` (0 = unknown
  or padding), so 1 = before 1930 ... 10 = 1998 and later (finer in the 1990s, where most films are).
- user ``gender`` (U, 1): 1 = F, 2 = M; ``age`` (U, 1): 1 + index of the ML-1M age group (``AGE_GROUPS``,
  ML-100K raw ages are bucketed into the same groups); ``occupation`` (U, 1): 1 + ML-1M occupation code
  (ML-100K: 1 + index in u.occupation). 0 always means unknown. ``FEATURE_SIZES`` gives each vocabulary.

Malformed lines raise ValueError naming the file, the line number and the line.

Re-indexing in ``load_ml1m_ratings`` (``min_count=5``, ``reindex=True``): like SASRec's preprocessing, user
and item counts are taken once over all ratings and ratings of users or items with fewer than ``min_count``
are dropped. Users are then numbered 1..U by the time of their first rating and items 1..N by first
appearance when reading the users in that order, each user's ratings oldest first. That is the structure of
the SASRec file (checked: its item ids are exactly first-appearance ids in user-major order, and its user 1
is original user 5988, one of the earliest); the exact tie-breaking could not be checked because ratings.dat
is not available here, so ids may differ from SASRec's by a relabelling. ``load_ml1m_ratings`` reproduces
the SASRec file exactly from a ratings.dat rebuilt from it (tests/data).
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import zipfile

import numpy as np

from recjax.data.paths import data_dir as resolve_data_dir
from recjax.data.paths import require_file
from recjax.data.textio import read_text
from recjax.data.types import SequenceDataset

GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
YEAR_EDGES = (1930, 1940, 1950, 1960, 1970, 1980, 1990, 1995, 1998)
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ML-1M codes: "under 18", "18-24", ..., "56+"
FEATURE_SIZES = {
    "genres": len(GENRES),  # multi-hot width
    "year_bucket": len(YEAR_EDGES) + 2,
    "gender": 3,
    "age": len(AGE_GROUPS) + 1,
    "occupation": 22,
}
_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


# ----------------------------------------------------------------------------------------------- parsing
def _bad_line(path: str, text: str, sep: str | None, ncols: int, int_cols: tuple[int, ...]) -> ValueError:
    """Scan line by line (slow path, only after the fast parser failed) for the first malformed line."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        why = None
        if len(parts) != ncols:
            why = f"expected {ncols} fields separated by {sep or 'whitespace'!r}, got {len(parts)}"
        else:
            for c in int_cols:
                try:
                    int(parts[c])
                except ValueError:
                    why = f"field {c + 1} ({parts[c]!r}) is not an integer"
                    break
        if why:
            return ValueError(f"{path}, line {lineno}: {why}: {line!r}")
    return ValueError(f"{path}: could not parse (no single malformed line found)")


def _line_error(path: str, text: str, row: int, why: str) -> ValueError:
    """Error for data row ``row`` (0-based, blank lines skipped) with its 1-based line number."""
    seen = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            seen += 1
            if seen == row:
                return ValueError(f"{path}, line {lineno}: {why}: {line!r}")
    return ValueError(f"{path}: {why} (row {row})")


def _int_table(path: str, text: str, sep: str | None, ncols: int) -> np.ndarray:
    """Parse an all-integer table fast (numpy's C reader); on failure, find the bad line for the message."""
    body = text if sep in (None, " ", "\t") else text.replace(sep, "\t")
    delimiter = None if sep is None else (" " if sep == " " else "\t")
    try:
        table = np.loadtxt(io.StringIO(body), dtype=np.int64, delimiter=delimiter, comments=None, ndmin=2)
    except ValueError:
        raise _bad_line(path, text, sep, ncols, tuple(range(ncols))) from None
    if table.size == 0:
        raise ValueError(f"{path}: no data rows")
    if table.shape[1] != ncols:
        raise _bad_line(path, text, sep, ncols, tuple(range(ncols)))
    return table


def _check_min(path: str, text: str, column: np.ndarray, low: int, what: str) -> None:
    bad = column < low
    if bad.any():
        row = int(np.argmax(bad))
        raise _line_error(path, text, row, f"{what} must be >= {low}, got {int(column[row])}")


def _split_rows(path: str, text: str, sep: str, ncols: int) -> list[tuple[int, list[str]]]:
    """Small metadata files with text fields: (line number, fields) per non-blank line."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != ncols:
            why = f"expected {ncols} fields separated by {sep!r}, got {len(parts)}"
            raise ValueError(f"{path}, line {lineno}: {why}: {line!r}")
        rows.append((lineno, parts))
    return rows


def _int_field(path: str, lineno: int, line_parts: list[str], col: int, sep: str) -> int:
    try:
        return int(line_parts[col])
    except ValueError:
        raise ValueError(
            f"{path}, line {lineno}: field {col + 1} ({line_parts[col]!r}) is not an integer: "
            f"{sep.join(line_parts)!r}"
        ) from None


def _group_sequences(users: np.ndarray, columns: list[np.ndarray], num_users: int) -> list[tuple]:
    """Split aligned columns by user (1-based ids), keeping the given row order within each user."""
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=num_users + 1)[1:]
    bounds = np.cumsum(counts)[:-1]
    return [tuple(np.split(c[order], bounds)) for c in columns]


# --------------------------------------------------------------------------------------------- features
def _year_bucket(year: int | None) -> int:
    return 0 if year is None else 1 + int(np.searchsorted(YEAR_EDGES, year, side="right"))


def _age_group(age: int) -> int:
    return int(np.searchsorted(AGE_GROUPS, age, side="right"))  # 1 .. len(AGE_GROUPS)


def _ml1m_item_features(
    path: str, text: str, original_ids: np.ndarray, allow_missing: bool = False
) -> dict[str, np.ndarray]:
    """``original_ids[k]`` = MovieLens id of item k (index 0 unused)."""
    by_movie = {}
    for lineno, parts in _split_rows(path, text, "::", 3):
        movie = _int_field(path, lineno, parts, 0, "::")
        genres = np.zeros(len(GENRES), np.int32)
        for g in parts[2].split("|"):
            if g not in GENRES:
                raise ValueError(f"{path}, line {lineno}: unknown genre {g!r}: {'::'.join(parts)!r}")
            genres[GENRES.index(g)] = 1
        m = _YEAR_RE.search(parts[1])
        by_movie[movie] = (genres, _year_bucket(int(m.group(1)) if m else None))
    return _item_feature_arrays(path, by_movie, original_ids, allow_missing)


def _item_feature_arrays(path, by_movie, original_ids, allow_missing=False) -> dict[str, np.ndarray]:
    """Missing movies are an error, or (``allow_missing``: ids never rated) all-zero "unknown" rows."""
    genres = np.zeros((len(original_ids), len(GENRES)), np.int32)
    year = np.zeros((len(original_ids), 1), np.int32)
    for k in range(1, len(original_ids)):
        if int(original_ids[k]) not in by_movie:
            if allow_missing:
                continue
            raise ValueError(f"{path}: no row for movie id {int(original_ids[k])} (item {k})")
        genres[k], year[k, 0] = by_movie[int(original_ids[k])]
    return {"genres": genres, "year_bucket": year}


def _ml1m_user_features(path: str, text: str, original_ids: np.ndarray) -> dict[str, np.ndarray]:
    """``original_ids[u]`` = MovieLens user id of dataset row u."""
    by_user = {}
    for lineno, parts in _split_rows(path, text, "::", 5):
        user = _int_field(path, lineno, parts, 0, "::")
        if parts[1] not in ("F", "M"):
            raise ValueError(f"{path}, line {lineno}: gender must be F or M: {'::'.join(parts)!r}")
        age = _int_field(path, lineno, parts, 2, "::")
        occupation = _int_field(path, lineno, parts, 3, "::")
        if age not in AGE_GROUPS or not 0 <= occupation <= 20:
            raise ValueError(
                f"{path}, line {lineno}: age or occupation code out of range: {'::'.join(parts)!r}"
            )
        by_user[user] = (1 + (parts[1] == "M"), 1 + AGE_GROUPS.index(age), 1 + occupation)
    return _user_feature_arrays(path, by_user, original_ids)


def _user_feature_arrays(path, by_user, original_ids) -> dict[str, np.ndarray]:
    missing = [int(u) for u in original_ids if int(u) not in by_user]
    if missing:
        raise ValueError(f"{path}: no row for user id {missing[0]} ({len(missing)} users missing)")
    codes = np.asarray([by_user[int(u)] for u in original_ids], np.int32).reshape(len(original_ids), 3)
    return {"gender": codes[:, 0:1], "age": codes[:, 1:2], "occupation": codes[:, 2:3]}


def _read_text(path: pathlib.Path) -> str:
    # MovieLens metadata is ISO-8859-1 (accented titles); ids and ratings are ASCII either way.
    return read_text(path, encoding="latin-1")


def _read_id_map(path: pathlib.Path) -> np.ndarray:
    """``sas_id original_id`` lines -> array a with a[sas_id] = original_id (a[0] = 0)."""
    text = _read_text(require_file(path))
    table = _int_table(str(path), text, " ", 2)
    _check_min(str(path), text, table, 1, "ids")
    out = np.zeros(table[:, 0].max() + 1, np.int64)
    out[table[:, 0]] = table[:, 1]
    if len(np.unique(table[:, 0])) != len(table) or (out[1:] == 0).any():
        raise ValueError(f"{path}: sas ids must be unique and cover 1..{len(out) - 1}")
    return out


# ----------------------------------------------------------------------------------------------- loaders
def load_ml1m_sequential(data_dir: str | os.PathLike | None = None) -> SequenceDataset:
    """ML-1M in the SASRec form (ml-1m/ml-1m.sasrec.txt.gz): 6040 users, 3416 items, 999611 interactions.

    No ratings or timestamps in this form. Side features come from movies.dat / users.dat through
    sas_to_original_items.txt / sas_to_original_users.txt. Where the SASRec file is absent but the official
    archive is there (ml-1m/ratings.dat or ml-1m.zip, as ``download("ml-1m", DIR)`` leaves it), the same
    sequences are built from it with ``load_ml1m_ratings`` (ratings and timestamps then included).
    """
    try:
        root = resolve_data_dir(data_dir, required="ml-1m/ml-1m.sasrec.txt.gz") / "ml-1m"
    except FileNotFoundError:
        for official in ("ml-1m/ratings.dat", "ml-1m.zip"):
            try:
                base = resolve_data_dir(data_dir, required=official)
            except FileNotFoundError:
                continue
            return load_ml1m_ratings(base / official.removesuffix("/ratings.dat"), name="ml-1m")
        raise
    path = root / "ml-1m.sasrec.txt.gz"
    text = read_text(path, encoding="ascii", errors="replace")
    table = _int_table(str(path), text, " ", 2)
    _check_min(str(path), text, table.min(axis=1), 1, "user and item ids")
    users, items = table[:, 0], table[:, 1]
    num_users, num_items = int(users.max()), int(items.max())
    (sequences,) = _group_sequences(users, [items.astype(np.int32)], num_users)

    item_map = _read_id_map(root / "sas_to_original_items.txt")
    user_map = _read_id_map(root / "sas_to_original_users.txt")
    if len(item_map) != num_items + 1 or len(user_map) != num_users + 1:
        raise ValueError(
            f"{root}: id maps cover {len(item_map) - 1} items / {len(user_map) - 1} users, "
            f"the sequence file has {num_items} / {num_users}"
        )
    movies = root / "movies.dat"
    users_dat = root / "users.dat"
    return SequenceDataset(
        name="ml-1m",
        sequences=tuple(sequences),
        num_items=num_items,
        item_features=_ml1m_item_features(str(movies), _read_text(require_file(movies)), item_map),
        user_features=_ml1m_user_features(str(users_dat), _read_text(require_file(users_dat)), user_map[1:]),
    )


def _archive_reader(path: pathlib.Path):
    """name -> text or None, for an ml-1m directory or the official ml-1m.zip (files under ml-1m/)."""
    if path.is_file() and zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        names = {pathlib.PurePosixPath(n).name: n for n in archive.namelist()}

        def read(name):
            return archive.read(names[name]).decode("latin-1") if name in names else None

        return read, lambda name: f"{path}!{names.get(name, name)}"
    if path.is_dir():
        base = path / "ml-1m" if not (path / "ratings.dat").exists() and (path / "ml-1m").is_dir() else path

        def read(name):
            return _read_text(base / name) if (base / name).is_file() else None

        return read, lambda name: str(base / name)
    raise FileNotFoundError(
        f"{path}: expected a directory holding ratings.dat or the official ml-1m.zip; "
        "see recjax.data.download('ml-1m', DIR)"
    )


def load_ml1m_ratings(
    path: str | os.PathLike, *, min_count: int = 5, reindex: bool = True, name: str = "ml-1m-ratings"
) -> SequenceDataset:
    """ML-1M from the official files (a directory with ratings.dat, movies.dat, users.dat, or ml-1m.zip).

    Each user's ratings are sorted by timestamp (stable: ties keep file order); ratings and timestamps are
    kept. ``min_count`` > 0 drops ratings of users/items with fewer ratings (counted once, as in SASRec);
    ``reindex`` numbers users by first rating time and items by first appearance (module docstring);
    otherwise items keep MovieLens ids (num_items = the largest; unrated ids get all-zero features) and
    users are in MovieLens id order.
    """
    read, where = _archive_reader(pathlib.Path(path).expanduser())
    text = read("ratings.dat")
    if text is None:
        raise FileNotFoundError(f"{where('ratings.dat')} not found; see recjax.data.download('ml-1m', DIR)")
    src = where("ratings.dat")
    table = _int_table(src, text, "::", 4)
    _check_min(src, text, table[:, :2].min(axis=1), 1, "user and movie ids")
    bad = (table[:, 2] < 1) | (table[:, 2] > 5)
    if bad.any():
        raise _line_error(
            src, text, int(np.argmax(bad)), f"rating must be in 1..5, got {table[np.argmax(bad), 2]}"
        )
    users, items, ratings, times = table.T
    if min_count > 0:
        keep = (np.bincount(users)[users] >= min_count) & (np.bincount(items)[items] >= min_count)
        users, items, ratings, times = users[keep], items[keep], ratings[keep], times[keep]
        if not keep.any():
            raise ValueError(f"{src}: no ratings left after min_count={min_count} filtering")
    if reindex:
        # users ordered by their first rating time; items by first appearance user by user
        first_time = np.full(users.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(first_time, users, times)
        present = np.unique(users)
        user_ids = np.concatenate([[0], present[np.lexsort((present, first_time[present]))]])
        rank = np.zeros(users.max() + 1, np.int64)
        rank[user_ids[1:]] = np.arange(1, len(user_ids))
        users = rank[users]
        order = np.lexsort((times, users))  # stable: equal times keep file order
        users, items, ratings, times = users[order], items[order], ratings[order], times[order]
        item_ids, items = _first_appearance(items)
    else:
        user_ids = np.concatenate([[0], np.unique(users)])
        item_ids = np.arange(items.max() + 1)
        users = np.searchsorted(user_ids, users)
        order = np.argsort(times, kind="stable")
        users, items, ratings, times = users[order], items[order], ratings[order], times[order]
    num_users = len(user_ids) - 1
    seqs, rats, ts = _group_sequences(
        users, [items.astype(np.int32), ratings.astype(np.float32), times.astype(np.int64)], num_users
    )
    movies, users_dat = read("movies.dat"), read("users.dat")
    return SequenceDataset(
        name=name,
        sequences=tuple(seqs),
        num_items=len(item_ids) - 1,
        item_features={}
        if movies is None
        else _ml1m_item_features(where("movies.dat"), movies, item_ids, not reindex),
        user_features={}
        if users_dat is None
        else _ml1m_user_features(where("users.dat"), users_dat, user_ids[1:]),
        timestamps=tuple(ts),
        ratings=tuple(rats),
    )


def _first_appearance(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original id of each new id, with [0] = 0; ids relabelled 1..N by first appearance)."""
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(uniq) + 1)
    originals = np.zeros(len(uniq) + 1, np.int64)
    originals[rank] = uniq
    return originals, rank[inverse]


def load_ml100k(data_dir: str | os.PathLike | None = None) -> SequenceDataset:
    """ML-100K from ml-100k/u.data (+ u.item genres/year, u.user): 943 users, 1682 items, 100000 ratings.

    Original ids are kept (they are already 1..N). Each user's ratings are sorted by timestamp (stable);
    ratings and timestamps are kept for rating / multi-task experiments.
    """
    root = resolve_data_dir(data_dir, required="ml-100k/u.data") / "ml-100k"
    path = root / "u.data"
    text = _read_text(path)
    table = _int_table(str(path), text, "\t", 4)
    _check_min(str(path), text, table[:, :2].min(axis=1), 1, "user and item ids")
    users, items, ratings, times = table.T
    chrono = np.argsort(times, kind="stable")
    num_users, num_items = int(users.max()), int(items.max())
    seqs, rats, ts = _group_sequences(
        users[chrono],
        [items[chrono].astype(np.int32), ratings[chrono].astype(np.float32), times[chrono].astype(np.int64)],
        num_users,
    )
    return SequenceDataset(
        name="ml-100k",
        sequences=tuple(seqs),
        num_items=num_items,
        item_features=_ml100k_item_features(root / "u.item", num_items),
        user_features=_ml100k_user_features(root, num_users),
        timestamps=tuple(ts),
        ratings=tuple(rats),
    )


def _ml100k_item_features(path: pathlib.Path, num_items: int) -> dict[str, np.ndarray]:
    by_movie = {}
    for lineno, parts in _split_rows(str(path), _read_text(require_file(path)), "|", 24):
        movie = _int_field(str(path), lineno, parts, 0, "|")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise ValueError(f"{path}, line {lineno}: genre flags must be 0/1: {'|'.join(parts)!r}")
        genres = np.asarray([int(f) for f in flags[1:]], np.int32)  # flags[0] is "unknown"
        m = re.search(r"(\d{4})$", parts[2].strip())
        by_movie[movie] = (genres, _year_bucket(int(m.group(1)) if m else None))
    return _item_feature_arrays(str(path), by_movie, np.arange(num_items + 1))


def _ml100k_user_features(root: pathlib.Path, num_users: int) -> dict[str, np.ndarray]:
    occupations = [
        o.strip() for o in _read_text(require_file(root / "u.occupation")).splitlines() if o.strip()
    ]
    path = root / "u.user"
    by_user = {}
    for lineno, parts in _split_rows(str(path), _read_text(require_file(path)), "|", 5):
        user = _int_field(str(path), lineno, parts, 0, "|")
        age = _int_field(str(path), lineno, parts, 1, "|")
        if parts[2] not in ("F", "M") or parts[3] not in occupations:
            raise ValueError(f"{path}, line {lineno}: unknown gender or occupation: {'|'.join(parts)!r}")
        by_user[user] = (1 + (parts[2] == "M"), _age_group(age), 1 + occupations.index(parts[3]))
    return _user_feature_arrays(str(path), by_user, np.arange(1, num_users + 1))
