"""Heads fitted on frozen features at test time, written for one episode (vmap them over episodes).

``logistic_regression`` is the official MTL recipe's test-time learner: L2-regularised multinomial
logistic regression, the same objective as scikit-learn's ``LogisticRegression(C, lbfgs)``
(``C * sum of cross-entropies + 0.5 * ||W||^2``, intercept unpenalised), solved to convergence by
Nesterov-accelerated descent, stopped at a gradient-norm tolerance as scikit-learn's lbfgs is: in
the span of the support features (few-shot), with steps preconditioned by Boehning's Hessian
bound; with more support points than feature dimensions, plain gradient steps from the exact
smoothness constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SMALL = 32  # up to this many support points, products are broadcast-multiply-sums


def _kmul(k: jax.Array, x: jax.Array) -> jax.Array:
    """``k[:, :, e] @ x[:, :, e]`` for every episode ``e``: k [n, n, E], x [n, m, E] -> [n, m, E],
    the episode axis innermost. For small n, a sum of n broadcast products, each an elementwise
    loop that XLA:CPU vectorises across the episodes (a batched dot of tiny matrices, or a
    reduction over a middle axis, loops over them)."""
    if k.shape[0] > _SMALL:
        return jnp.einsum("ije,jme->ime", k, x)
    out = k[:, 0, None, :] * x[None, 0]
    for j in range(1, k.shape[1]):
        out = out + k[:, j, None, :] * x[None, j]
    return out


def _top_eigenvalues(k: jax.Array, iters: int = 30) -> jax.Array:
    """Largest eigenvalue of every episode's PSD matrix ``k[:, :, e]`` [n, n, E] -> [E], by power
    iteration. The Rayleigh quotient never exceeds the true value, so a caller that needs an
    upper bound (a Lipschitz constant) adds a margin."""
    v = jnp.ones((k.shape[0], 1, k.shape[2]), k.dtype) / jnp.sqrt(k.shape[0])

    def body(v, _):
        w = _kmul(k, v)
        return w / (jnp.sqrt((w * w).sum(0)) + 1e-30), None

    v, _ = jax.lax.scan(body, v, None, length=iters)
    return (v * _kmul(k, v)).sum((0, 1))


def _spd_inverse(m: jax.Array) -> jax.Array:
    """Inverse of every episode's symmetric positive definite matrix ``m[:, :, e]`` [n, n, E].

    Up to ``_SMALL`` rows, Gauss-Jordan elimination without pivoting, unrolled: each step is
    elementwise work across the episodes (innermost), as in ``_kmul``; stable for the matrices
    it is used on here, ``I + 0.5 c K`` with K PSD, whose eigenvalues are all >= 1. Larger: a
    batched ``jnp.linalg.inv``."""
    n = m.shape[0]
    if n > _SMALL:
        return jnp.moveaxis(jnp.linalg.inv(jnp.moveaxis(m, -1, 0)), 0, -1)
    inv = jnp.broadcast_to(jnp.eye(n, dtype=m.dtype)[:, :, None], m.shape)
    for j in range(n):
        rm, ri = m[j] / m[j, j], inv[j] / m[j, j]  # the pivot row, scaled: [n, E]
        f = m[:, j, None, :]  # [n, 1, E]: each row's multiple of the pivot row to remove
        m = (m - f * rm[None]).at[j].set(rm)
        inv = (inv - f * ri[None]).at[j].set(ri)
    return inv


def _accelerated_descent(direction, theta0, momentum, steps, tol_sq):
    """Nesterov-accelerated descent with a constant ``momentum``, from ``theta0`` (a pytree):
    ``direction(look)`` gives the step from the look-ahead point (a gradient step, or a
    preconditioned one) and the squared norm of the gradient there.

    Several independent problems at once: ``momentum`` and the squared norm [E] (or scalars for
    one), with each leaf of ``theta0`` carrying the problem axis last ([..., E]). ``tol_sq > 0``:
    each problem stops at the first step whose look-ahead gradient has squared norm
    ``<= tol_sq``, after at most ``steps`` steps (a ``lax.while_loop`` that runs while any problem
    is unfinished; finished problems keep their iterate, exactly as under a vmap of a per-problem
    loop); ``tol_sq == 0``: exactly ``steps`` steps (a ``lax.scan``, reverse-differentiable).
    Returns (theta, the number of steps each problem took)."""

    def step(theta, prev):
        look = jax.tree.map(lambda t, p: t + momentum * (t - p), theta, prev)
        delta, gn = direction(look)
        return jax.tree.map(jnp.add, look, delta), gn

    if tol_sq == 0:

        def body(carry, _):
            theta, prev = carry
            return (step(theta, prev)[0], theta), None

        (theta, _), _ = jax.lax.scan(body, (theta0, theta0), None, length=steps)
        return theta, jnp.full(jnp.shape(momentum), steps, jnp.int32)

    def cond(carry):
        t, _, _, gn, _ = carry
        return (t < steps) & jnp.any(gn > tol_sq)

    def body_while(carry):
        t, theta, prev, gn, taken = carry
        active = gn > tol_sq
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
        new, g = step(theta, prev)
        return t + 1, keep(new, theta), keep(theta, prev), keep(g, gn), taken + active

    shape = jnp.shape(momentum)
    gn0 = jnp.full(shape, jnp.inf, momentum.dtype)
    init = (jnp.int32(0), theta0, theta0, gn0, jnp.zeros(shape, jnp.int32))
    _, theta, _, _, taken = jax.lax.while_loop(cond, body_while, init)
    return theta, taken


def _momentum(lipschitz: jax.Array) -> jax.Array:
    """Nesterov's constant momentum for a 1-strongly-convex, ``lipschitz``-smooth objective."""
    return (jnp.sqrt(lipschitz) - 1.0) / (jnp.sqrt(lipschitz) + 1.0)


