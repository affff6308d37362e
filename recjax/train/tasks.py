"""Tasks: the model-specific half of training. The ``Trainer`` owns the loop, the jitted step over a typed
``TrainState``, shardings, donation, checkpoints and metrics; a task owns what differs between systems:

- ``loss(model, batch, rng) -> (loss, metrics)`` — traced inside the jitted step; the model is the merged
  training-mode module (its non-parameter state, e.g. dropout RNG counters, may be mutated);
- ``train_batches(epoch, seed)`` — host batches (dicts of numpy arrays, static shapes) in an order that is
  a pure function of (seed, epoch), so a resumed run sees the same batches; ``num_train_batches()``;
- ``evaluate(model, split, task_state) -> metrics`` — on the eval-mode module (``split`` in ``splits``);
- ``early_stop_metric`` and ``metric_names()`` (higher is better), checked when the trainer is built.

Optional hooks (defaults in :class:`Task`): ``init_state(params)`` — a task-owned pytree carried in the
``TrainState`` and checkpointed with it (e.g. an ID remapper's table); ``prepare(...)`` — runs first inside
the jitted step and may rewrite the batch, parameters and optimizer state (e.g. remap raw IDs and reset the
rows that got a new owner); ``start_epoch`` / ``epoch_metrics`` — per-epoch counters. Wrapping a task
(``recjax.train.remap_hook.RemappedTask``) adds behaviour without touching the trainer.

Auxiliary losses of layers (MoE router losses) reach the loss through ``nnx.sow``: a layer sows scalars
under ``"aux_loss"`` into ``nnx.Intermediate``; :func:`forward_with_aux` captures them (``nnx.capture``)
inside the traced loss, so this package imports nothing from ``recjax.layers``.

Letters: B batch, L sequence, D embedding dim, N item rows (row 0 = padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.data import batching
from recjax.data.splits import LeaveOneOut
from recjax.eval import ranking
from recjax.sharding import mesh as mesh_lib
from recjax.train import losses


class Task:
    """Base class with the optional hooks' defaults; subclasses implement the four required parts."""

    early_stop_metric: str = ""
    splits: tuple[str, ...] = ("valid", "test")
    mesh: jax.sharding.Mesh | None = None

    def attach(self, mesh: jax.sharding.Mesh) -> None:
        """Called once by the Trainer: the mesh batches are sharded over."""
        self.mesh = mesh

    def check_model(self, model: nnx.Module) -> None:
        """Raises if ``model`` cannot be trained by this task (called once, before the first step)."""

    def metric_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def num_train_batches(self) -> int:
        raise NotImplementedError

    def evaluate(self, model: nnx.Module, split: str, task_state: Any = None) -> dict[str, float]:
        raise NotImplementedError

    # -- optional hooks ---------------------------------------------------------------------------------
    def init_state(self, params: Any) -> Any:
        return {}

    def prepare(self, params, opt_state, task_state, batch: dict, rng: jax.Array, step: jax.Array):
        """Inside the jitted step, before the loss: -> (params, opt_state, task_state, batch, metrics)."""
        return params, opt_state, task_state, batch, {}

    def start_epoch(self, task_state: Any) -> Any:
        return task_state

    def epoch_metrics(self, task_state: Any) -> dict[str, float]:
        return {}

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split: expected one of {self.splits}, got {split!r}")


def sown_values(sown: Any) -> dict[str, list[jax.Array]]:
    """The values in a State of captured intermediates (``nnx.capture``), by sown name (all layers and
    calls)."""
    out: dict[str, list[jax.Array]] = {}
    for path, value in jax.tree_util.tree_leaves_with_path(sown):
        # path: (..., <sown name>, <index in the sown tuple>); the name is the last string key
        name = next((k.key for k in reversed(path) if isinstance(getattr(k, "key", None), str)), "")
        out.setdefault(name, []).append(value)
    return out


