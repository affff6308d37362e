"""Interaction files: each format, string ids, gzip, timestamp order, filters, id order and every bad file."""

import gzip
import re

import numpy as np
import pytest

from recjax.data import movielens, synthetic
from recjax.data.interactions import load_interactions


def _write(path, text, gz=False):
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _by_raw(ds):
    """{raw user: [raw items, oldest first]}: what the file said, independent of the new ids."""
    return {u: [ds.raw_item_ids[i] for i in s] for u, s in zip(ds.raw_user_ids, ds.sequences)}


CSV = """user,item,timestamp,rating
bob,The Matrix,30,5
alice,Heat,20,4
bob,Heat,10,3.5
alice,"Up, the film",20,2
carol,Heat,5,1
alice,The Matrix,1,5
"""


def test_csv_string_ids_sorted_by_time_with_ratings(tmp_path):
    ds = load_interactions(_write(tmp_path / "log.csv", CSV), "csv")
    assert ds.name == "log"
    # users 0.. and items 1.. in order of first appearance in the file
    assert ds.raw_user_ids == ("bob", "alice", "carol")
    assert ds.raw_item_ids == ("", "The Matrix", "Heat", "Up, the film")
    assert [s.tolist() for s in ds.sequences] == [[2, 1], [1, 2, 3], [2]]  # alice's tie keeps file order
    assert [t.tolist() for t in ds.timestamps] == [[10, 30], [1, 20, 20], [5]]
    assert [r.tolist() for r in ds.ratings] == [[3.5, 5.0], [5.0, 4.0, 2.0], [1.0]]
    assert ds.sequences[0].dtype == np.int32 and ds.timestamps[0].dtype == np.int64
    assert ds.ratings[0].dtype == np.float32 and ds.num_items == 3 and ds.num_interactions == 6


def test_tsv_renamed_columns_extra_column_no_timestamp(tmp_path):
    text = "session\tclicked\tcountry\n7\tx\tDE\n\n8\ty\tFR\n7\tz\tDE\n"
    path = _write(tmp_path / "clicks.tsv", text)
    ds = load_interactions(path, "tsv", columns={"user": "session", "item": "clicked", "timestamp": ""})
    assert _by_raw(ds) == {"7": ["x", "z"], "8": ["y"]}
    assert ds.timestamps is None and ds.ratings is None  # no rating column in the header: none read


def test_fractional_timestamps_order_exactly(tmp_path):
    path = _write(tmp_path / "t.csv", "user,item,timestamp\nu,a,1.75\nu,b,1.25\nu,c,2\n")
    ds = load_interactions(path)
    assert _by_raw(ds) == {"u": ["b", "a", "c"]} and ds.timestamps[0].tolist() == [1, 1, 2]


def test_pairs_keep_sasrec_ids_and_accept_strings(tmp_path):
    # a SASRec ml-1m.txt-like file: ids already 1..N by first appearance -> unchanged
    path = _write(tmp_path / "ml.txt", "1 1\n1 2\n1 3\n2 2\n2 4\n3 1\n")
    ds = load_interactions(path, "pairs")
    assert [s.tolist() for s in ds.sequences] == [[1, 2, 3], [2, 4], [1]]
    assert ds.raw_user_ids == ("1", "2", "3") and ds.timestamps is None
    path = _write(tmp_path / "s.txt", "u9  song/1\nu2\tsong/0\nu9 007\nu9 7\n")  # "007" and "7" differ
    assert _by_raw(load_interactions(path, "pairs")) == {"u9": ["song/1", "007", "7"], "u2": ["song/0"]}


def test_sequences_format_concatenates_lines_of_a_user(tmp_path):
    path = _write(tmp_path / "seq.txt", "a 1 2 3\nb 3 9\n\na 4\n")
    ds = load_interactions(path, "sequences")
    assert _by_raw(ds) == {"a": ["1", "2", "3", "4"], "b": ["3", "9"]}
    assert ds.raw_item_ids == ("", "1", "2", "3", "9", "4")


