"""MovieLens loaders on the real files (counts, features), the official-archive path, and bad files."""

import gzip
import zipfile

import numpy as np
import pytest

from recjax.data import movielens
from recjax.data.paths import data_dir as resolve_data_dir


@pytest.fixture(scope="module")
def ml1m(data_dir):
    return movielens.load_ml1m_sequential(data_dir)


def test_ml1m_sequential_counts_and_features(ml1m):
    assert (ml1m.num_users, ml1m.num_items, ml1m.num_interactions) == (6040, 3416, 999611)
    assert all(s.dtype == np.int32 and s.min() >= 1 and s.max() <= 3416 for s in ml1m.sequences)
    assert ml1m.sequences[0][:5].tolist() == [1, 2, 3, 4, 5] and len(ml1m.sequences[0]) == 79
    genres, year = ml1m.item_features["genres"], ml1m.item_features["year_bucket"]
    assert genres.shape == (3417, 18) and year.shape == (3417, 1)
    assert genres[0].sum() == 0 and year[0, 0] == 0 and (genres[1:].sum(1) >= 1).all()
    # SASRec item 1 = movie 1198, "Raiders of the Lost Ark (1981)", Action|Adventure
    assert [movielens.GENRES[g] for g in np.flatnonzero(genres[1])] == ["Action", "Adventure"]
    assert year[1, 0] == 1 + sum(e <= 1981 for e in movielens.YEAR_EDGES)
    # SASRec user 1 = user 5988: M, age 25, occupation 15
    uf = ml1m.user_features
    assert (uf["gender"][0, 0], uf["age"][0, 0], uf["occupation"][0, 0]) == (2, 1 + 2, 1 + 15)
    for name, arr in {**uf, "year_bucket": year[1:]}.items():
        assert 1 <= arr.min() and arr.max() < movielens.FEATURE_SIZES[name], name


def test_ml100k_counts_order_ratings(data_dir):
    ds = movielens.load_ml100k(data_dir)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100000)
    assert all((np.diff(t) >= 0).all() for t in ds.timestamps)
    rat = np.concatenate(ds.ratings)
    assert rat.dtype == np.float32 and set(np.unique(rat).tolist()) == {1, 2, 3, 4, 5}
    assert 3.5 < rat.mean() < 3.6  # published mean rating of ML-100K is 3.53
    toy_story = ds.item_features["genres"][1]
    assert [movielens.GENRES[g] for g in np.flatnonzero(toy_story)] == ["Animation", "Children's", "Comedy"]
    assert ds.item_features["year_bucket"][267, 0] == 0  # item 267 "unknown" has no date
    assert ds.user_features["age"][0, 0] == 2 and ds.user_features["gender"][1, 0] == 1  # 24 -> 18-24; F


def _write_ratings_from_sasrec(ml1m, data_dir, path, rng):
    """Rebuild a ratings.dat from the SASRec file (users ordered by first time) plus rare items to drop."""
    item_map = movielens._read_id_map(data_dir / "ml-1m" / "sas_to_original_items.txt")
    user_map = movielens._read_id_map(data_dir / "ml-1m" / "sas_to_original_users.txt")
    rare = np.setdiff1d(np.arange(1, 3953), item_map[1:])[:50]  # movies outside the SASRec item set
    lines = []
    for u, seq in enumerate(ml1m.sequences, start=1):
        times = 10_000_000 * u + 7 * np.arange(len(seq))
        stars = rng.integers(1, 6, size=len(seq))
        rows = [f"{user_map[u]}::{i}::{r}::{t}" for i, r, t in zip(item_map[seq], stars, times, strict=True)]
        if u % 997 == 0:  # a rare item, rated by fewer than 5 users in total
            rows.append(f"{user_map[u]}::{rare[u % len(rare)]}::3::{times[-1] + 1}")
        lines += [rows[k] for k in rng.permutation(len(rows))]  # file order is not time order
    path.write_text("\n".join(lines) + "\n")
    return item_map, user_map


def test_ratings_archive_reproduces_sasrec_form(ml1m, data_dir, tmp_path, rng):
    root = tmp_path / "ml-1m"
    root.mkdir()
    item_map, user_map = _write_ratings_from_sasrec(ml1m, data_dir, root / "ratings.dat", rng)
    # no SASRec file here: load_ml1m_sequential falls back to load_ml1m_ratings(tmp_path / "ml-1m")
    ds = movielens.load_ml1m_sequential(tmp_path)
    assert ds.name == "ml-1m" and ds.ratings is not None and ds.item_features == {}  # no movies.dat here
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6040, 3416, 999611)
    for u in (0, 1, 2, 996, 6039):
        np.testing.assert_array_equal(ds.sequences[u], ml1m.sequences[u])
    assert all(np.array_equal(a, b) for a, b in zip(ds.sequences, ml1m.sequences, strict=True))
    assert all((np.diff(t) > 0).all() for t in ds.timestamps)
    raw = movielens.load_ml1m_ratings(root, min_count=0, reindex=False)
    assert raw.num_interactions == 999611 + 6040 // 997
    sas_user = int(np.flatnonzero(user_map == 1)[0])  # raw row 0 is MovieLens user 1
    assert sas_user % 997 != 0
    np.testing.assert_array_equal(raw.sequences[0], item_map[ml1m.sequences[sas_user - 1]])
    assert raw.num_items >= item_map.max() and raw.num_users == 6040


