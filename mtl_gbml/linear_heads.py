"""Heads fitted on frozen features at test time, written for one episode (vmap them over episodes).

``logistic_regression`` is the official MTL recipe's test-time learner: L2-regularised multinomial
logistic regression, the same objective as scikit-learn's ``LogisticRegression(C, lbfgs)``
(``C * sum of cross-entropies + 0.5 * ||W||^2``, intercept unpenalised), solved to convergence by
Nesterov-accelerated gradient descent with a step from the exact smoothness constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SMALL = 32  # up to this many support points, products are broadcast-multiply-sums


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for a small ``a`` [n, n]: as a fused multiply-reduce, which XLA:CPU vectorises
    across a vmapped batch of episodes (a batched dot of tiny matrices loops over the batch)."""
    if a.shape[0] > _SMALL:
        return a @ b
    if b.ndim == 1:
        return (a * b[None, :]).sum(1)
    return (a[:, :, None] * b[None, :, :]).sum(1)


def _top_eigenvalue(a: jax.Array, iters: int = 30) -> jax.Array:
    """Largest eigenvalue of the PSD matrix ``a`` by power iteration (an upper estimate is safe)."""
    v = jnp.ones((a.shape[0],), a.dtype) / jnp.sqrt(a.shape[0])

    def body(v, _):
        w = _mm(a, v)
        return w / (jnp.linalg.norm(w) + 1e-30), None

    v, _ = jax.lax.scan(body, v, None, length=iters)
    return v @ _mm(a, v)


def logistic_regression(
    support_f: jax.Array,
    support_y: jax.Array,
    ways: int,
    c: float = 3.0,
    steps: int = 300,
) -> tuple[jax.Array, jax.Array]:
    """(W [ways, D], b [ways]) minimising ``c * sum_i CE(W f_i + b, y_i) + 0.5 * ||W||^2``.

    With fewer support points than feature dimensions (few-shot: n = ways * shots << D), the
    iterates are run in the span of the support features: from W = 0 every gradient step keeps
    ``W = A^T F`` (the gradient in W is ``F^T (c (P - Y) + A)``), so the same iterates follow from
    ``A [n, ways]`` and the Gram matrix ``F F^T`` at O(n^2 ways) a step instead of O(n D ways).
    """
    n, d = support_f.shape
    xa = jnp.concatenate([support_f, jnp.ones((n, 1), support_f.dtype)], axis=1)
    onehot = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    gram = support_f @ support_f.T  # [n, n]
    # Hessian of the CE sum <= 0.5 * xa^T xa (x) I, so L = 0.5 c lambda_max(xa xa^T) + 1
    lam = _top_eigenvalue(gram + 1.0) * 1.05  # xa xa^T = F F^T + 1 1^T
    lipschitz = 0.5 * c * lam + 1.0
    kappa = lipschitz  # strong convexity 1 (in W)
    momentum = (jnp.sqrt(kappa) - 1.0) / (jnp.sqrt(kappa) + 1.0)

    def run(grad, theta0):
        def body(carry, _):
            theta, prev = carry
            look = jax.tree.map(lambda t, p: t + momentum * (t - p), theta, prev)
            new = jax.tree.map(lambda t, g: t - g / lipschitz, look, grad(look))
            return (new, theta), None

        (theta, _), _ = jax.lax.scan(body, (theta0, theta0), None, length=steps)
        return theta

    if n <= d:  # dual-span iterates: W = A^T F

        def grad_span(theta):
            a, b = theta
            g = c * (jax.nn.softmax(_mm(gram, a) + b, axis=-1) - onehot)
            return g + a, g.sum(0)

        zeros = (jnp.zeros((n, ways), support_f.dtype), jnp.zeros((ways,), support_f.dtype))
        a, b = run(grad_span, zeros)
        return a.T @ support_f, b

    mask = jnp.concatenate([jnp.ones((d,)), jnp.zeros((1,))]).astype(support_f.dtype)

    def grad(theta):  # theta [D+1, ways]
        p = jax.nn.softmax(xa @ theta, axis=-1)
        return c * xa.T @ (p - onehot) + mask[:, None] * theta

    theta = run(grad, jnp.zeros((d + 1, ways), support_f.dtype))
    return theta[:d].T, theta[d]


def prototypes(support_f: jax.Array, support_y: jax.Array, ways: int) -> jax.Array:
    """Class means [ways, D]."""
    onehot = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    return (onehot.T @ support_f) / onehot.sum(0)[:, None]