@pytest.mark.parametrize(
    "fmt,text",
    [("csv", CSV), ("tsv", CSV.replace(",", "\t").replace('"Up\t the film"', "Up")), ("pairs", "a x\nb y\n"),
     ("sequences", "a x y\nb y\n")],
)  # fmt: skip
def test_gzip_read_transparently(tmp_path, fmt, text):
    plain = load_interactions(_write(tmp_path / "f.txt", text), fmt)
    gz = load_interactions(_write(tmp_path / "f.txt.gz", text, gz=True), fmt)
    no_suffix = load_interactions(_write(tmp_path / "g.txt", text, gz=True), fmt)  # by the magic bytes
    assert gz.name == "f" and _by_raw(gz) == _by_raw(plain) == _by_raw(no_suffix)


def test_synthetic_log_round_trips_through_a_shuffled_csv(tmp_path):
    ds = synthetic.make_synthetic(seed=3, num_users=60, num_items=80, min_len=3, max_len=15)
    rows = [
        f"user{u},item{i},{t},{r:g}"
        for u, (s, ts, rs) in enumerate(zip(ds.sequences, ds.timestamps, ds.ratings))
        for i, t, r in zip(s, ts, rs)
    ]
    order = np.random.default_rng(0).permutation(len(rows))
    path = _write(tmp_path / "syn.csv", "user,item,timestamp,rating\n" + "\n".join(rows[k] for k in order))
    got = load_interactions(path)
    assert got.num_users == ds.num_users and got.num_interactions == ds.num_interactions
    want = {f"user{u}": [f"item{i}" for i in s] for u, s in enumerate(ds.sequences)}
    assert _by_raw(got) == want
    row = {u: k for k, u in enumerate(got.raw_user_ids)}
    np.testing.assert_array_equal(got.ratings[row["user5"]], ds.ratings[5])


def test_min_rating(tmp_path):
    ds = load_interactions(_write(tmp_path / "log.csv", CSV), min_rating=4)
    assert _by_raw(ds) == {"bob": ["The Matrix"], "alice": ["The Matrix", "Heat"]}
    assert ds.raw_item_ids == ("", "The Matrix", "Heat")  # renumbered over what is left


def test_k_core_repeats_until_stable(tmp_path):
    # one pass drops only u4 (i3 still has 2); then i3 falls under 2, then u3 (left with i2 alone)
    text = "u1 i1\nu1 i2\nu2 i1\nu2 i2\nu3 i2\nu3 i3\nu4 i3\n"
    ds = load_interactions(_write(tmp_path / "k.txt", text), "pairs", user_core=2, item_core=2)
    assert _by_raw(ds) == {"u1": ["i1", "i2"], "u2": ["i1", "i2"]}
    items_only = load_interactions(tmp_path / "k.txt", "pairs", item_core=2)
    assert _by_raw(items_only) == {"u1": ["i1", "i2"], "u2": ["i1", "i2"], "u3": ["i2", "i3"], "u4": ["i3"]}


def test_sasrec_ml1m_file_as_pairs_matches_the_movielens_loader(data_dir):
    path = data_dir / "ml-1m" / "ml-1m.sasrec.txt.gz"
    if not path.is_file():
        pytest.skip("no ml-1m.sasrec.txt.gz")
    ds = load_interactions(path, "pairs")
    want = movielens.load_ml1m_sequential(data_dir)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6040, 3416, 999611)
    assert all(np.array_equal(a, b) for a, b in zip(ds.sequences, want.sequences))


