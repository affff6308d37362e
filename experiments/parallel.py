"""Distributed-training settings of an experiment config (FreeScale, issue 12; docs/FREESCALE.md): the device
mesh, the embedding tables' placement, length buckets and load balancing of the training batches. Every
section is optional; a config without them trains on the Trainer's default 1-d data mesh with replicated
tables and max_len-padded batches, as before.

    config.mesh = {"data": 0, "model": 1, "expert": 1}  # MeshConfig sizes (data 0: what is left)
    config.embeddings = {"axis": "model", "tables": {"items": "row"}, "owners": {}, "sparse_updates": False,
                         "prefetch": False, "prefetch_capacity": 0.25}
    config.data.length_buckets = {"enabled": True, "min_width": 16}
    config.data.balance = {"mode": "zigzag", "alpha": 1.0}  # recjax.data.balancing.MODES

``embeddings.tables`` maps a table name (``"items"``: the item table of SASRec / HSTU) to ``"row"``,
``"table"`` or ``"replicated"``; ``owners`` gives the ``axis`` rank serving a ``"table"``-placed table.
``embeddings.sparse_updates``: the tables' optimizer updates are row-sparse (``prefetch.lazy_rows``: rows
without gradient keep their values and moments, as TorchRec's fused embedding updates);
``embeddings.prefetch``: FreeScale's prioritized lookups of the next batch's rows
(``recjax/sharding/prefetch.py``; identical results; they save critical-path lookups only with
``sparse_updates``), ``prefetch_capacity``: its critical-path slots, a fraction of the batch's ids.
A MoE feed-forward (``model.ffn="moe"``) runs expert-parallel over ``mesh.expert`` when it is > 1
(:func:`model_options`). The mesh takes ``train.num_devices`` devices (0: all). Balancing deals each
step's rows over the mesh's ``data`` devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

MESH_KEYS = ("data", "model", "expert")
EMBEDDING_KEYS = ("axis", "tables", "owners", "sparse_updates", "prefetch", "prefetch_capacity")
# Where each table named in embeddings.tables lives in the parameters (SASRec / HSTU's item table).
TABLE_PARAMS = {"items": ("embedding", "items")}
BUCKET_KEYS = ("enabled", "min_width")
BALANCE_KEYS = ("mode", "alpha")


def _section(config: ml_collections.ConfigDict, path: str, keys: tuple[str, ...]) -> dict | None:
    node: Any = config
    for name in path.split("."):
        node = node.get(name) if isinstance(node, (ml_collections.ConfigDict, Mapping)) else None
        if node is None:
            return None
    out = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)
    unknown = sorted(set(out) - set(keys))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {list(keys)}")
    return out


def _mesh_config(config, num_devices: int):
    from recjax.sharding import mesh as mesh_lib

    section = _section(config, "mesh", MESH_KEYS)
    if section is None:
        return None
    return mesh_lib.MeshConfig(**section, num_devices=num_devices)


def _plan(config):
    from recjax.sharding import embedding as embedding_lib

    section = _section(config, "embeddings", EMBEDDING_KEYS)
    if section is None:
        return None
    tables, owners = dict(section.get("tables") or {}), dict(section.get("owners") or {})
    if not tables:
        raise ValueError("embeddings.tables: expected at least one table, e.g. {'items': 'row'}")
    extra = sorted(set(owners) - set(tables))
    if extra:
        raise ValueError(f"embeddings.owners: tables {extra} are not in embeddings.tables {sorted(tables)}")
    axis = section.get("axis", "model")
    if axis not in ("data", "model", "expert"):
        raise ValueError(f"embeddings.axis: expected 'data', 'model' or 'expert', got {axis!r}")
    placements = tuple(
        embedding_lib.TablePlacement(name, placement, owner=int(owners.get(name, 0)))
        for name, placement in tables.items()
    )
    return embedding_lib.EmbeddingPlan(placements, axis)


def _prefetch_settings(config) -> tuple[bool, Any]:
    """(sparse updates, PrefetchConfig or None) of the embeddings section."""
    from recjax.sharding import prefetch as prefetch_lib

    section = _section(config, "embeddings", EMBEDDING_KEYS) or {}
    sparse, prefetch = bool(section.get("sparse_updates", False)), bool(section.get("prefetch", False))
    tables = list((section.get("tables") or {}).keys())
    unknown = sorted(set(tables) - set(TABLE_PARAMS)) if (sparse or prefetch) else []
    if unknown:
        raise ValueError(
            f"embeddings.tables: {unknown} have no known parameter path for sparse_updates / prefetch "
            f"(known: {sorted(TABLE_PARAMS)})"
        )
    if prefetch and len(tables) != 1:
        raise ValueError(f"embeddings.prefetch: expected exactly one table, got {tables}")
    cfg = None
    if prefetch:
        capacity = float(section.get("prefetch_capacity", 0.25))
        cfg = prefetch_lib.PrefetchConfig(
            table=tables[0], param_path=TABLE_PARAMS[tables[0]], capacity=capacity
        )
    return sparse, cfg


def trainer_options(config: ml_collections.ConfigDict, tcfg: Any) -> dict[str, Any]:
    """The Trainer's ``optimizer`` (row-sparse on the tables with ``embeddings.sparse_updates``) and
    ``prefetch`` keyword arguments; empty without those settings."""
    from recjax.sharding import prefetch as prefetch_lib
    from recjax.train.trainer import make_optimizer

    sparse, prefetch = _prefetch_settings(config)
    out: dict[str, Any] = {}
    if sparse:
        tables = (_section(config, "embeddings", EMBEDDING_KEYS) or {}).get("tables") or {}
        out["optimizer"] = prefetch_lib.lazy_rows(make_optimizer(tcfg), [TABLE_PARAMS[t] for t in tables])
    if prefetch is not None:
        out["prefetch"] = prefetch
    return out


def model_options(mesh: Any, model_cfg: dict) -> dict:
    """``model_cfg`` with a MoE feed-forward (``ffn="moe"``) made expert-parallel over the mesh's
    ``expert`` axis when it has more than one device: ``ffn_options`` gain the mesh (the experts' weights
    are placed over that axis by the ``expert`` logical-axis rule, ``recjax.sharding.mesh.DEFAULT_RULES``)."""
    if mesh is None or mesh.shape.get("expert", 1) == 1 or model_cfg.get("ffn") != "moe":
        return model_cfg
    options = dict(model_cfg.get("ffn_options") or {})
    return {**model_cfg, "ffn_options": {**options, "mesh": mesh, "expert_axis": "expert"}}


def _buckets(config) -> tuple[bool, int]:
    section = _section(config, "data.length_buckets", BUCKET_KEYS) or {}
    enabled, min_width = bool(section.get("enabled", False)), int(section.get("min_width", 8))
    if min_width < 1:
        raise ValueError(f"data.length_buckets.min_width: expected >= 1, got {min_width}")
    return enabled, min_width


def _balance(config) -> tuple[str, float]:
    from recjax.data import balancing

    section = _section(config, "data.balance", BALANCE_KEYS) or {}
    mode, alpha = section.get("mode", "none"), float(section.get("alpha", 1.0))
    if mode not in balancing.MODES:
        raise ValueError(f"data.balance.mode: expected one of {balancing.MODES}, got {mode!r}")
    if not alpha > 0:
        raise ValueError(f"data.balance.alpha: expected > 0, got {alpha}")
    return mode, alpha


def check(config: ml_collections.ConfigDict) -> None:
    """Validates the sections (no devices needed): a bad value raises naming the field."""
    _mesh_config(config, int(config.train.get("num_devices", 0)))
    _plan(config)
    _prefetch_settings(config)
    _buckets(config)
    _balance(config)


def setup(config: ml_collections.ConfigDict, batch_iter: Callable) -> tuple[Any, Any, Callable]:
    """``(mesh, embedding_plan, batch_iter)`` for the Trainer: the mesh (None: the Trainer's default),
    the plan (None: every table a plain gather) and ``batch_iter`` wrapped in length buckets and
    balancing. A plan without a ``mesh`` section gets the default ``MeshConfig`` (all devices on
    ``data``)."""
    import jax

    from recjax.data import balancing
    from recjax.sharding import mesh as mesh_lib

    num_devices = int(config.train.get("num_devices", 0))
    mesh_cfg, plan = _mesh_config(config, num_devices), _plan(config)
    if mesh_cfg is None and plan is not None:
        mesh_cfg = mesh_lib.MeshConfig(num_devices=num_devices)
    mesh = mesh_lib.make_nd_mesh(mesh_cfg) if mesh_cfg is not None else None
    (bucketed, min_width), (mode, alpha) = _buckets(config), _balance(config)
    if bucketed:
        batch_iter = balancing.length_bucketed(batch_iter, config.data.max_len, min_width)
    if mode != "none":
        data = mesh.shape["data"] if mesh is not None else (num_devices or jax.device_count())
        batch_iter = balancing.balanced(batch_iter, data, mode, alpha)
    return mesh, plan, batch_iter
