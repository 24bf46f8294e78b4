"""Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017).

A class's prototype is the mean of its support features; a query's logits are the negative squared
Euclidean distances to the prototypes. No head parameters: only the backbone is learned, episode by
episode (see :mod:`mtl_gbml.algorithms.frozen` for BatchNorm and evaluation).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml import linear_heads
from mtl_gbml.algorithms import frozen
from mtl_gbml.algorithms.base import Algorithm


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()  # no hyperparameters of its own


def logits(support_f: jax.Array, support_y: jax.Array, query_f: jax.Array, ways: int) -> jax.Array:
    """-||q - c_k||^2 [nq, ways], expanded as 2 q.c - |c|^2 - |q|^2 (one matmul)."""
    protos = linear_heads.prototypes(support_f, support_y, ways)
    q2 = jnp.sum(query_f * query_f, -1, keepdims=True)
    return 2.0 * query_f @ protos.T - jnp.sum(protos * protos, -1)[None, :] - q2


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    return frozen.make(
        "protonet",
        model,
        config.model.bn_mode,
        init_head=lambda rng, dim: {},
        head_logits=lambda params, sf, sy, qf, ways: logits(sf, sy, qf, ways),
    )
