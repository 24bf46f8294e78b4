"""Plain full-batch gradient-descent training of ANIL and MTL (squared loss, summed).

Self-contained (does not use the main package's algorithms). Works with any model of signature
``model(body, head, body0, head0, x)`` from :mod:`theory.mlp` -- the centred real network or its
linearisation -- so the same loops serve the finite-width experiment and the tests that check the
kernel predictors.

* ANIL: inner loop = ``tau`` GD steps with rate ``lam`` on the head only, on the support set;
  outer loop = GD with rate ``lr`` on (body, head) of Σ_i ½‖f_adapted_i(X_i) − Y_i‖², the
  meta-gradient differentiating through the inner loop (second order).
* MTL: shared body, one head per task, all initialised as given; GD with rate ``lr`` on
  Σ_i ½‖f(D_i; body, head_i) − 𝒴_i‖². At test a new head (given initialisation) is fitted on the
  support set with the same inner loop as ANIL.

Task data are arrays (n_tasks, n_points, d) and (n_tasks, n_points).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from theory.mlp import Model


def _sq(pred: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum((pred - y) ** 2)


def adapt_head(model: Model, body, head, body0, head0, xs, ys, lam: float, tau: int):
    """τ GD steps with rate λ on the head, loss ½‖f(X') − Y'‖²."""

    def step(h, _):
        g = jax.grad(lambda hh: _sq(model(body, hh, body0, head0, xs), ys))(h)
        return (h - lam * g).astype(h.dtype), None

    head, _ = jax.lax.scan(step, head, None, length=tau)
    return head


def anil_predict_task(model: Model, params, params0, xs, ys, xq, lam: float, tau: int):
    """Adapt the head on (xs, ys), then predict on xq."""
    body, head = params
    body0, head0 = params0
    h = adapt_head(model, body, head, body0, head0, xs, ys, lam, tau)
    return model(body, h, body0, head0, xq)


@partial(jax.jit, static_argnames=("model", "tau", "steps"))
def train_anil(model: Model, params0, xs, ys, xq, yq, lam, tau: int, lr, steps: int):
    """Meta-train (body, head) from ``params0``; returns (params, final meta-loss)."""

    def loss(p):
        preds = jax.vmap(lambda a, b, c: anil_predict_task(model, p, params0, a, b, c, lam, tau))(
            xs, ys, xq
        )
        return _sq(preds, yq)

    def step(p, _):
        val, g = jax.value_and_grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, b: (a - lr * b).astype(a.dtype), p, g), val

    params, losses = jax.lax.scan(step, params0, None, length=steps)
    return params, loss(params), losses


@partial(jax.jit, static_argnames=("model", "tau"))
def anil_test(model: Model, params, params0, xs, ys, xq, lam, tau: int):
    """Predictions (n_test, n_query) on unseen tasks."""
    return jax.vmap(lambda a, b, c: anil_predict_task(model, params, params0, a, b, c, lam, tau))(
        xs, ys, xq
    )


@partial(jax.jit, static_argnames=("model", "steps"))
def train_mtl(model: Model, body0, heads0, x, y, lr, steps: int):
    """Jointly train shared body and per-task heads ``heads0`` (n_tasks, width)."""

    def loss(p):
        body, heads = p
        preds = jax.vmap(lambda h, h0, xx: model(body, h, body0, h0, xx))(heads, heads0, x)
        return _sq(preds, y)

    def step(p, _):
        val, g = jax.value_and_grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, b: (a - lr * b).astype(a.dtype), p, g), val

    params, losses = jax.lax.scan(step, (body0, heads0), None, length=steps)
    return params, loss(params), losses


@partial(jax.jit, static_argnames=("model", "tau"))
def mtl_test(model: Model, body, body0, head_new0, xs, ys, xq, lam, tau: int):
    """New head from ``head_new0`` fitted on each support set; predictions (n_test, n_query)."""

    def one(a, b, c):
        h = adapt_head(model, body, head_new0, body0, head_new0, a, b, lam, tau)
        return model(body, h, body0, head_new0, c)

    return jax.vmap(one)(xs, ys, xq)