@pytest.mark.parametrize(
    "fmt,text,line,why",
    [
        ("csv", "user,item,time\nu,i,1\n", 1, "header has no timestamp column 'timestamp'"),
        ("csv", "\nuser,time\nu,1\n", 2, "header has no item column 'item'"),
        ("csv", "user,item,timestamp\nu,i,1\nu,i\n", 3, "expected 3 fields"),
        ("tsv", "user\titem\ttimestamp\nu\ti\t1\t2\n", 2, "expected 3 fields"),
        ("csv", "user,item,timestamp\nu,i,1\nu,i,ayer\n", 3, "timestamp 'ayer' is not a finite number"),
        ("csv", "user,item,timestamp,rating\nu,i,1,5\nu,j,2,\n", 3, "rating '' is not a finite number"),
        ("csv", "user,item,timestamp,rating\nu,i,1,nan\n", 2, "rating 'nan' is not a finite number"),
        ("csv", "user,item,timestamp\nu, ,1\n", 2, "empty user or item id"),
        ("pairs", "1 2\n1 2 3\n", 2, "expected 2 fields"),
        ("pairs", "1 2\n\n7\n", 3, "expected 2 fields"),
        ("sequences", "a 1 2\nb\n", 2, "expected a user and at least one item"),
    ],
)  # fmt: skip
def test_bad_lines_name_file_line_and_line(tmp_path, fmt, text, line, why):
    path = _write(tmp_path / f"bad.{fmt}", text)
    bad_line = text.split("\n")[line - 1]
    with pytest.raises(ValueError, match=rf"bad\.{fmt}, line {line}: {why}.*: {re.escape(repr(bad_line))}$"):
        load_interactions(path, fmt)


@pytest.mark.parametrize(
    "fmt,text,kwargs,why",
    [
        ("csv", "", {}, "empty file"),
        ("csv", "\n\n", {}, "empty file"),
        ("csv", "user,item,timestamp\n", {}, "empty file"),
        ("pairs", "\n", {}, "empty file"),
        ("csv", "user,item,timestamp,rating\nu,i,1,2\n", {"min_rating": 3}, "no interactions left"),
        ("pairs", "u i\nv j\n", {"user_core": 2}, "no interactions left"),
        ("csv", "user,item,timestamp\nu,i,1\n", {"min_rating": 3}, "min_rating=3 needs a rating column"),
    ],
)  # fmt: skip
def test_bad_files_name_the_file(tmp_path, fmt, text, kwargs, why):
    path = _write(tmp_path / f"bad.{fmt}", text)
    with pytest.raises(ValueError, match=rf"bad\.{fmt}: {why}"):
        load_interactions(path, fmt, **kwargs)


def test_named_rating_column_is_required(tmp_path):
    path = _write(tmp_path / "r.csv", "user,item,timestamp\nu,i,1\n")
    with pytest.raises(ValueError, match=r"r\.csv, line 1: header has no rating column 'stars'"):
        load_interactions(path, columns={"rating": "stars"})


def test_truncated_or_corrupt_gzip_and_bad_encoding(tmp_path):
    whole = gzip.compress("".join(f"u{k} i{k % 50}\n" for k in range(3000)).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.txt\.gz: truncated or corrupt gzip file"):
        load_interactions(tmp_path / "cut.txt.gz", "pairs")
    (tmp_path / "fake.gz").write_bytes(b"u i\n")
    with pytest.raises(ValueError, match=r"fake\.gz: truncated or corrupt gzip file"):
        load_interactions(tmp_path / "fake.gz", "pairs")
    (tmp_path / "latin.txt").write_bytes(b"u a\nu caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin\.txt, line 2: not valid utf-8"):
        load_interactions(tmp_path / "latin.txt", "pairs")


def test_bad_options(tmp_path):
    path = _write(tmp_path / "p.txt", "u i\n")
    with pytest.raises(ValueError, match="format: expected one of 'csv', 'tsv', 'pairs', 'sequences'"):
        load_interactions(path, "json")
    with pytest.raises(ValueError, match=r"columns: unknown keys \['usr'\]"):
        load_interactions(path, "csv", columns={"usr": "u"})
    with pytest.raises(ValueError, match="min_rating: format 'pairs' has no ratings"):
        load_interactions(path, "pairs", min_rating=3)
    with pytest.raises(ValueError, match="item_core: expected an integer >= 0"):
        load_interactions(path, "pairs", item_core=-2)
    with pytest.raises(FileNotFoundError, match="missing.csv: no such file"):
        load_interactions(tmp_path / "missing.csv")
