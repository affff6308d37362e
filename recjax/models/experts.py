"""Surface experts of Foundation–Expert (arXiv 2508.02929): light per-surface models that read the
foundation model's target-aware embedding (TAE) of each (user, item) from the HyperCast store, with the
gradient stopped, beside their own features and a short history.

Expert (one per surface)::

    z = [stop_gradient(TAE) (when tae_dim > 0); E[item]; mean_h E[history_h]; item side; user side]
    logit = MLP(z)                         (two ReLU layers, then a scalar)

``tae_dim = 0`` is the "expert alone" baseline. The TAE never carries a gradient: it comes from the store
as data, and ``stop_gradient`` keeps it so when a caller feeds a live FM output (tests check it).

``ExpertTask`` trains one surface's expert on that surface's impressions with BCE; its input pipeline reads
each batch's TAE from the store through a reader pinned to one FM version, and the version is part of the
checkpointed task state, so a resumed or evaluated expert refuses TAE of another FM version
(``VersionMismatchError``). Evaluation: the surface's metrics as in ``recjax.models.foundation``.

Letters: B batch (impressions), H short history, D TAE width, F item side width, U user side width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recjax import validation
from recjax.data.surfaces import SurfaceData
from recjax.data.tae_store import TAEReader, VersionMismatchError
from recjax.models.foundation import fixed_batches, metric_names_for, surface_metrics
from recjax.train.tasks import Task


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    num_items: int
    tae_dim: int = 0  # 0: no TAE input (expert alone)
    item_side_dim: int = 0
    user_side_dim: int = 0
    embed_dim: int = 32
    hidden_dim: int = 64
    history_len: int = 10

    def __post_init__(self):
        for name in ("num_items", "embed_dim", "hidden_dim", "history_len"):
            validation.check_positive(f"expert.{name}", getattr(self, name))
        for name in ("tae_dim", "item_side_dim", "user_side_dim"):
            validation.check_positive(f"expert.{name}", getattr(self, name), allow_zero=True)


class Expert(nnx.Module):
    """``expert(items_B, history_BxH, item_side_BxF, user_side_BxU, tae_BxD=None) -> logits_B``."""

    def __init__(self, cfg: ExpertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.items = nnx.Embed(cfg.num_items + 1, cfg.embed_dim, rngs=rngs)
        width = cfg.tae_dim + 2 * cfg.embed_dim + cfg.item_side_dim + cfg.user_side_dim
        self.tae_norm = nnx.LayerNorm(cfg.tae_dim, rngs=rngs) if cfg.tae_dim else None
        self.hidden1 = nnx.Linear(width, cfg.hidden_dim, rngs=rngs)
        self.hidden2 = nnx.Linear(cfg.hidden_dim, cfg.hidden_dim, rngs=rngs)
        self.out = nnx.Linear(cfg.hidden_dim, 1, rngs=rngs)

    def __call__(self, items_B, history_BxH, item_side_BxF, user_side_BxU, tae_BxD=None) -> jax.Array:
        cfg = self.config
        B = items_B.shape[0]
        validation.check_shape("items_B", items_B, (B,))
        validation.check_dtype("items_B", items_B, "iu")
        validation.check_shape("history_BxH", history_BxH, (B, cfg.history_len))
        validation.check_shape("item_side_BxF", item_side_BxF, (B, cfg.item_side_dim))
        validation.check_shape("user_side_BxU", user_side_BxU, (B, cfg.user_side_dim))
        validation.check_range("items_B", items_B, 1, cfg.num_items + 1)
        validation.check_range("history_BxH", history_BxH, 0, cfg.num_items + 1)
        if (tae_BxD is None) != (cfg.tae_dim == 0):
            raise ValueError(
                f"tae_BxD: this expert has tae_dim={cfg.tae_dim}; pass a (B, {cfg.tae_dim}) TAE "
                "exactly when tae_dim > 0"
            )
        hist_valid = (history_BxH > 0)[..., None]
        hist = jnp.sum(self.items(history_BxH) * hist_valid, 1) / jnp.maximum(jnp.sum(hist_valid, 1), 1)
        parts = [self.items(items_B), hist, item_side_BxF, user_side_BxU]
        if tae_BxD is not None:
            validation.check_shape("tae_BxD", tae_BxD, (B, cfg.tae_dim))
            validation.check_finite("tae_BxD", tae_BxD)
            parts.insert(0, self.tae_norm(jax.lax.stop_gradient(tae_BxD)))
        z = jax.nn.relu(self.hidden1(jnp.concatenate(parts, axis=-1).astype(jnp.float32)))
        return self.out(jax.nn.relu(self.hidden2(z)))[:, 0]


def side_features(data: SurfaceData) -> tuple[np.ndarray, np.ndarray]:
    """(item_side (N + 1, F), user_side (U, U')) float32: multi-hot features as they are, categorical
    (rows, 1) codes one-hot (0 = unknown gets its own column)."""

    def encode(feats: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
        cols = [np.zeros((rows, 0), np.float32)]
        for name in sorted(feats):
            f = np.asarray(feats[name])
            cols.append(
                np.eye(int(f.max()) + 1, dtype=np.float32)[f[:, 0]]
                if f.shape[1] == 1
                else f.astype(np.float32)
            )
        return np.concatenate(cols, axis=1)

    ds = data.dataset
    return encode(ds.item_features, ds.num_items + 1), encode(ds.user_features, ds.num_users)


def expert_examples(data: SurfaceData, imp: Mapping[str, np.ndarray], history_len: int, item_side, user_side):
    """Host arrays of the expert's inputs per impression (everything but the TAE)."""
    hist, _ = data.history(imp["user"], imp["cut"], history_len)
    return {
        "items": np.asarray(imp["item"], np.int32),
        "history": hist,
        "item_side": item_side[imp["item"]],
        "user_side": user_side[imp["user"]],
        "label": np.asarray(imp["label"], np.float32),
        "user": np.asarray(imp["user"], np.int32),
    }


INPUT_KEYS = ("items", "history", "item_side", "user_side")


@partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, batch):
    return nnx.merge(graphdef, state)(*(batch[k] for k in INPUT_KEYS), batch.get("tae"))


class ExpertTask(Task):
    """One surface's expert. ``impressions`` maps "train", "valid", "test" to impression sets (all
    surfaces; this task keeps ``surface``'s); ``tae`` maps the same names to store readers of FM version
    ``fm_version`` (None for the expert alone)."""

    def __init__(
        self,
        data: SurfaceData,
        surface: int,
        impressions: Mapping[str, Mapping[str, np.ndarray]],
        *,
        history_len: int = 10,
        tae: Mapping[str, TAEReader] | None = None,
        fm_version: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 4096,
        ks: Sequence[int] = (10,),
        early_stop_metric: str | None = None,
    ):
        if not 0 <= surface < data.surfaces.num_surfaces:
            raise ValueError(
                f"surface: expected an index in [0, {data.surfaces.num_surfaces}), got {surface}"
            )
        missing = [s for s in ("train", *self.splits) if s not in impressions]
        if missing:
            raise ValueError(f"impressions: missing sets {missing}")
        if (tae is None) != (fm_version is None):
            raise ValueError("tae / fm_version: pass both (expert with FM TAE) or neither (expert alone)")
        if tae is not None:
            for name in ("train", *self.splits):
                if name not in tae:
                    raise ValueError(f"tae: no reader for {name!r}")
                tae[name].check_version(fm_version)
        validation.check_positive("batch_size", batch_size)
        self.data, self.surface, self.ks, self.tae, self.fm_version = (
            data,
            surface,
            tuple(ks),
            tae,
            fm_version,
        )
        self.batch_size, self.eval_batch_size, self.history_len = batch_size, eval_batch_size, history_len
        self.item_side, self.user_side = side_features(data)
        self.imp = {
            k: {f: v[np.asarray(imp["surface"]) == surface] for f, v in imp.items()}
            for k, imp in impressions.items()
        }
        self.examples = {
            k: expert_examples(data, imp, history_len, self.item_side, self.user_side)
            for k, imp in self.imp.items()
        }
        self._num_batches = len(self.examples["train"]["items"]) // batch_size
        if not self._num_batches:
            raise ValueError(
                f"batch_size: {batch_size} is more than surface {surface}'s training impressions"
            )
        per = metric_names_for(data.surfaces.kind, self.ks)
        self.early_stop_metric = early_stop_metric or per[1 if data.surfaces.kind == "next_item" else 0]
        if self.early_stop_metric not in self.metric_names():
            raise ValueError(
                f"early_stop_metric: expected one of {self.metric_names()}, got {early_stop_metric!r}"
            )

    def config_for(self, **overrides) -> ExpertConfig:
        """The ExpertConfig matching this task's inputs."""
        return ExpertConfig(
            num_items=self.data.num_items,
            tae_dim=self.tae["train"].dim if self.tae else 0,
            item_side_dim=self.item_side.shape[1],
            user_side_dim=self.user_side.shape[1],
            history_len=self.history_len,
            **overrides,
        )

    def metric_names(self) -> tuple[str, ...]:
        return metric_names_for(self.data.surfaces.kind, self.ks)

    def check_model(self, model: nnx.Module) -> None:
        if not isinstance(model, Expert):
            raise TypeError(f"model: expected an Expert, got {type(model).__name__}")
        want = self.config_for(embed_dim=model.config.embed_dim, hidden_dim=model.config.hidden_dim)
        if model.config != want:
            raise ValueError(f"model: config {model.config} does not match the task's inputs {want}")

    # the FM version travels with the parameters: checked at every epoch start and evaluation
    def init_state(self, params: Any) -> Any:
        return {"fm_version": jnp.asarray(self.fm_version or 0, jnp.int32)}

    def _check_state(self, task_state: Any) -> None:
        if task_state is None or "fm_version" not in task_state:
            return
        got = int(task_state["fm_version"])
        if got != (self.fm_version or 0):
            raise VersionMismatchError(
                f"FM version mismatch: the expert's parameters were trained on TAE of FM version {got}, this "
                f"task reads version {self.fm_version or 0} (0 = no TAE); an expert never mixes two FM "
                "versions"
            )

    def start_epoch(self, task_state: Any) -> Any:
        self._check_state(task_state)
        return task_state

    def _with_tae(self, name: str, batch: dict) -> dict:
        if self.tae is not None:  # the input pipeline's read from the store, pinned to one FM version
            batch["tae"] = self.tae[name].get(batch["user"], batch["items"], version=self.fm_version)
        return batch

    def loss(self, model, batch, rng):
        del rng
        logits = model(*(batch[k] for k in INPUT_KEYS), batch.get("tae"))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["label"])), {}

    def num_train_batches(self) -> int:
        return self._num_batches

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        for b in fixed_batches(self.examples["train"], self.batch_size, self._num_batches, seed, epoch):
            yield self._with_tae("train", b)

    def scores(self, model: nnx.Module, split: str) -> np.ndarray:
        ex = self.examples[split]
        n = len(ex["items"])
        graphdef, state = nnx.split(model)
        out = np.zeros(n, np.float32)
        for lo in range(0, n, self.eval_batch_size):
            idx = np.arange(lo, lo + self.eval_batch_size)
            idx = np.where(idx < n, idx, lo)  # fixed shape: one compilation
            b = self._with_tae(split, {k: v[idx] for k, v in ex.items()})
            m = min(self.eval_batch_size, n - lo)
            out[lo : lo + m] = np.asarray(
                _logits(graphdef, state, {k: b[k] for k in (*INPUT_KEYS, "tae") if k in b})
            )[:m]
        return out

    def evaluate(self, model, split, task_state=None) -> dict[str, float]:
        self.check_split(split)
        self._check_state(task_state)
        return surface_metrics(self.data, self.imp[split], self.scores(model, split), self.surface, self.ks)


def expert_flops_per_request(cfg: ExpertConfig, num_candidates: int) -> float:
    """Multiply-adds x 2 of scoring ``num_candidates`` items (the MLP; lookups and the mean not counted)."""
    width = cfg.tae_dim + 2 * cfg.embed_dim + cfg.item_side_dim + cfg.user_side_dim
    return float(num_candidates * 2 * (width * cfg.hidden_dim + cfg.hidden_dim**2 + cfg.hidden_dim))
