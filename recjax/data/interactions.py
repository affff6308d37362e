"""Your own interaction log as a ``SequenceDataset``: ``load_interactions(path, format, ...)``.

Formats (plain text, UTF-8; gzip read transparently whatever the name, see ``textio.read_text``):

- ``csv`` / ``tsv``: a header line naming the columns, then one interaction per line, fields separated by
  ``,`` / a tab (csv quoting rules). Columns ``user``, ``item``, ``timestamp`` and optionally ``rating``;
  other columns are ignored. ``columns={"user": "userId", ...}`` renames them; ``timestamp=""`` means the
  file has none (file order is the order). A rating column is read when the header has one; naming it
  explicitly or setting ``min_rating`` makes it required.
- ``pairs``: ``user item`` per line (whitespace-separated), each user's lines in order: the ``ml-1m.txt``
  form of the SASRec repositories.
- ``sequences``: ``user item item ...`` per line, oldest first; several lines of one user are concatenated.

Raw ids are arbitrary strings (kept as written: "007" and "7" are different items). Steps, in this order:
``min_rating`` keeps the interactions rated >= it; k-core filtering drops users with fewer than
``user_core`` and items with fewer than ``item_core`` interactions, repeated until none is left to drop;
ids are renumbered over what is left, items 1..N (0 is padding) and users 0..U-1 (dataset rows), both in
order of first appearance in the file; each user's interactions are sorted by timestamp (stable: ties keep
file order). Duplicate (user, item) interactions are kept. The raw ids are in ``raw_item_ids`` (index = item
id, entry 0 = "") and ``raw_user_ids`` (index = row). Integer timestamps are kept as int64; fractional ones
order the interactions exactly and are stored truncated (``timestamps`` is int64).

A bad file raises ValueError naming the file, and where one line is at fault the line number and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from recjax.data.movielens import _first_appearance, _group_sequences
from recjax.data.textio import read_text
from recjax.data.types import SequenceDataset

FORMATS = ("csv", "tsv", "pairs", "sequences")
DEFAULT_COLUMNS = {"user": "user", "item": "item", "timestamp": "timestamp", "rating": "rating"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}


def _line_error(path: str, lineno: int, line: str, why: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {why}: {line!r}")


@dataclasses.dataclass
class _Rows:
    """Parsed interactions in file order, with the line of each (for errors found after parsing)."""

    users: list[str] = dataclasses.field(default_factory=list)
    items: list[str] = dataclasses.field(default_factory=list)
    linenos: list[int] = dataclasses.field(default_factory=list)
    times: list[str] | None = None
    ratings: list[str] | None = None


def _numbers(path: str, lines: list[str], rows: _Rows, raw: list[str], what: str) -> np.ndarray:
    """Column of numeric strings -> int64 if all are integers, else float64; the first bad one is an error."""
    try:
        return np.asarray(raw, dtype=np.int64) if raw else np.zeros(0, np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        values = np.asarray(raw, dtype=np.float64)
        bad = ~np.isfinite(values)
    except ValueError:
        bad = None
    if bad is None or bad.any():
        for k, s in enumerate(raw):
            try:
                ok = np.isfinite(float(s))
            except ValueError:
                ok = False
            if not ok:
                lineno = rows.linenos[k]
                raise _line_error(path, lineno, lines[lineno - 1], f"{what} {s!r} is not a finite number")
    return values


def _parse_table(path: str, lines: list[str], delimiter: str, columns: dict[str, str]) -> _Rows:
    rows = _Rows()
    # TSV has no quoting: a field starting with '"' must not swallow the tabs after it.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = None
    for fields in reader:
        lineno = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):  # blank line
            continue
        if header is None:
            header = [h.strip() for h in fields]
            where = {}
            for key in ("user", "item", "timestamp", "rating"):
                col = columns[key]
                if col and col in header:
                    where[key] = header.index(col)
                elif col and (key != "rating" or col != DEFAULT_COLUMNS["rating"]):
                    hint = ' (columns={"timestamp": ""} if the file has none)' if key == "timestamp" else ""
                    raise _line_error(
                        path, lineno, lines[lineno - 1], f"header has no {key} column {col!r}{hint}"
                    )
            iu, ii = where["user"], where["item"]
            it, ir = where.get("timestamp"), where.get("rating")
            rows.times = None if it is None else []
            rows.ratings = None if ir is None else []
            continue
        if len(fields) != len(header):
            why = (
                f"expected {len(header)} fields separated by {delimiter!r} (as the header), got {len(fields)}"
            )
            raise _line_error(path, lineno, lines[lineno - 1], why)
        user, item = fields[iu].strip(), fields[ii].strip()
        if not user or not item:
            raise _line_error(path, lineno, lines[lineno - 1], "empty user or item id")
        rows.users.append(user)
        rows.items.append(item)
        rows.linenos.append(lineno)
        if it is not None:
            rows.times.append(fields[it].strip())
        if ir is not None:
            rows.ratings.append(fields[ir].strip())
    if header is None:
        raise ValueError(f"{path}: empty file (expected a header line naming the columns)")
    return rows


def _parse_whitespace(path: str, lines: list[str], sequences: bool) -> _Rows:
    rows = _Rows()
    for lineno, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if sequences and len(parts) < 2:
            raise _line_error(path, lineno, line, "expected a user and at least one item")
        if not sequences and len(parts) != 2:
            raise _line_error(path, lineno, line, f"expected 2 fields (user item), got {len(parts)}")
        rows.users += [parts[0]] * (len(parts) - 1)
        rows.items += parts[1:]
        rows.linenos += [lineno] * (len(parts) - 1)
    return rows


def _codes(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Dense codes in order of first appearance, and the value of each code."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), np.int64, len(values))
    return codes, list(index)


def _k_core(users: np.ndarray, items: np.ndarray, keep: np.ndarray, user_core: int, item_core: int):
    """Drop users/items under their minimum count, again and again, until every one left meets it."""
    while True:
        user_n = np.bincount(users[keep], minlength=users.max() + 1)
        item_n = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (user_n[users] >= user_core) & (item_n[items] >= item_core)
        if new.sum() == keep.sum():
            return keep
        keep = new


def check_options(
    format: str,
    *,
    columns: Mapping[str, str] | None = None,
    min_rating: float | None = None,
    user_core: int = 0,
    item_core: int = 0,
) -> dict[str, str]:
    """``load_interactions``' options checked without reading the file; returns the full column names."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    cols = dict(DEFAULT_COLUMNS)
    if columns:
        unknown = set(columns) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(
                f"columns: unknown keys {sorted(unknown)}; expected some of {list(DEFAULT_COLUMNS)}"
            )
        cols.update(columns)
    if not cols["user"] or not cols["item"]:
        raise ValueError("columns: the user and item columns need names")
    for name, value in (("user_core", user_core), ("item_core", item_core)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if min_rating is not None and format not in _DELIMITERS:
        raise ValueError(f"min_rating: format {format!r} has no ratings (only csv/tsv have a rating column)")
    if min_rating is not None and not cols["rating"]:
        raise ValueError('min_rating: needs a rating column, but columns["rating"] is ""')
    return cols


def load_interactions(
    path: str | os.PathLike,
    format: str = "csv",
    *,
    columns: Mapping[str, str] | None = None,
    min_rating: float | None = None,
    user_core: int = 0,
    item_core: int = 0,
    name: str | None = None,
) -> SequenceDataset:
    """Reads an interaction file (module docstring: formats, filtering, id order) into a SequenceDataset.

    ``name`` defaults to the file name without its extensions ("clicks" for clicks.csv.gz).
    """
    cols = check_options(
        format, columns=columns, min_rating=min_rating, user_core=user_core, item_core=item_core
    )
    path = pathlib.Path(path).expanduser()
    src = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    lines = [line.removesuffix("\r") for line in read_text(path, encoding="utf-8-sig").split("\n")]
    if format in _DELIMITERS:
        rows = _parse_table(src, lines, _DELIMITERS[format], cols)
    else:
        rows = _parse_whitespace(src, lines, sequences=format == "sequences")
    if not rows.users:
        raise ValueError(f"{src}: empty file (no interactions)")
    times = None if rows.times is None else _numbers(src, lines, rows, rows.times, "timestamp")
    ratings = None if rows.ratings is None else _numbers(src, lines, rows, rows.ratings, "rating")
    if min_rating is not None and ratings is None:
        raise ValueError(f"{src}: min_rating={min_rating} needs a rating column {cols['rating']!r}")

    users, user_names = _codes(rows.users)
    items, item_names = _codes(rows.items)
    keep = np.ones(len(users), bool) if min_rating is None else ratings >= min_rating
    if user_core > 1 or item_core > 1:
        keep = _k_core(users, items, keep, user_core, item_core)
    if not keep.any():
        raise ValueError(
            f"{src}: no interactions left after filtering (min_rating={min_rating}, user_core={user_core}, "
            f"item_core={item_core}) of the {len(users)} read"
        )
    # new ids by first appearance in the file among the kept rows
    user_codes, users = _first_appearance(users[keep])
    item_codes, items = _first_appearance(items[keep])
    order = np.arange(len(users)) if times is None else np.argsort(times[keep], kind="stable")
    columns_out = [items[order].astype(np.int32)]
    if times is not None:
        columns_out.append(times[keep][order].astype(np.int64))
    if ratings is not None:
        columns_out.append(ratings[keep][order].astype(np.float32))
    grouped = _group_sequences(users[order], columns_out, len(user_codes) - 1)
    seqs = tuple(grouped[0])
    ts = tuple(grouped[1]) if times is not None else None
    rats = tuple(grouped[-1]) if ratings is not None else None
    if name is None:
        name = pathlib.Path(path.name.removesuffix(".gz")).stem
    return SequenceDataset(
        name=name,
        sequences=seqs,
        num_items=len(item_codes) - 1,
        timestamps=ts,
        ratings=rats,
        raw_item_ids=("", *(item_names[c] for c in item_codes[1:])),
        raw_user_ids=tuple(user_names[c] for c in user_codes[1:]),
    )
