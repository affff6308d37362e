"""Datasets by name: ``load(data_config)`` and ``register(name, loader)`` for your own.

A loader takes the data config section as a plain dict (``name``, ``max_len``, ``synthetic``, ``path``,
``format``, ``file``, ... whatever the config holds) and returns a ``SequenceDataset``. The built-ins are the
table ``BUILTINS`` below, nothing registers itself on import. ``"auto"`` is not a loader: it resolves to
ml-1m when RECJAX_DATA_DIR holds it, else synthetic.

    from recjax.data import registry
    registry.register("clicks", lambda cfg: load_interactions("/data/clicks.tsv.gz", "tsv"))
    dataset = registry.load({"name": "clicks"})
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from recjax.data import interactions, movielens, paths, synthetic
from recjax.data.types import SequenceDataset

Loader = Callable[[dict[str, Any]], SequenceDataset]


def _synthetic(cfg: dict[str, Any]) -> SequenceDataset:
    return synthetic.make_synthetic(**cfg.get("synthetic", {}))


def _ml1m(cfg: dict[str, Any]) -> SequenceDataset:
    return movielens.load_ml1m_sequential()


def _ml100k(cfg: dict[str, Any]) -> SequenceDataset:
    return movielens.load_ml100k()


def check_file_config(cfg: Mapping[str, Any]) -> None:
    """The ``file`` dataset's settings, checked before reading; errors name the config key (data.path ...)."""
    path, fmt = cfg.get("path") or "", cfg.get("format", "csv")
    if not path:
        raise ValueError('data.path: data.name="file" needs the path of the interaction file')
    if fmt not in interactions.FORMATS:
        raise ValueError(
            f"data.format: expected one of {', '.join(map(repr, interactions.FORMATS))}, got {fmt!r}"
        )
    if not pathlib.Path(path).expanduser().is_file():
        raise FileNotFoundError(f"data.path: no such file {path!r}")
    options = dict(cfg.get("file") or {})
    known = {"columns", "min_rating", "user_core", "item_core"}
    if set(options) - known:
        raise ValueError(f"data.file: unknown options {sorted(set(options) - known)}; known: {sorted(known)}")
    try:
        interactions.check_options(fmt, **options)
    except ValueError as e:
        raise ValueError(f"data.file.{e}") from None


def _file(cfg: dict[str, Any]) -> SequenceDataset:
    check_file_config(cfg)
    return interactions.load_interactions(
        cfg["path"], cfg.get("format", "csv"), **dict(cfg.get("file") or {})
    )


BUILTINS: dict[str, Loader] = {
    "synthetic": _synthetic,
    "ml-1m": _ml1m,
    "ml-100k": _ml100k,
    "file": _file,
}
_LOADERS: dict[str, Loader] = dict(BUILTINS)


def register(name: str, loader: Loader, *, overwrite: bool = False) -> None:
    """Makes ``load({"name": name, ...})`` call ``loader(config_dict)``; replacing a name needs overwrite."""
    if not name or name == "auto":
        raise ValueError(f"name: {name!r} is reserved or empty")
    if not callable(loader):
        raise TypeError(f"loader: expected a callable, got {type(loader).__name__}")
    if name in _LOADERS and not overwrite:
        raise ValueError(f"name: dataset {name!r} is already registered (pass overwrite=True to replace it)")
    _LOADERS[name] = loader


def names() -> list[str]:
    """The names ``load`` accepts ("auto" included)."""
    return ["auto", *sorted(_LOADERS)]


def _resolve(name: str) -> str:
    if name != "auto":
        return name
    try:
        paths.data_dir(required="ml-1m")
        return "ml-1m"
    except FileNotFoundError:
        return "synthetic"


def load(data: Mapping[str, Any] | Any | None = None, /, **overrides: Any) -> SequenceDataset:
    """The dataset named by ``data["name"]`` (default "auto"); ``data`` is a dict or a ConfigDict section.

    Keyword arguments override entries: ``load(name="file", path="x.csv", format="csv")``. An unknown name
    raises ValueError listing the known ones.
    """
    cfg = dict(data.to_dict() if hasattr(data, "to_dict") else (data or {}))
    cfg.update(overrides)
    name = cfg.get("name", "auto")
    resolved = _resolve(name)
    if resolved not in _LOADERS:
        raise ValueError(f"data.name: unknown dataset {name!r}; known: {', '.join(names())}")
    return _LOADERS[resolved](cfg)
