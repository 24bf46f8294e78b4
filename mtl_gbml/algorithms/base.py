"""The one interface every algorithm implements, and small shared pieces.

A batch of tasks (:class:`mtl_gbml.data.sampler.Tasks`) has a leading task axis T. Images reaching an
algorithm are already float (preprocessed and augmented inside the jitted step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
State = Any


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Pure functions of one algorithm.

    init(rng, example_tasks) -> (params, state)
    meta_loss(params, state, tasks, rng) -> (loss, (state, metrics)); mean over tasks, the per-task
        loss written for one task and vmapped. ``jax.grad`` of it is the meta-gradient (first-order
        methods return a surrogate whose gradient is their update direction).
    adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng) -> query logits, for
        ONE episode (the evaluator vmaps it); ``ways`` is a static int.
    frozen_backbone: test-time adaptation touches only a head on frozen features, so evaluation can
        embed the split once (inductive BatchNorm) and use
    embed(params, state, x) -> features, and
    predict_from_features(params, support_f, support_y, query_f, ways) -> query logits (one episode).
    Optional, for heads that see features only through inner products after a row-wise map:
    feature_transform(f [..., D]) -> f' [..., D'], the map (the evaluator applies it to the cached
        split once), and
    predict_from_gram(params, support_gram [..., n, n], query_support_gram [..., q, n], support_y,
        ways) -> query logits [..., q, ways], from the transformed features' inner products; it
        must equal ``predict_from_features`` on the raw features. Leading axes are episodes (the
        evaluator hands it a chunk of episodes at once, so a head can vectorise across them;
        ``support_y`` [n] is shared).
    """

    name: str
    init: Callable[..., tuple[Params, State]]
    meta_loss: Callable[..., tuple[jax.Array, tuple[State, dict]]]
    adapt_and_predict: Callable[..., jax.Array]
    frozen_backbone: bool
    embed: Callable[..., jax.Array] | None = None
    predict_from_features: Callable[..., jax.Array] | None = None
    feature_transform: Callable[[jax.Array], jax.Array] | None = None
    predict_from_gram: Callable[..., jax.Array] | None = None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return (logits.argmax(-1) == labels).mean()


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def merge_support_query(tasks) -> tuple[jax.Array, jax.Array]:
    """Support and query of every task as one set: x [T, N*(K+Q), ...], y [T, N*(K+Q)]."""
    x = jnp.concatenate([tasks.support_x, tasks.query_x], axis=1)
    y = jnp.concatenate([tasks.support_y, tasks.query_y], axis=1)
    return x, y


def flatten_tasks(x: jax.Array) -> jax.Array:
    """[T, n, ...] -> [T*n, ...] (one backbone batch over all tasks)."""
    return x.reshape((-1,) + x.shape[2:])


def mean_state(states):
    """Per-task BatchNorm states [T, ...] -> their mean (the average of the per-task updates).

    A ResNet-12 with a DropBlock ramp also keeps its training-step counter there (float32, the
    same in every task): its mean is the count itself, exactly (below 2^24 / T)."""
    return jax.tree.map(lambda s: s.mean(0), states)
