"""OverArch scoring layer and multi-task heads for the unified retrieval model (SilverTorch).

After the ANN stage returns K candidates per user, the OverArch scores each (user, candidate) pair with a
learned network over user x candidate features, and per-task heads turn the shared representation into
one logit per task (e.g. click, rating, long-watch). A Value Model (value_model.py) then aggregates the task
predictions into the one number the final top-N is cut on.

Features of a pair (u user embedding, c candidate embedding):
    [u, c, u * c, <u, c> (optional), item side features (optional), user side features (optional)]
-> LayerNorm -> MLP trunk (ReLU) -> per-task heads (ReLU hidden layer of ``head_dim`` per task, or linear
heads when ``head_dim == 0``) -> logits (B, K, T).

Tasks are generic: ``TaskSpec(name, kind)`` with kind "binary" (logit -> sigmoid probability, trained with
binary cross-entropy) or "regression" (the logit is the prediction, trained with squared error). Labels
come with a mask so a task can be undefined for an example (e.g. no rating for a sampled negative).

Letters: B users, K candidates, D embedding dim, S item side width, U user side width, H trunk width,
G head hidden width, T tasks, E training examples.
Deviation from the paper: SilverTorch describes the OverArch and multi-task heads only at the level of
"a learned layer over user and item features"; the exact feature crosses and layer sizes here are ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recjax import validation

TASK_KINDS = ("binary", "regression")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "binary" | "regression"

    def __post_init__(self):
        if not self.name:
            raise ValueError("TaskSpec.name: expected a non-empty string")
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"TaskSpec.kind of {self.name!r}: expected one of {TASK_KINDS}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class OverArchConfig:
    embed_dim: int  # D of the user and candidate embeddings
    tasks: tuple[TaskSpec, ...]
    item_side_dim: int = 0  # S; 0 = no item side features
    user_side_dim: int = 0  # U; 0 = no user side features
    hidden_dims: tuple[int, ...] = (64, 32)
    head_dim: int = 16  # G; 0 = linear heads
    use_retrieval_score: bool = True  # append <u, c> as a feature

    def __post_init__(self):
        validation.check_positive("OverArchConfig.embed_dim", self.embed_dim)
        if not self.tasks:
            raise ValueError("OverArchConfig.tasks: expected at least one TaskSpec")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"OverArchConfig.tasks: expected unique names, got {names}")
        validation.check_positive("OverArchConfig.item_side_dim", self.item_side_dim, allow_zero=True)
        validation.check_positive("OverArchConfig.user_side_dim", self.user_side_dim, allow_zero=True)
        validation.check_positive("OverArchConfig.head_dim", self.head_dim, allow_zero=True)
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ValueError(f"OverArchConfig.hidden_dims: expected positive widths, got {self.hidden_dims}")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def input_dim(self) -> int:
        return 3 * self.embed_dim + int(self.use_retrieval_score) + self.item_side_dim + self.user_side_dim

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise KeyError(f"task {name!r} not in {[t.name for t in self.tasks]}")


class MultiTaskHeads(nnx.Module):
    """T independent heads over a shared representation, stored stacked (one einsum for all tasks)."""

    def __init__(self, in_dim: int, num_tasks: int, head_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.head_dim = head_dim
        if head_dim:
            self.w1_TxHxG = nnx.Param(init(rngs.params(), (num_tasks, in_dim, head_dim)))
            self.b1_TxG = nnx.Param(jnp.zeros((num_tasks, head_dim)))
            self.w2_TxG = nnx.Param(init(rngs.params(), (num_tasks, head_dim, 1))[..., 0])
        else:
            self.w_TxH = nnx.Param(init(rngs.params(), (in_dim, num_tasks)).T)
        self.b_T = nnx.Param(jnp.zeros((num_tasks,)))

    def __call__(self, h_NxH: jax.Array) -> jax.Array:
        if self.head_dim:
            g_NxTxG = jax.nn.relu(jnp.einsum("nh,thg->ntg", h_NxH, self.w1_TxHxG[...]) + self.b1_TxG[...])
            return jnp.einsum("ntg,tg->nt", g_NxTxG, self.w2_TxG[...]) + self.b_T[...]
        return h_NxH @ self.w_TxH[...].T + self.b_T[...]


class OverArch(nnx.Module):
    """(user_BxD, cand_BxKxD, item_side_BxKxS?, user_side_BxU?) -> logits_BxKxT."""

    def __init__(self, config: OverArchConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.norm = nnx.LayerNorm(config.input_dim, rngs=rngs)
        dims = (config.input_dim, *config.hidden_dims)
        self.trunk = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.heads = MultiTaskHeads(dims[-1], config.num_tasks, config.head_dim, rngs=rngs)

    def pair_features(self, user_BxD, cand_BxKxD, item_side_BxKxS=None, user_side_BxU=None) -> jax.Array:
        cfg = self.config
        b, k, _ = cand_BxKxD.shape
        u_BxKxD = jnp.broadcast_to(user_BxD[:, None, :], cand_BxKxD.shape).astype(jnp.float32)
        c_BxKxD = cand_BxKxD.astype(jnp.float32)
        parts = [u_BxKxD, c_BxKxD, u_BxKxD * c_BxKxD]
        if cfg.use_retrieval_score:
            parts.append(jnp.sum(u_BxKxD * c_BxKxD, axis=-1, keepdims=True))
        if cfg.item_side_dim:
            parts.append(item_side_BxKxS.astype(jnp.float32))
        if cfg.user_side_dim:
            parts.append(
                jnp.broadcast_to(user_side_BxU[:, None, :], (b, k, cfg.user_side_dim)).astype(jnp.float32)
            )
        return jnp.concatenate(parts, axis=-1)

    def __call__(self, user_BxD, cand_BxKxD, item_side_BxKxS=None, user_side_BxU=None) -> jax.Array:
        check_overarch_inputs(self.config, user_BxD, cand_BxKxD, item_side_BxKxS, user_side_BxU)
        x = self.pair_features(user_BxD, cand_BxKxD, item_side_BxKxS, user_side_BxU)
        b, k, f = x.shape
        h = self.norm(x.reshape(b * k, f))
        for layer in self.trunk:
            h = jax.nn.relu(layer(h))
        return self.heads(h).reshape(b, k, self.config.num_tasks)


def check_overarch_inputs(cfg: OverArchConfig, user_BxD, cand_BxKxD, item_side_BxKxS, user_side_BxU) -> None:
    """Shape / dtype checks (these also run under jit: shapes are static)."""
    validation.check_shape("user_BxD", user_BxD, (None, cfg.embed_dim))
    validation.check_shape("cand_BxKxD", cand_BxKxD, (user_BxD.shape[0], None, cfg.embed_dim))
    validation.check_dtype("user_BxD", user_BxD, "f")
    validation.check_dtype("cand_BxKxD", cand_BxKxD, "f")
    b, k = cand_BxKxD.shape[:2]
    for name, x, width, shape in (
        ("item_side_BxKxS", item_side_BxKxS, cfg.item_side_dim, (b, k, cfg.item_side_dim)),
        ("user_side_BxU", user_side_BxU, cfg.user_side_dim, (b, cfg.user_side_dim)),
    ):
        if width and x is None:
            raise ValueError(f"{name}: the config declares width {width}, got None")
        if not width and x is not None:
            raise ValueError(f"{name}: the config declares no such features (width 0), got shape {x.shape}")
        if width:
            validation.check_shape(name, x, shape)


def task_predictions(logits: jax.Array, tasks: Sequence[TaskSpec]) -> jax.Array:
    """Per-task predictions on the last axis: sigmoid for binary tasks, the logit itself for regression."""
    validation.check_shape("logits", logits, (*logits.shape[:-1], len(tasks)))
    is_binary = jnp.asarray([t.kind == "binary" for t in tasks])
    return jnp.where(is_binary, jax.nn.sigmoid(logits), logits)


def multitask_loss(
    logits_ExT: jax.Array,
    labels_ExT: jax.Array,
    label_mask_ExT: jax.Array,
    tasks: Sequence[TaskSpec],
    task_weights: Sequence[float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum over tasks of the masked mean loss (BCE for binary, squared error for regression).

    Returns (total, {task name: mean loss}). A task with no labelled example contributes 0.
    """
    t = len(tasks)
    validation.check_shape("logits_ExT", logits_ExT, (None, t))
    validation.check_shape("labels_ExT", labels_ExT, logits_ExT.shape)
    validation.check_shape("label_mask_ExT", label_mask_ExT, logits_ExT.shape)
    weights = jnp.ones((t,)) if task_weights is None else jnp.asarray(task_weights, jnp.float32)
    validation.check_shape("task_weights", weights, (t,))
    labels = labels_ExT.astype(jnp.float32)
    logits = logits_ExT.astype(jnp.float32)
    is_binary = jnp.asarray([s.kind == "binary" for s in tasks])
    bce = optax.sigmoid_binary_cross_entropy(logits, jnp.where(is_binary, labels, 0.0))
    per_ExT = jnp.where(is_binary, bce, jnp.square(logits - labels))
    mask = label_mask_ExT.astype(jnp.float32)
    per_T = jnp.sum(per_ExT * mask, axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1.0)
    return jnp.sum(weights * per_T), {s.name: per_T[i] for i, s in enumerate(tasks)}