def forward_with_aux(model: nnx.Module, *args) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """``model(*args)`` capturing what its layers sow: -> (output, aux loss, metrics). The aux loss is the
    sum of the sown ``aux_loss`` scalars (0 without any); where layers sowed ``expert_load``, the metrics
    add the worst layer's busiest expert over the mean load (1 = perfect balance)."""
    out, sown = nnx.capture(lambda m: m(*args), nnx.Intermediate)(model)
    values = sown_values(sown)
    aux = sum((jnp.sum(x) for x in values.get("aux_loss", [])), jnp.zeros((), jnp.float32))
    metrics = {"moe_aux_loss": aux}
    loads = [x.reshape(-1) for x in values.get("expert_load", [])]
    if loads:
        metrics["moe_max_load_ratio"] = jnp.max(
            jnp.stack([jnp.max(x) / jnp.maximum(jnp.mean(x), 1e-9) for x in loads])
        )
    return out, aux, metrics


def ranking_metric_names(ks: Sequence[int]) -> tuple[str, ...]:
    return ("mrr", *(f"{m}@{k}" for k in sorted(set(ks)) for m in ("hr", "ndcg")))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    name: str = "sampled_softmax"  # or "bce"
    num_negatives: int = 128
    negatives: str = "uniform"  # or "in_batch", "uniform_per_position"
    temperature: float = 0.05

    def __post_init__(self):
        if self.name not in ("sampled_softmax", "bce"):
            raise ValueError(f"train.loss.name: expected 'sampled_softmax' or 'bce', got {self.name!r}")
        if self.negatives not in losses.NEGATIVE_SAMPLERS:
            raise ValueError(
                f"train.loss.negatives: expected one of {losses.NEGATIVE_SAMPLERS}, got {self.negatives!r}"
            )
        if self.num_negatives <= 0 or self.temperature <= 0:
            raise ValueError(
                "train.loss.num_negatives / temperature: expected > 0, got "
                f"{self.num_negatives} / {self.temperature}"
            )


def next_item_loss(cfg: LossConfig, model: nnx.Module, batch: dict, rng: jax.Array):
    """Today's next-item objective of SASRec/HSTU-like models (``model(inputs, mask) -> hidden_BxLxD``,
    ``model.item_embeddings()``, ``model.config.l2_normalize`` / ``l2_norm_eps``) plus sown aux losses."""
    hidden, aux, aux_metrics = forward_with_aux(model, batch["inputs"], batch["mask"])
    table = model.item_embeddings()
    if cfg.name == "bce":
        loss, metrics = losses.bce_loss(hidden, batch["targets"], batch["mask"], table, rng)
    else:
        loss, metrics = losses.sampled_softmax_loss(
            hidden,
            batch["targets"],
            batch["mask"],
            table,
            rng,
            num_negatives=cfg.num_negatives,
            negatives=cfg.negatives,
            temperature=cfg.temperature,
            l2_normalize=model.config.l2_normalize,
            l2_norm_eps=model.config.l2_norm_eps,
        )
    return loss + aux, {**metrics, **aux_metrics}


@partial(jax.jit, static_argnums=0)
def _queries(graphdef, state, inputs_BxL, mask_BxL):
    model = nnx.merge(graphdef, state)
    return model.user_embedding(model(inputs_BxL, mask_BxL))


@partial(jax.jit, static_argnums=0)
def _candidates(graphdef, state):
    return nnx.merge(graphdef, state).candidate_embeddings()


