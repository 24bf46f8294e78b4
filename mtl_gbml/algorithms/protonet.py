"""Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017).

A class's prototype is the mean of its support features; a query's logits are the negative squared
Euclidean distances to the prototypes. No head parameters: only the backbone is learned, episode by
episode (see :mod:`mtl_gbml.algorithms.frozen` for BatchNorm and evaluation).

MetaOptNet's ProtoNet head (its ResNet-12 ProtoNet numbers) differs in two options, both off by
default: ``scale_by_dim`` divides the squared distances by the feature dimension (its
``normalize=True``), and ``learn_scale`` multiplies the logits by a meta-learned scale starting at
``init_scale`` (its ``ClassificationHead``'s, from 1; learned here as its logarithm).
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
    c = ml_collections.ConfigDict()
    c.scale_by_dim = False  # divide the squared distances by the feature dimension (MetaOptNet)
    c.learn_scale = False  # a meta-learned logit scale (MetaOptNet's ClassificationHead)
    c.init_scale = 1.0  # its starting value
    # training targets smoothed as in MetaOptNet's train.py --eps (frozen.smoothed_cross_entropy)
    c.label_smoothing = 0.0
    return c


def logits(support_f: jax.Array, support_y: jax.Array, query_f: jax.Array, ways: int) -> jax.Array:
    """-||q - c_k||^2 [nq, ways], expanded as 2 q.c - |c|^2 - |q|^2 (one matmul)."""
    protos = linear_heads.prototypes(support_f, support_y, ways)
    q2 = jnp.sum(query_f * query_f, -1, keepdims=True)
    return 2.0 * query_f @ protos.T - jnp.sum(protos * protos, -1)[None, :] - q2


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo

    def init_head(rng, dim):
        if not a.learn_scale:
            return {}
        return {"protonet": {"log_scale": jnp.log(jnp.asarray(a.init_scale, jnp.float32))}}

    def head_logits(params, sf, sy, qf, ways):
        out = logits(sf, sy, qf, ways)
        if a.scale_by_dim:
            out = out / sf.shape[-1]
        if a.learn_scale:
            out = jnp.exp(params["protonet"]["log_scale"]) * out
        return out

    return frozen.make(
        "protonet",
        model,
        config.model.bn_mode,
        init_head=init_head,
        head_logits=head_logits,
        label_smoothing=a.label_smoothing,
    )
