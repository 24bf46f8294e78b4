"""R2D2 (Bertinetto, Henriques, Torr, Vedaldi, ICLR 2019): closed-form ridge-regression head.

Per task: support features X [n, D] with a constant 1 appended (a regularised bias; not with
``intercept=False``, MetaOptNet's ``R2D2Head``), one-hot targets Y [n, N];
``W = X^T (X X^T + lambda I)^{-1} Y`` (Woodbury form: an n x n system, cheap when n = N*K << D),
query logits ``scale * X_q W + bias``. ``lambda``, ``scale`` and ``bias`` are meta-learned (lambda
and scale through their logarithms, so they stay positive; ``learn_lambda=False`` keeps lambda at
``init_lambda``, as MetaOptNet's fixed 50: the config's value is used, whatever weight decay
does to the stored parameter), and the backbone is trained by differentiating through
the closed form. The scalar bias cancels in the softmax cross-entropy (its gradient is zero); it is
kept for fidelity to the paper's adjust layer.
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
    c.intercept = True  # append a constant 1 to the features (False: MetaOptNet's R2D2Head)
    # training targets smoothed as in MetaOptNet's train.py --eps (frozen.smoothed_cross_entropy)
    c.label_smoothing = 0.0
    return c


def _with_ones(f: jax.Array, intercept: bool) -> jax.Array:
    return jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1) if intercept else f


def ridge_weights(
    support_f: jax.Array, support_y: jax.Array, ways: int, lam, intercept: bool = True
) -> jax.Array:
    """W [D+1, ways] of ridge regression on [support_f, 1] -> one-hot, in Woodbury form ([D, ways]
    on support_f alone without ``intercept``)."""
    n = support_f.shape[0]
    x = _with_ones(support_f, intercept)
    y = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    gram = x @ x.T + lam * jnp.eye(n, dtype=support_f.dtype)
    alpha = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram, lower=True), y)
    return x.T @ alpha


def logits(params, support_f, support_y, query_f, ways, intercept: bool = True):
    p = params["r2d2"]
    w = ridge_weights(support_f, support_y, ways, jnp.exp(p["log_lambda"]), intercept)
    return jnp.exp(p["log_scale"]) * (_with_ones(query_f, intercept) @ w) + p["bias"]


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
        if not a.learn_lambda:  # the config's constant: weight decay moves the stored parameter
            fixed = jnp.log(jnp.asarray(a.init_lambda, jnp.float32))
            params = dict(params, r2d2=dict(params["r2d2"], log_lambda=fixed))
        return logits(params, sf, sy, qf, ways, a.intercept)

    return frozen.make(
        "r2d2",
        model,
        config.model.bn_mode,
        init_head,
        head_logits,
        label_smoothing=a.label_smoothing,
    )
