"""Algorithms by name. Each module ``mtl_gbml.algorithms.<name>`` defines

- ``default_config() -> ConfigDict``: its own hyperparameters (``config.algo``), and
- ``build(model, config, num_base_classes) -> Algorithm`` (see :mod:`mtl_gbml.algorithms.base`).
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import ml_collections

from mtl_gbml.algorithms.base import Algorithm

NAMES = (
    "mtl",
    "maml",
    "fomaml",
    "anil",
    "imaml",
    "minibatchprox",
    "r2d2",
    "metaoptnet",
    "protonet",
)


def available() -> tuple[str, ...]:
    """Registered algorithm names whose module exists in this checkout."""
    out = []
    for name in NAMES:
        try:
            importlib.import_module(f"mtl_gbml.algorithms.{name}")
        except ModuleNotFoundError:
            continue
        out.append(name)
    return tuple(out)


def _module(name: str):
    if name not in NAMES:
        raise ValueError(f"algorithm={name!r} is unknown; choose one of {list(available())}")
    return importlib.import_module(f"mtl_gbml.algorithms.{name}")


def default_config(name: str) -> ml_collections.ConfigDict:
    return _module(name).default_config()


def build(
    name: str, model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int
) -> Algorithm:
    return _module(name).build(model, config, num_base_classes)


__all__ = ["Algorithm", "available", "build", "default_config", "NAMES"]
