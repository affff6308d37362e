"""The Trainer/Task split (issue 8): shardings from logical-axis rules, the review defects (each failed
before), and a custom task trained by the same Trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.data import synthetic
from recjax.data.splits import leave_one_out
from recjax.models.registry import build_model
from recjax.sharding import mesh as mesh_lib
from recjax.train import losses
from recjax.train.tasks import LossConfig, NextItemTask, Task, next_item_loss
from recjax.train.trainer import TrainConfig, Trainer


def _split(num_users=200, num_items=60):
    return leave_one_out(
        synthetic.make_synthetic(num_users=num_users, num_items=num_items, min_len=5, max_len=12)
    )


def _model(num_items, **kw):
    kw = {"embed_dim": 16, "num_blocks": 1, "dropout": 0.0, **kw}
    return build_model("sasrec", num_items, max_len=10, rngs=nnx.Rngs(0), **kw)


def _cfg(**kw):
    base = dict(batch_size=32, eval_batch_size=32, num_epochs=1, ks=(5,), early_stop_metric="hr@5")
    return TrainConfig(**{**base, "progress": False, "num_devices": 1, **kw})


def test_embedding_rows_sharded_by_a_rule_match_replicated(tmp_path):
    """{"vocab": "data"} shards the item table's rows over 8 devices; a step gives the replicated numbers."""
    split = _split(num_items=63)  # 64 table rows: 8 per device
    cfg = _cfg(num_devices=8)
    out = {}
    for name, rules in (
        ("replicated", mesh_lib.DEFAULT_RULES),
        ("rows", {**mesh_lib.DEFAULT_RULES, "vocab": "data"}),
    ):
        task = NextItemTask.from_config(split, cfg, max_len=10)
        trainer = Trainer(_model(split.num_items), task, cfg, tmp_path / name, rules=rules)
        spec = trainer.state_shardings.params["embedding"]["items"].spec
        batch = mesh_lib.shard_batch(next(iter(task.train_batches(0, 0))), trainer.mesh)
        state, metrics = trainer.train_step(trainer.state, batch)
        out[name] = (
            spec,
            jax.device_get(metrics["loss"]),
            jax.device_get(state.params["embedding"]["items"]),
        )
    assert out["replicated"][0] == jax.sharding.PartitionSpec(None, None)
    assert out["rows"][0] == jax.sharding.PartitionSpec("data", None)
    np.testing.assert_allclose(out["rows"][1], out["replicated"][1], rtol=1e-5)
    np.testing.assert_allclose(out["rows"][2], out["replicated"][2], rtol=1e-5, atol=1e-6)


def test_progress_line_without_k10(tmp_path, capsys):
    """The progress line read valid['hr@10'] and crashed (losing the epoch) when ks lacked 10."""
    split = _split()
    cfg = _cfg(progress=True)
    res = Trainer(
        _model(split.num_items), NextItemTask.from_config(split, cfg, max_len=10), cfg, tmp_path
    ).fit()
    assert "valid hr@5=" in capsys.readouterr().out and res["epochs"] == 1


def test_loss_uses_the_models_l2_norm_eps():
    split = _split()
    model = _model(split.num_items, l2_norm_eps=0.5)  # large: visibly changes the normalisation
    batch = next(iter(NextItemTask(split, max_len=10, batch_size=16, ks=(5,), early_stop_metric="hr@5")
                      .train_batches(0, 0)))  # fmt: skip
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng, cfg = jax.random.key(0), LossConfig(num_negatives=8)
    model.eval()
    loss, _ = next_item_loss(cfg, model, batch, rng)
    hidden, table = model(batch["inputs"], batch["mask"]), model.item_embeddings()
    args = (hidden, batch["targets"], batch["mask"], table, rng)
    want, _ = losses.sampled_softmax_loss(*args, num_negatives=8, l2_norm_eps=0.5)
    default, _ = losses.sampled_softmax_loss(*args, num_negatives=8)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert abs(float(want) - float(default)) > 1e-3


def test_bad_task_settings_fail_when_the_task_is_built():
    split = _split()
    kw = dict(max_len=10, batch_size=16, ks=(5,), early_stop_metric="hr@5")
    with pytest.raises(ValueError, match="impl: expected one of"):
        NextItemTask(split, **kw, eval_impl="palas")  # was checked only at the first validation
    with pytest.raises(ValueError, match="early_stop_metric: expected one of"):
        NextItemTask(split, **{**kw, "early_stop_metric": "hr@10"})
    with pytest.raises(ValueError, match=r"ks: expected cutoffs in \[1, 60\]"):
        NextItemTask(split, **{**kw, "ks": (5, 100), "early_stop_metric": "hr@5"})
    with pytest.raises(ValueError, match="train.nonfinite: expected one of"):
        TrainConfig(nonfinite="ignore")


def test_evaluate_rejects_an_unknown_split(tmp_path):
    split = _split()
    cfg = _cfg()
    trainer = Trainer(
        _model(split.num_items), NextItemTask.from_config(split, cfg, max_len=10), cfg, tmp_path
    )
    with pytest.raises(ValueError, match=r"split: expected one of \('valid', 'test'\), got 'tset'"):
        trainer.evaluate("tset")


class _MeanSquareTask(Task):
    """A regression task on a toy model: the Trainer is not tied to next-item prediction."""

    early_stop_metric = "neg_mse"
    splits = ("valid", "test")

    def __init__(self, n=256, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 4)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)

    def metric_names(self):
        return ("neg_mse",)

    def loss(self, model, batch, rng):
        err = model(batch["x"])[:, 0] - batch["y"]
        return jnp.mean(err**2), {}

    def num_train_batches(self):
        return len(self.x) // 32

    def train_batches(self, epoch, seed):
        order = np.random.default_rng([seed, epoch]).permutation(len(self.x))
        for i in range(self.num_train_batches()):
            idx = order[i * 32 : (i + 1) * 32]
            yield {"x": self.x[idx], "y": self.y[idx]}

    def evaluate(self, model, split, task_state=None):
        self.check_split(split)
        return {"neg_mse": -float(jnp.mean((model(jnp.asarray(self.x))[:, 0] - self.y) ** 2))}


def test_custom_task_trains_through_the_same_trainer(tmp_path):
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    task = _MeanSquareTask()
    before = task.evaluate(model, "valid")["neg_mse"]
    cfg = _cfg(num_epochs=30, learning_rate=3e-2, early_stop_metric="mrr", ks=(1,))
    res = Trainer(model, task, cfg, tmp_path).fit()
    assert before < -1.0 and res["test"]["neg_mse"] > -0.05, (before, res["test"])