def test_tiny_ratings_zip_filtering_and_ties(data_dir, tmp_path):
    # users 10 and 20; movie 1 rated by both, movie 2 and 3 by one user each; min_count=2 drops 2 and 3
    ratings = "10::1::4::300\n10::2::5::100\n20::3::2::50\n20::1::1::60\n20::5::3::60\n10::5::3::200\n"
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-1m/ratings.dat", ratings)
        z.write(data_dir / "ml-1m" / "movies.dat", "ml-1m/movies.dat")
        z.write(data_dir / "ml-1m" / "users.dat", "ml-1m/users.dat")
    ds = movielens.load_ml1m_ratings(archive, min_count=2)
    # user 20 rated first (t=50) -> user 1; its ratings by time: movie 1 (60), movie 5 (60, tie: file order)
    assert [s.tolist() for s in ds.sequences] == [[1, 2], [2, 1]]  # movie 1 -> 1, movie 5 -> 2
    assert [t.tolist() for t in ds.timestamps] == [[60, 60], [200, 300]]
    assert [r.tolist() for r in ds.ratings] == [[1.0, 3.0], [3.0, 4.0]]
    assert ds.item_features["genres"].shape == (3, 18) and ds.item_features["genres"][1, 2] == 1  # Toy Story
    assert ds.user_features["occupation"][:, 0].tolist() == [1 + 14, 1 + 1]  # users 20, 10 in users.dat
    full = movielens.load_ml1m_ratings(archive, min_count=0, reindex=False)
    assert full.num_items == 5 and full.sequences[0].tolist() == [2, 5, 1]  # user 10 by time


@pytest.mark.parametrize(
    "content, line, why",
    [
        ("1::2::3::4\n1::2::3\n", 2, "expected 4 fields"),
        ("1::2::3::4\n\n1::x::3::4\n", 3, "'x'"),
        ("1::2::3::4\n1::2::9::4\n", 2, "rating must be in 1..5"),
        ("1::2::3::4\n1::0::3::4\n", 2, "ids must be >= 1"),
    ],
)
def test_malformed_ratings_name_file_and_line(tmp_path, content, line, why):
    (tmp_path / "ratings.dat").write_text(content)
    with pytest.raises(ValueError, match=rf"ratings.dat, line {line}: .*{why}.*: '"):
        movielens.load_ml1m_ratings(tmp_path, min_count=0)


def test_malformed_sasrec_and_movies(tmp_path, data_dir):
    root = tmp_path / "ml-1m"
    root.mkdir()
    with gzip.open(root / "ml-1m.sasrec.txt.gz", "wt") as f:
        f.write("1 1\n1 2\n2 3 4\n")
    with pytest.raises(ValueError, match=r"ml-1m.sasrec.txt.gz, line 3: expected 2 fields.*'2 3 4'"):
        movielens.load_ml1m_sequential(tmp_path)
    with gzip.open(root / "ml-1m.sasrec.txt.gz", "wt") as f:
        f.write("1 1\n1 2\n2 1\n")
    (root / "sas_to_original_items.txt").write_text("1 1\n2 2\n")
    (root / "sas_to_original_users.txt").write_text("1 1\n2 2\n")
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (root / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure|Space Opera\n"
    )
    with pytest.raises(ValueError, match=r"movies.dat, line 2: unknown genre 'Space Opera'"):
        movielens.load_ml1m_sequential(tmp_path)


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.delenv("RECJAX_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        resolve_data_dir()
    msg = str(err.value)
    assert "RECJAX_DATA_DIR: not set" in msg and "download('ml-1m'" in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg and "ml-100k.zip" in msg
    monkeypatch.setenv("RECJAX_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$RECJAX_DATA_DIR: .*nowhere.*ml-1m.sasrec.txt.gz"):
        movielens.load_ml1m_sequential()
    with pytest.raises(FileNotFoundError, match=r"explicit data_dir argument: .*elsewhere.*u.data"):
        movielens.load_ml100k(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        movielens.load_ml1m_ratings(tmp_path)
    (tmp_path / "ratings.dat").write_text("1::2::3::4\n")
    with pytest.raises(ValueError, match="no ratings left after min_count=5 filtering"):
        movielens.load_ml1m_ratings(tmp_path)


def test_truncated_sasrec_gzip_names_the_file(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    whole = gzip.compress(b"".join(b"%d %d\n" % (u, i) for u in range(1, 200) for i in range(1, 20)))
    (root / "ml-1m.sasrec.txt.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"ml-1m.sasrec.txt.gz: truncated or corrupt gzip file"):
        movielens.load_ml1m_sequential(tmp_path)