def logistic_regression_dual(
    gram: jax.Array,
    support_y: jax.Array,
    ways: int,
    c: float = 3.0,
    steps: int = 1000,
    tol: float = 1e-5,
    with_steps: bool = False,
) -> tuple[jax.Array, ...]:
    """The same fit from the support Gram matrix ``K = F F^T`` [..., n, n] alone: (A [..., n,
    ways], b [..., ways]) with ``W = A^T F``, so query logits are ``(Q F^T) @ A + b``.

    From W = 0 every step below stays in the span of the support features (the gradient in W
    is ``F^T G``, G = c (P - Y) + A), so the iterates follow exactly from ``A`` and K, at
    O(n^2 ways) a step instead of O(n D ways). Stops when the gradient's norm
    ``||grad_W||^2 + ||grad_b||^2 = tr(G^T K G) + ||grad_b||^2`` is at most ``(tol * c * n)^2``:
    scikit-learn's ``tol`` is on the gradient of the objective divided by ``c * n``; ``tol=0``
    runs exactly ``steps`` steps. ``with_steps``: also the steps taken [...].

    **The step** is preconditioned by Boehning's bound on the Hessian: the cross-entropy sum's
    Hessian is at most ``0.5 c [F, 1]^T [F, 1]`` (per class), so the objective is majorised by a
    quadratic whose minimiser is an exact step (a majorise-minimise step; the bound, not K's
    spread, sets its length). In the span it is solved in closed form with
    ``M = (I + 0.5 c K)^-1``, computed once per episode: the support-logit change
    ``Z = M (1 db^T - K G)``, ``dA = -G - 0.5 c Z``, with ``db`` from the intercept's row
    (derivation in the code). Nesterov's momentum on top, set for the unpreconditioned condition
    number, which bounds the preconditioned one (Gershgorin's bound on ``lambda_max(K + 1 1^T)``).
    The logits ``K A + b`` are carried along the iterates (they move by Z), so a step costs two
    [n, n] x [n, ways] products (K G and M (K G)), as a plain gradient step with its norm does.
    On the 5w1s/20w1s/5w5s/20w5s episodes of eval_throughput.md it took a median of
    15/30/36/80 steps, against 51/95/94/170 for plain accelerated gradient descent, to the same
    optimum.

    **Scale.** The carried logits drift from ``K A + b`` by float32 rounding as K grows: on
    L2-normalised features (MTL's recipe, K's entries <= 1) every setting from 5w1s to 5w5s of
    16000-d features met the tolerance in 6-22 steps and agreed with scikit-learn to 3e-4 in the
    logits; on raw ResNet-12 features (|f|^2 ~ 1,400) the fit stopped "converged" at step 601 with
    a true gradient norm of 1.4e3 (a review, 2026-12-04). Normalise features first.

    Leading axes of ``gram`` are independent episodes (``support_y`` [n] is shared), fitted
    together, each stopping at its own tolerance: the same fits as a vmap over them. With up to
    ``_SMALL`` support points the episodes are laid innermost ([n, ways, E]: every step is
    elementwise work that XLA:CPU vectorises across episodes: the 5w1s fit took 0.017 ms an
    episode as a vmap of the one-episode loop written for [n, ways], 0.006 ms this way, in a
    scratch probe; benchmarks/results/eval_throughput.md); larger supports vmap the one-episode
    fit, whose products are real matrix products (laid out this way they were slower at 20w5s).
    """
    n = gram.shape[-1]
    lead = gram.shape[:-2]
    if lead and n > _SMALL:
        fit = lambda g: logistic_regression_dual(g, support_y, ways, c, steps, tol, True)
        a, b, taken = jax.vmap(fit)(gram.reshape((-1, n, n)))
        a, b = a.reshape(lead + (n, ways)), b.reshape(lead + (ways,))
        return (a, b, taken.reshape(lead)) if with_steps else (a, b)
    dtype = gram.dtype
    k = jnp.moveaxis(gram.reshape((-1, n, n)), 0, -1)  # [n, n, E]
    onehot = jax.nn.one_hot(support_y, ways, dtype=dtype)[..., None]  # [n, ways, 1]
    eye = jnp.eye(n, dtype=dtype)[:, :, None]
    m = _spd_inverse(eye + 0.5 * c * k)  # [n, n, E]
    m1 = m.sum(1)[:, None, :]  # M 1: [n, 1, E]
    s = m1.sum(0)  # 1^T M 1: [1, E]
    # Condition number (strong convexity 1 from the penalty): Hessian of the CE sum <=
    # 0.5 c lambda_max(K + 1 1^T) per class, and lambda_max <= the largest absolute row sum
    lipschitz = 0.5 * c * jnp.abs(k + 1.0).sum(1).max(0) + 1.0  # [E]

    def direction(theta):
        # Majorise-minimise step (dA, db) solving, in W = F^T A coordinates,
        #   0.5 c [F 1]^T [F 1] [dW; db] + [dW; 0] = -[F^T G; g_b].
        # The W rows hold if 0.5 c Z + dA = -G, with Z = K dA + 1 db^T the support-logit change;
        # then (I + 0.5 c K) Z = 1 db^T - K G, and the intercept row, 0.5 c 1^T Z = -g_b,
        # gives db = (0.5 c 1^T M K G - g_b) / (0.5 c 1^T M 1).
        a, b, z = theta
        r = c * (jax.nn.softmax(z, axis=1) - onehot)
        g, gb = r + a, r.sum(0)
        kg = _kmul(k, g)
        db = (0.5 * c * (m1 * kg).sum(0) - gb) / (0.5 * c * s)
        dz = m1 * db[None] - _kmul(m, kg)
        gn = (g * kg).sum((0, 1)) + (gb * gb).sum(0)
        return (-g - 0.5 * c * dz, db, dz), gn

    e = k.shape[-1]
    zeros = tuple(jnp.zeros(shape + (e,), dtype) for shape in ((n, ways), (ways,), (n, ways)))
    (a, b, _), taken = _accelerated_descent(
        direction, zeros, _momentum(lipschitz), steps, (tol * c * n) ** 2
    )
    a = jnp.moveaxis(a, -1, 0).reshape(lead + (n, ways))
    b = jnp.moveaxis(b, -1, 0).reshape(lead + (ways,))
    return (a, b, taken.reshape(lead)) if with_steps else (a, b)


