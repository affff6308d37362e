"""Training the SilverTorch second stage (``recjax.retrieval.unified.Scorer``: OverArch + task heads + value
model) with the one ``recjax.train.trainer.Trainer``.

``ScorerTask`` is the task: the loss is ``unified.scorer_loss`` (multi-task loss + value loss), the
training batches are the examples shuffled in an order fixed by (seed, epoch) (last partial batch dropped),
and evaluation gives per-head metrics on named example sets: ``<head>_auc`` for a binary head,
``<head>_neg_rmse`` (higher is better) for a regression head, each over the examples where the head is
labelled (NaN where it has no labelled example, or an AUC with one class only).

It lives in ``recjax.models`` because it needs both the scorer (``recjax.retrieval``) and the ``Task``
interface (``recjax.train``), and retrieval sits below train.

Examples (``scorer_examples``) are single (user, item) pairs over precomputed user embeddings of a frozen
tower, a dict of numpy arrays: ``user_emb`` (E, D), ``item_emb`` (E, D), optional ``item_side`` (E, S) and
``user_side`` (E, U), ``labels`` / ``label_mask`` (E, T), ``value_target`` (E,).

Letters: E examples, C contexts, D embedding dim, T tasks (heads), S / U item / user side widths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.data import batching
from recjax.eval.classification import auc
from recjax.retrieval.multitask_data import MultiTaskExamples
from recjax.retrieval.overarch import TaskSpec, task_predictions
from recjax.retrieval.unified import Scorer, scorer_loss
from recjax.train.tasks import Task

REQUIRED_KEYS = ("user_emb", "item_emb", "labels", "label_mask", "value_target")
FEATURE_KEYS = ("user_emb", "item_emb", "item_side", "user_side")


def scorer_examples(
    ex: MultiTaskExamples,
    user_emb_CxD: np.ndarray,
    item_emb_NxD: np.ndarray,
    user_side_CxU: np.ndarray | None = None,
    item_side_NxS: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The per-example arrays ``ScorerTask`` and ``predict`` read, gathered from per-context user embeddings
    / side features and per-item tables (row = item id)."""
    out = {
        "user_emb": np.asarray(user_emb_CxD)[ex.context_E],
        "item_emb": np.asarray(item_emb_NxD)[ex.items_E],
        "labels": np.asarray(ex.labels_ExT, np.float32),
        "label_mask": np.asarray(ex.label_mask_ExT, bool),
        "value_target": np.asarray(ex.value_target_E, np.float32),
    }
    if item_side_NxS is not None:
        out["item_side"] = np.asarray(item_side_NxS)[ex.items_E]
    if user_side_CxU is not None:
        out["user_side"] = np.asarray(user_side_CxU)[ex.context_E]
    return out


@partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, user, item, item_side, user_side):
    scorer = nnx.merge(graphdef, state)
    logits = scorer.overarch(
        user, item[:, None], None if item_side is None else item_side[:, None], user_side
    )
    preds = task_predictions(logits[:, 0], scorer.tasks)
    return preds, scorer.value_model(preds)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def predict(scorer: Scorer, examples: Mapping[str, np.ndarray], batch_size: int = 4096):
    """-> (predictions_ExT, values_E) as numpy: task predictions (probabilities for binary heads) and the
    value model's output. Batches are padded to ``batch_size`` so one compilation serves every batch."""
    graphdef, state = nnx.split(scorer)
    n = len(examples["user_emb"])
    preds, values = [], []
    for i in range(0, n, batch_size):
        args = [
            None if k not in examples else jnp.asarray(_pad_rows(examples[k][i : i + batch_size], batch_size))
            for k in FEATURE_KEYS
        ]
        p, v = _predict(graphdef, state, *args)
        m = min(batch_size, n - i)
        preds.append(np.asarray(p)[:m])
        values.append(np.asarray(v)[:m])
    if not preds:
        t = len(scorer.tasks)
        return np.zeros((0, t), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(preds), np.concatenate(values)


def head_metric_names(heads: Sequence[TaskSpec]) -> tuple[str, ...]:
    return tuple(f"{h.name}_auc" if h.kind == "binary" else f"{h.name}_neg_rmse" for h in heads)


def head_metrics(
    preds_ExT: np.ndarray, labels_ExT: np.ndarray, mask_ExT: np.ndarray, heads: Sequence[TaskSpec]
) -> dict[str, float]:
    """Per head, over its labelled examples: AUC (binary) or minus the RMSE (regression); NaN if none."""
    out = {}
    for t, (h, name) in enumerate(zip(heads, head_metric_names(heads), strict=True)):
        m = np.asarray(mask_ExT[:, t], bool)
        p, y = preds_ExT[m, t], labels_ExT[m, t]
        if h.kind == "binary":
            out[name] = auc(p, y)
        else:
            out[name] = -float(np.sqrt(np.mean((p - y) ** 2))) if m.any() else float("nan")
    return out


def _check_examples(name: str, ex: Mapping[str, np.ndarray], num_heads: int) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in ex]
    if missing:
        raise ValueError(
            f"{name}: missing keys {missing} (expected {REQUIRED_KEYS} + optional side features)"
        )
    sizes = {k: len(v) for k, v in ex.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: all arrays need the same number of examples, got {sizes}")
    for k in ("labels", "label_mask"):
        if ex[k].ndim != 2 or ex[k].shape[1] != num_heads:
            raise ValueError(f"{name}[{k!r}]: expected shape (E, {num_heads}), got {ex[k].shape}")


class ScorerTask(Task):
    """Trains a ``Scorer`` on ``train`` examples; ``eval_sets`` maps split names to example sets (their
    names are the task's ``splits``: "valid" is what the Trainer validates on each epoch, "test" what it
    evaluates the best parameters on at the end; other names only through ``Trainer.evaluate``).

    ``task_weights`` / ``value_weight`` / ``stop_value_grad``: as in ``unified.scorer_loss``.
    ``early_stop_metric`` is one of ``head_metric_names(heads)``."""

    def __init__(
        self,
        heads: Sequence[TaskSpec],
        train: Mapping[str, np.ndarray],
        eval_sets: Mapping[str, Mapping[str, np.ndarray]],
        *,
        batch_size: int = 1024,
        task_weights: Sequence[float] | None = None,
        value_weight: float = 1.0,
        stop_value_grad: bool = True,
        early_stop_metric: str | None = None,
        eval_batch_size: int = 4096,
    ):
        self.heads = tuple(heads)
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if v <= 0:
                raise ValueError(f"{name}: expected > 0, got {v}")
        if task_weights is not None and len(task_weights) != len(self.heads):
            raise ValueError(f"task_weights: expected {len(self.heads)} weights, got {len(task_weights)}")
        _check_examples("train", train, len(self.heads))
        for split, ex in eval_sets.items():
            _check_examples(f"eval_sets[{split!r}]", ex, len(self.heads))
        self.train = dict(train)
        self.eval_sets = {k: dict(v) for k, v in eval_sets.items()}
        self.splits = tuple(eval_sets)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_examples = len(train["labels"])
        if self.num_examples < batch_size:
            raise ValueError(f"train: {self.num_examples} examples, fewer than one batch of {batch_size}")
        self.loss_kwargs = {
            "task_weights": None if task_weights is None else tuple(float(w) for w in task_weights),
            "value_weight": float(value_weight),
            "stop_value_grad": bool(stop_value_grad),
        }
        self.early_stop_metric = early_stop_metric or self.metric_names()[0]
        if self.early_stop_metric not in self.metric_names():
            raise ValueError(
                f"early_stop_metric: expected one of {list(self.metric_names())}, got {early_stop_metric!r}"
            )

    def metric_names(self) -> tuple[str, ...]:
        return head_metric_names(self.heads)

    def check_model(self, model: nnx.Module) -> None:
        if not isinstance(model, Scorer):
            raise TypeError(f"model: expected a recjax.retrieval.unified.Scorer, got {type(model).__name__}")
        if tuple(model.tasks) != self.heads:
            raise ValueError(f"model: heads {model.tasks}, the task's examples are labelled for {self.heads}")
        cfg = model.overarch.config
        widths = {"user_emb": cfg.embed_dim, "item_emb": cfg.embed_dim}
        widths |= {"item_side": cfg.item_side_dim, "user_side": cfg.user_side_dim}
        for key, width in widths.items():
            got = self.train[key].shape[1] if key in self.train else 0
            if got != width:
                raise ValueError(f"train[{key!r}]: width {got}, the scorer's OverArch expects {width}")

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # the scorer is deterministic (no dropout)
        return scorer_loss(model, batch, **self.loss_kwargs)

    def num_train_batches(self) -> int:
        return batching.num_batches(self.num_examples, self.batch_size, drop_remainder=True)

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return batching.batches(
            self.train, self.batch_size, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True
        )

    def evaluate(self, model: nnx.Module, split: str, task_state: Any = None) -> dict[str, float]:
        self.check_split(split)
        ex = self.eval_sets[split]
        preds, _ = predict(model, ex, self.eval_batch_size)
        return head_metrics(preds, ex["labels"], ex["label_mask"], self.heads)
