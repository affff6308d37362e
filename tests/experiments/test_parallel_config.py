"""experiments.run's mesh / embedding-plan / length-bucket / balance sections (experiments/parallel.py): a
tiny SASRec trained on a 4 x 2 data x model mesh with a row-sharded table, prioritized lookups, length
buckets and zig-zag balancing reaches the test metrics of the plain 1-device run (same samples per step,
uniform negatives, no dropout); bad sections are refused before the data loads, naming the field."""

import ml_collections
import numpy as np
import pytest

from experiments import overrides, parallel
from experiments.configs import synthetic_tiny
from experiments.train_lib import run_experiment


def _config(**sections):
    c = synthetic_tiny.get_config()
    c.data.synthetic.num_users, c.data.synthetic.num_items = 160, 127  # 128 table rows: divide over 2 and 8
    c.data.pipeline = "numpy"
    c.model.dropout = 0.0
    c.train.update(num_epochs=1, eval_every_epochs=0, checkpoint_every_epochs=0, num_devices=0)
    for path, value in sections.items():  # "mesh", "embeddings", "data.balance", "data.length_buckets"
        parent, leaf = (c.data, path.removeprefix("data.")) if path.startswith("data.") else (c, path)
        parent[leaf] = ml_collections.ConfigDict(value)
    return c


SHARDED = {
    "mesh": {"data": 4, "model": 2, "expert": 1},
    # prefetch: prioritized lookups, exact, so the metrics still equal the plain run's (dense AdamW)
    "embeddings": {"axis": "model", "tables": {"items": "row"}, "owners": {"items": 0}, "prefetch": True},
    "data.length_buckets": {"enabled": True, "min_width": 8},
    "data.balance": {"mode": "zigzag", "alpha": 1.0},
}


def test_sections_train_to_the_plain_runs_metrics(tmp_path):
    plain = _config()
    plain.train.num_devices = 1
    ref = run_experiment(plain, tmp_path / "plain")
    cfg = _config(**SHARDED)
    mesh, plan, _ = parallel.setup(cfg, lambda *a, **k: iter(()))
    assert dict(mesh.shape) == {"data": 4, "model": 2, "expert": 1}
    assert plan.get("items").placement == "row" and plan.axis == "model"
    options = parallel.trainer_options(cfg, None)
    assert set(options) == {"prefetch"} and options["prefetch"].param_path == ("embedding", "items")
    got = run_experiment(cfg, tmp_path / "sharded")
    assert got["devices"].startswith("4 x") and ref["devices"].startswith("1 x")
    print(ref["test"], got["test"])
    assert ref["test"]["hr@50"] > 0
    for k, v in ref["test"].items():
        np.testing.assert_allclose(got["test"][k], v, atol=1e-5, err_msg=k)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("mesh", {"data": 0, "modle": 2}, r"mesh: unknown keys \['modle'\]"),
        ("mesh", {"model": 0}, "mesh.model: expected >= 1"),
        ("embeddings", {"axis": "model", "tables": {"items": "rows"}}, r"tables\['items'\].placement"),
        ("embeddings", {"axis": "rows", "tables": {"items": "row"}}, "embeddings.axis"),
        ("embeddings", {"tables": {"items": "table"}, "owners": {"user": 1}}, "embeddings.owners"),
        (
            "embeddings",
            {"tables": {"items": "row"}, "prefetch": True, "prefetch_capacity": 0.0},
            "prefetch.capacity",
        ),
        ("embeddings", {"tables": {"users": "row"}, "sparse_updates": True}, "embeddings.tables"),
        ("data.balance", {"mode": "zig"}, "data.balance.mode"),
        ("data.balance", {"mode": "variable", "alpha": 0.0}, "data.balance.alpha"),
        ("data.length_buckets", {"enabled": True, "min_width": 0}, "data.length_buckets.min_width"),
    ],
)
def test_bad_sections_refused_naming_the_field(path, value, message):
    with pytest.raises(ValueError, match=message):
        overrides.validate(_config(**{path: value}))


def test_freescale_config_validates():
    from experiments.configs import freescale_hstu_ml1m

    cfg = freescale_hstu_ml1m.get_config()
    overrides.validate(cfg)
    assert parallel._plan(cfg).get("items").placement == "row"
    cfg.embeddings.sparse_updates = True
    assert set(parallel.trainer_options(cfg, parallel_train_config(cfg))) == {"optimizer"}


def parallel_train_config(cfg):
    from experiments.train_lib import train_config

    return train_config(cfg.train)


def test_moe_runs_expert_parallel_from_the_mesh_section(tmp_path):
    """model.ffn="moe" with mesh.expert=4: experts split over the expert axis (all-to-all dispatch), the
    same test metrics as one device."""
    plain = _config()
    plain.model.ffn, plain.model.ffn_options = "moe", {"num_experts": 4, "top_k": 1, "impl": "xla"}
    plain.train.num_devices = 1
    ref = run_experiment(plain, tmp_path / "plain")
    cfg = _config(mesh={"data": 2, "model": 1, "expert": 4})
    cfg.model.ffn, cfg.model.ffn_options = plain.model.ffn, plain.model.ffn_options
    mesh, _, _ = parallel.setup(cfg, lambda *a, **k: iter(()))
    opts = parallel.model_options(mesh, cfg.model.to_dict())["ffn_options"]
    assert opts["mesh"] is mesh and opts["expert_axis"] == "expert"
    got = run_experiment(cfg, tmp_path / "ep")
    for k, v in ref["test"].items():
        np.testing.assert_allclose(got["test"][k], v, atol=1e-5, err_msg=k)