def logistic_regression(
    support_f: jax.Array,
    support_y: jax.Array,
    ways: int,
    c: float = 3.0,
    steps: int = 1000,
    tol: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """(W [ways, D], b [ways]) minimising ``c * sum_i CE(W f_i + b, y_i) + 0.5 * ||W||^2``.

    With fewer support points than feature dimensions (few-shot: n = ways * shots << D), the
    iterates are run in the span of the support features (``logistic_regression_dual``). Either
    way: accelerated descent until the gradient norm is at most ``tol * c * n`` (at most ``steps``
    steps; ``tol=0``: exactly ``steps``, differentiable). Give it features of norm ~1 (e.g.
    L2-normalised, as MTL's recipe does): see "Scale" in :func:`logistic_regression_dual`.
    """
    n, d = support_f.shape
    if n <= d:
        a, b = logistic_regression_dual(support_f @ support_f.T, support_y, ways, c, steps, tol)
        return a.T @ support_f, b

    xa = jnp.concatenate([support_f, jnp.ones((n, 1), support_f.dtype)], axis=1)
    onehot = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    lipschitz = 0.5 * c * _top_eigenvalues((xa.T @ xa)[..., None])[0] * 1.05 + 1.0
    mask = jnp.concatenate([jnp.ones((d,)), jnp.zeros((1,))]).astype(support_f.dtype)

    def grad(theta):  # theta [D+1, ways]
        p = jax.nn.softmax(xa @ theta, axis=-1)
        return c * xa.T @ (p - onehot) + mask[:, None] * theta

    zeros = jnp.zeros((d + 1, ways), support_f.dtype)

    def direction(theta):
        g = grad(theta)
        return -g / lipschitz, jnp.sum(g * g)

    theta, _ = _accelerated_descent(
        direction, zeros, _momentum(lipschitz), steps, (tol * c * n) ** 2
    )
    return theta[:d].T, theta[d]


def prototypes(support_f: jax.Array, support_y: jax.Array, ways: int) -> jax.Array:
    """Class means [ways, D]."""
    onehot = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    return (onehot.T @ support_f) / onehot.sum(0)[:, None]
