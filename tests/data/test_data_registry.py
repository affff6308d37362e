"""Dataset registry: built-ins, "auto", your own loaders, the "file" config checks, and the CLI on a CSV."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import base
from experiments.train_lib import load_dataset
from recjax.data import registry, synthetic
from recjax.data.interactions import load_interactions

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def loaders(monkeypatch):
    """A private copy of the table, so registrations do not leak into other tests."""
    table = dict(registry._LOADERS)
    monkeypatch.setattr(registry, "_LOADERS", table)
    return table


def test_builtins_and_unknown_name():
    assert registry.names() == ["auto", "file", "ml-100k", "ml-1m", "synthetic"]
    with pytest.raises(ValueError, match=r"data.name: unknown dataset 'ml-20m'; known: auto, file, ml-100k"):
        registry.load({"name": "ml-20m"})


def test_synthetic_through_config_and_kwargs():
    data = base.data_config("synthetic")
    data.synthetic.num_users, data.synthetic.num_items = 50, 120
    ds = load_dataset(data)
    want = synthetic.make_synthetic(num_users=50, num_items=120, seed=0)
    assert ds.name == want.name and all(np.array_equal(a, b) for a, b in zip(ds.sequences, want.sequences))
    assert registry.load(name="synthetic", synthetic={"num_users": 50, "num_items": 120}).name == want.name


def test_auto_resolves_by_data_dir(loaders, monkeypatch, tmp_path):
    loaders["ml-1m"] = lambda cfg: "ml-1m loaded"
    loaders["synthetic"] = lambda cfg: "synthetic made"
    monkeypatch.delenv("RECJAX_DATA_DIR", raising=False)
    assert registry.load({"name": "auto"}) == "synthetic made"
    assert registry.load() == "synthetic made"  # "auto" is the default name
    (tmp_path / "ml-1m").mkdir()
    monkeypatch.setenv("RECJAX_DATA_DIR", str(tmp_path))
    assert registry.load({"name": "auto"}) == "ml-1m loaded"


def test_register_your_own(loaders, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a x\na y\nb x\n")
    registry.register("mine", lambda cfg: load_interactions(path, "pairs", name=f"mine-{cfg['max_len']}"))
    ds = load_dataset(base.data_config("mine", max_len=7))
    assert ds.name == "mine-7" and ds.num_users == 2 and "mine" in registry.names()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("mine", lambda cfg: None)
    registry.register("mine", lambda cfg: "replaced", overwrite=True)
    assert registry.load(name="mine") == "replaced"
    with pytest.raises(ValueError, match="reserved"):
        registry.register("auto", lambda cfg: None)
    with pytest.raises(TypeError, match="callable"):
        registry.register("x", "not a loader")


def test_file_dataset_from_config(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("uid\tiid\tts\tstars\nu1\ta\t2\t5\nu1\tb\t1\t2\nu2\ta\t1\t4\n")
    data = base.data_config()
    data.name, data.path, data.format = "file", str(path), "tsv"
    data.file.columns.update({"user": "uid", "item": "iid", "timestamp": "ts", "rating": "stars"})
    data.file.min_rating = 4.0
    ds = load_dataset(data)
    assert ds.name == "events" and ds.raw_user_ids == ("u1", "u2") and ds.raw_item_ids == ("", "a")
    assert [s.tolist() for s in ds.sequences] == [[1], [1]]


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"path": ""}, ValueError, r"data\.path: data\.name=\"file\" needs the path"),
        ({"format": "parquet"}, ValueError, r"data\.format: expected one of 'csv', 'tsv', 'pairs'"),
        ({"path": "/no/such/file.csv"}, FileNotFoundError, r"data\.path: no such file '/no/such/file.csv'"),
        ({"file": {"user_core": -1}}, ValueError, r"data\.file\.user_core: expected an integer >= 0"),
        ({"file": {"columns": {"usr": "u"}}}, ValueError, r"data\.file\.columns: unknown keys \['usr'\]"),
        ({"file": {"typo": 1}}, ValueError, r"data\.file: unknown options \['typo'\]"),
        ({"format": "pairs", "file": {"min_rating": 3.0}}, ValueError, r"data\.file\.min_rating: format"),
    ],
)  # fmt: skip
def test_file_config_checked_before_reading(tmp_path, change, error, match):
    path = tmp_path / "x.csv"
    path.write_text("not even a header we could use")  # never read: the checks come first
    cfg = {**base.data_config("file").to_dict(), "path": str(path), **change}
    with pytest.raises(error, match=match):
        registry.load(cfg)


@pytest.mark.slow
def test_cli_trains_on_a_csv_file(tmp_path):
    ds = synthetic.make_synthetic(seed=1, num_users=300, num_items=200, min_len=8, max_len=30)
    rows = [
        f"user-{u},item-{i},{t},{r:g}"
        for u, (s, ts, rs) in enumerate(zip(ds.sequences, ds.timestamps, ds.ratings))
        for i, t, r in zip(s, ts, rs)
    ]
    order = np.random.default_rng(0).permutation(len(rows))  # file order is not time order
    csv_path = tmp_path / "interactions.csv"
    csv_path.write_text("user,item,timestamp,rating\n" + "\n".join(rows[k] for k in order) + "\n")
    num_items = len({i for s in ds.sequences for i in s.tolist()})
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=experiments/configs/synthetic_tiny.py",
        "--config.data.name=file",
        f"--config.data.path={csv_path}",
        "--config.data.format=csv",
        "--config.train.num_epochs=2",
        "--config.data.pipeline=numpy",
        f"--workdir={workdir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == {
        "name": "interactions",
        "users": 300,
        "items": num_items,
        "interactions": ds.num_interactions,
    }
    assert results["epochs"] == 2 and 0.0 <= results["test"]["hr@10"] <= 1.0
    assert "interactions (300 users)" in proc.stdout