class NextItemTask(Task):
    """Next-item prediction on a leave-one-out split: sampled softmax (or BCE) over every position of the
    training sequences, full-corpus ranking (``recjax.eval.ranking``) for validation and test.

    ``batch_iter(examples, batch_size, *, shuffle, seed, epoch, drop_remainder)`` yields the training
    batches (default ``recjax.data.batching.batches``; the grain pipeline has the same signature)."""

    def __init__(
        self,
        split: LeaveOneOut,
        *,
        max_len: int,
        batch_size: int,
        loss: LossConfig = LossConfig(),
        eval_batch_size: int = 256,
        ks: Sequence[int] = ranking.DEFAULT_KS,
        early_stop_metric: str = "ndcg@10",
        eval_impl: str = "auto",
        batch_iter: Callable[..., Iterator[dict]] | None = None,
    ):
        for name, v in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_len", max_len),
        ):
            if v <= 0:
                raise ValueError(f"{name}: expected > 0, got {v}")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        if not self.ks or self.ks[0] < 1 or self.ks[-1] > split.num_items:
            raise ValueError(f"ks: expected cutoffs in [1, {split.num_items}] (number of items), got {ks}")
        ranking.check_impl(eval_impl)
        self.split, self.max_len, self.loss_cfg = split, max_len, loss
        self.batch_size, self.eval_batch_size, self.eval_impl = batch_size, eval_batch_size, eval_impl
        self.batch_iter = batch_iter or batching.batches
        self.early_stop_metric = early_stop_metric
        if early_stop_metric not in self.metric_names():
            raise ValueError(
                f"early_stop_metric: expected one of {list(self.metric_names())}, got {early_stop_metric!r}"
            )
        self.train_examples = split.train_examples(max_len)
        self.examples = {s: split.eval_examples(s, max_len) for s in self.splits}

    @classmethod
    def from_config(
        cls, split: LeaveOneOut, cfg: Any, *, max_len: int, batch_iter=None, **task_settings: Any
    ) -> NextItemTask:
        """From a ``TrainConfig`` (its batch sizes, loss, cutoffs, early-stopping metric, score impl);
        ``task_settings``: a subclass's own arguments."""
        return cls(
            split,
            max_len=max_len,
            batch_size=cfg.batch_size,
            loss=cfg.loss,
            eval_batch_size=cfg.eval_batch_size,
            ks=cfg.ks,
            early_stop_metric=cfg.early_stop_metric,
            eval_impl=cfg.eval_impl,
            batch_iter=batch_iter,
            **task_settings,
        )

    def metric_names(self) -> tuple[str, ...]:
        return ranking_metric_names(self.ks)

    def check_model(self, model: nnx.Module) -> None:
        rows = model.item_embeddings().shape[0]
        if rows != self.split.num_items + 1:
            raise ValueError(
                f"model: {rows} item rows, the dataset needs num_items + 1 = {self.split.num_items + 1}"
            )

    def loss(self, model, batch, rng):
        return next_item_loss(self.loss_cfg, model, batch, rng)

    def num_train_batches(self) -> int:
        return batching.num_batches(len(self.train_examples["inputs"]), self.batch_size, drop_remainder=False)

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return self.batch_iter(
            self.train_examples, self.batch_size, shuffle=True, seed=seed, epoch=epoch, drop_remainder=False
        )

    def eval_batches(self, split: str) -> Iterator[dict[str, jax.Array]]:
        """Evaluation batches of ``split`` on the mesh (leading dimension over ``data``)."""
        self.check_split(split)
        for b in batching.batches(self.examples[split], self.eval_batch_size, shuffle=False):
            yield mesh_lib.shard_batch(b, self.mesh) if self.mesh is not None else b

    def rank(
        self, model: nnx.Module, batches: Iterable[dict], row_rates: Sequence[str] = ()
    ) -> dict[str, float]:
        """Ranking metrics of ``model`` (eval mode) over ``batches``: their ``scoreable`` mask, if any,
        turns rows into misses that still count in the denominator; ``row_rates`` names (B,) bool batch
        keys whose mean over valid rows is returned as ``<key>_rate``."""
        graphdef, state = nnx.split(model)
        return ranking.evaluate(
            lambda b: _queries(graphdef, state, b["inputs"], b["mask"]),
            _candidates(graphdef, state),
            batches,
            ks=self.ks,
            impl=self.eval_impl,
            row_rates=tuple(row_rates),
        )

    def evaluate(self, model, split, task_state=None):
        return self.rank(model, self.eval_batches(split))
