"""A minimal pure-jax ReLU MLP in NTK parameterisation, its linearisation and empirical kernels.

Same architecture as :mod:`theory.kernels` (bias-free, W_std = √2, depth L hidden layers)::

    h_0 = x,  h_l = relu(√2 · h_{l-1} W_l / √n_{l-1}),  f(x) = √2 · h_L · w / √n_L

with all entries of W_l and of the head w drawn N(0, 1). Parameters are split into
``body`` (list of W_l) and ``head`` (vector w) because ANIL adapts and MTL duplicates the head.

Models used by :mod:`theory.training` have the signature ``model(body, head, body0, head0, x)``
and are *centred*: they return f(x; body, head) − f(x; body0, head0), so the initial output is
exactly zero as assumed by the kernel predictors. ``linear_model`` is the first-order Taylor
expansion around (body0, head0) (the NTK-regime network).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

W_STD = float(np.sqrt(2.0))
Model = Callable[..., jax.Array]


def init_mlp(key: jax.Array, d_in: int, width: int, depth: int, dtype=None) -> dict:
    """Draw ``{"body": [W_1..W_L], "head": w}`` with standard-normal entries."""
    keys = jax.random.split(key, depth + 1)
    dims = [d_in] + [width] * depth
    body = [jax.random.normal(keys[i], (dims[i], dims[i + 1]), dtype) for i in range(depth)]
    return {"body": body, "head": jax.random.normal(keys[-1], (width,), dtype)}


def features(body: list, x: jax.Array) -> jax.Array:
    """Penultimate features h_L(x), shape (n, width)."""
    h = x
    for w in body:
        h = jax.nn.relu(W_STD * h @ w / jnp.sqrt(h.shape[-1]))
    return h


def apply(body: list, head: jax.Array, x: jax.Array) -> jax.Array:
    """Network output f(x), shape (n,)."""
    h = features(body, x)
    return W_STD * h @ head / jnp.sqrt(h.shape[-1])


def centred_model(body, head, body0, head0, x) -> jax.Array:
    """f(x; body, head) − f(x; body0, head0): the real network with zero initial output."""
    return apply(body, head, x) - jax.lax.stop_gradient(apply(body0, head0, x))


def linear_model(body, head, body0, head0, x) -> jax.Array:
    """J(x; body0, head0) · (body − body0, head − head0): the linearised network."""
    tangent = jax.tree_util.tree_map(lambda a, b: a - b, (body, head), (body0, head0))
    return jax.jvp(lambda p: apply(p[0], p[1], x), ((body0, head0),), (tangent,))[1]


def jacobians(body: list, head: jax.Array, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Flattened Jacobians (J_body (n, P_b), J_head (n, width)) of f at (body, head)."""
    flat_b, unravel = ravel_pytree(body)
    jb = jax.jacobian(lambda fb: apply(unravel(fb), head, x))(flat_b)
    jw = jax.jacobian(lambda w: apply(body, w, x))(head)
    return np.asarray(jb), np.asarray(jw)


def empirical_kernels(body: list, head: jax.Array, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Empirical (Θ, K) of one network on the points ``x`` (Θ = J Jᵀ, K = J_head J_headᵀ)."""
    jb, jw = jacobians(body, head, x)
    k = jw @ jw.T
    return jb @ jb.T + k, k
