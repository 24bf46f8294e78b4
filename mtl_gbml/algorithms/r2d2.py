"""R2D2 (Bertinetto, Henriques, Torr, Vedaldi, ICLR 2019): closed-form ridge-regression head.

Per task: support features X [n, D] with a constant 1 appended (a regularised bias), one-hot
targets Y [n, N]; ``W = X^T (X X^T + lambda I)^{-1} Y`` (Woodbury form: an n x n system, cheap when
n = N*K << D), query logits ``scale * X_q W + bias``. ``lambda``, ``scale`` and ``bias`` are
meta-learned (lambda and scale through their logarithms, so they stay positive), and the
backbone is trained by differentiating through the closed form. The scalar bias cancels in the
softmax cross-entropy (its gradient is zero); it is kept for fidelity to the paper's adjust layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml.algorithms import frozen
from mtl_gbml.algorithms.base import Algorithm


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init_lambda = 1.0  # ridge strength (meta-learned as log lambda)
    c.init_scale = 10.0  # logit scale (meta-learned as log scale)
    c.learn_lambda = True
    return c


def ridge_weights(support_f: jax.Array, support_y: jax.Array, ways: int, lam) -> jax.Array:
    """W [D+1, ways] of ridge regression on [support_f, 1] -> one-hot, in Woodbury form."""
    n = support_f.shape[0]
    x = jnp.concatenate([support_f, jnp.ones((n, 1), support_f.dtype)], axis=1)
    y = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    gram = x @ x.T + lam * jnp.eye(n, dtype=support_f.dtype)
    alpha = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram, lower=True), y)
    return x.T @ alpha


def logits(params, support_f, support_y, query_f, ways):
    p = params["r2d2"]
    w = ridge_weights(support_f, support_y, ways, jnp.exp(p["log_lambda"]))
    xq = jnp.concatenate([query_f, jnp.ones((query_f.shape[0], 1), query_f.dtype)], axis=1)
    return jnp.exp(p["log_scale"]) * (xq @ w) + p["bias"]


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo

    def init_head(rng, dim):
        return {
            "r2d2": {
                "log_lambda": jnp.log(jnp.asarray(a.init_lambda, jnp.float32)),
                "log_scale": jnp.log(jnp.asarray(a.init_scale, jnp.float32)),
                "bias": jnp.zeros((), jnp.float32),
            }
        }

    def head_logits(params, sf, sy, qf, ways):
        if not a.learn_lambda:
            r = dict(params["r2d2"], log_lambda=jax.lax.stop_gradient(params["r2d2"]["log_lambda"]))
            params = dict(params, r2d2=r)
        return logits(params, sf, sy, qf, ways)

    return frozen.make("r2d2", model, config.model.bn_mode, init_head, head_logits)
