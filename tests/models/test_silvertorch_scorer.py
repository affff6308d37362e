"""ScorerTask: the SilverTorch scorer (OverArch + heads + value model) trained by the one Trainer — it learns,
its metrics match their definitions, batches depend only on (seed, epoch), resume is exact, a scorer that
does not fit the examples is refused."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.eval.classification import auc
from recjax.models.silvertorch_scorer import (
    ScorerTask,
    head_metric_names,
    head_metrics,
    predict,
    scorer_examples,
)
from recjax.retrieval import multitask_data as mt
from recjax.retrieval.overarch import OverArch, OverArchConfig, TaskSpec
from recjax.retrieval.unified import Scorer
from recjax.retrieval.value_model import ValueModel, ValueModelConfig
from recjax.train.trainer import TrainConfig, Trainer

D, S = 8, 3
HEADS = (TaskSpec("click", "binary"), TaskSpec("rating", "regression"))


def _examples(seed: int, e: int) -> dict[str, np.ndarray]:
    """A learnable signal: click iff <user, item> > 0, rating = 3 + <user, item> on clicks only."""
    r = np.random.default_rng(seed)
    user, item = r.normal(size=(e, D)).astype(np.float32), r.normal(size=(e, D)).astype(np.float32)
    dot = np.sum(user * item, 1) / np.sqrt(D)
    click = dot > 0
    return {
        "user_emb": user,
        "item_emb": item,
        "item_side": r.random((e, S)).astype(np.float32),
        "labels": np.stack([click, np.where(click, 3 + dot, 0)], 1).astype(np.float32),
        "label_mask": np.stack([np.ones(e, bool), click], 1),
        "value_target": click.astype(np.float32),
    }


def _scorer(seed: int = 0, heads=HEADS, item_side_dim: int = S) -> Scorer:
    cfg = OverArchConfig(D, heads, item_side_dim=item_side_dim, hidden_dims=(32,), head_dim=8)
    vm = ValueModelConfig((1.0,) * len(heads), mode="linear")
    return Scorer(OverArch(cfg, rngs=nnx.Rngs(seed)), ValueModel(vm, rngs=nnx.Rngs(1)))


def _task(**kw) -> ScorerTask:
    sets = {"valid": _examples(1, 512), "test": _examples(2, 512)}
    return ScorerTask(HEADS, _examples(0, 2048), sets, batch_size=256, eval_batch_size=256, **kw)


def _cfg(epochs: int, **kw) -> TrainConfig:
    return TrainConfig(
        batch_size=256, eval_batch_size=256, num_epochs=epochs, learning_rate=3e-3, progress=False, **kw
    )


def test_trainer_learns_the_scorer_and_reports_head_metrics(tmp_path):
    task = _task(early_stop_metric="click_auc")
    trainer = Trainer(_scorer(), task, _cfg(4), tmp_path)
    before = trainer.evaluate("test")
    result = trainer.fit()
    assert set(result["test"]) == {"click_auc", "rating_neg_rmse"}
    assert result["test"]["click_auc"] > 0.85 > before["click_auc"] + 0.1
    assert result["test"]["rating_neg_rmse"] > before["rating_neg_rmse"]
    assert result["best_epoch"] >= 1  # validated every epoch on "valid"
    # the reported metrics are the definitions applied to predict()'s output of the best parameters
    best = trainer.best_model()
    ex = task.eval_sets["test"]
    preds, values = predict(best, ex, batch_size=100)  # a batch size that pads the last batch
    assert preds.shape == (512, 2) and values.shape == (512,)
    assert result["test"]["click_auc"] == pytest.approx(auc(preds[:, 0], ex["labels"][:, 0]), abs=1e-6)
    clicked = ex["label_mask"][:, 1]
    rmse = np.sqrt(np.mean((preds[clicked, 1] - ex["labels"][clicked, 1]) ** 2))
    assert result["test"]["rating_neg_rmse"] == pytest.approx(-rmse, rel=1e-5)


def test_head_metrics_are_masked_and_nan_without_labels():
    preds = np.array([[0.9, 4.0], [0.2, 1.0], [0.6, 0.0]])
    labels = np.array([[1.0, 5.0], [0.0, 0.0], [0.0, 0.0]])
    mask = np.array([[True, True], [True, False], [False, False]])
    m = head_metrics(preds, labels, mask, HEADS)
    assert m == {"click_auc": 1.0, "rating_neg_rmse": -1.0}
    none = head_metrics(preds, labels, np.zeros_like(mask), HEADS)
    assert all(np.isnan(v) for v in none.values())
    assert head_metric_names(mt.TASKS) == ("click_auc", "rating_neg_rmse", "long_watch_auc")


def test_batches_depend_only_on_seed_and_epoch():
    task = _task()
    assert task.num_train_batches() == 2048 // 256
    a = list(task.train_batches(epoch=1, seed=3))
    b = list(_task().train_batches(epoch=1, seed=3))
    assert len(a) == task.num_train_batches()
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = next(task.train_batches(epoch=2, seed=3))
    assert not np.array_equal(other["user_emb"], a[0]["user_emb"])
    # an epoch is a permutation of the examples (none repeated; the remainder is dropped)
    rows = np.concatenate([x["user_emb"][:, 0] for x in a])
    assert len(np.unique(rows)) == len(rows) == 2048


def test_resume_is_exact(tmp_path):
    """1 epoch, then a new Trainer on the same workdir trains the 2nd: the same parameters as 2 epochs in
    one run (with a cosine schedule through ``optimizer=``, whose step count is in the checkpoint)."""

    def opt():
        return optax.adam(optax.cosine_decay_schedule(3e-3, 2 * 8))

    def params_after(trainer):
        return jax.device_get(trainer.best["params"])

    whole = Trainer(_scorer(), _task(), _cfg(2, eval_every_epochs=0), tmp_path / "a", optimizer=opt())
    whole.fit()
    first = Trainer(_scorer(), _task(), _cfg(1, eval_every_epochs=0), tmp_path / "b", optimizer=opt())
    first.fit()
    second = Trainer(_scorer(), _task(), _cfg(2, eval_every_epochs=0), tmp_path / "b", optimizer=opt())
    assert second.resumed_from == 8
    second.fit()
    for x, y in zip(jax.tree.leaves(params_after(whole)), jax.tree.leaves(params_after(second)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_scorer_examples_gathers_per_context_and_item():
    ex = mt.MultiTaskExamples(
        inputs_CxL=np.zeros((2, 3), np.int32), mask_CxL=np.zeros((2, 3), bool), user_C=np.array([5, 7]),
        history_CxH=np.zeros((2, 1), np.int32), targets_CxM=np.zeros((2, 1), np.int32),
        context_E=np.array([1, 0, 1]), items_E=np.array([2, 3, 1]),
        labels_ExT=np.zeros((3, 3), np.float32), label_mask_ExT=np.ones((3, 3), bool),
        value_target_E=np.array([0.1, 0.2, 0.3], np.float32),
    )  # fmt: skip
    user, items = np.arange(2 * D).reshape(2, D), np.arange(4 * D).reshape(4, D)
    out = scorer_examples(ex, user, items, user_side_CxU=np.array([[1.0], [2.0]]), item_side_NxS=items[:, :S])
    np.testing.assert_array_equal(out["user_emb"], user[[1, 0, 1]])
    np.testing.assert_array_equal(out["item_emb"], items[[2, 3, 1]])
    np.testing.assert_array_equal(out["user_side"][:, 0], [2.0, 1.0, 2.0])
    np.testing.assert_array_equal(out["item_side"], items[[2, 3, 1], :S])
    assert "item_side" not in scorer_examples(ex, user, items)


def test_bad_scorers_and_examples_are_refused(tmp_path):
    with pytest.raises(ValueError, match="early_stop_metric"):
        _task(early_stop_metric="ndcg@10")
    with pytest.raises(ValueError, match="fewer than one batch"):
        ScorerTask(HEADS, _examples(0, 100), {}, batch_size=256)
    with pytest.raises(ValueError, match="missing keys"):
        ScorerTask(HEADS, {k: v for k, v in _examples(0, 300).items() if k != "labels"}, {}, batch_size=256)
    with pytest.raises(ValueError, match="heads"):
        Trainer(_scorer(heads=mt.TASKS), _task(), _cfg(1), tmp_path / "a")
    with pytest.raises(ValueError, match="item_side"):
        Trainer(_scorer(item_side_dim=S + 1), _task(), _cfg(1), tmp_path / "b")
    with pytest.raises(ValueError, match="split"):
        _task().evaluate(_scorer(), "nope")
