"""MetaOptNet-SVM (Lee, Maji, Ravichandran, Soatto, CVPR 2019): a Crammer-Singer multi-class SVM
head fitted per task as its dual QP, meta-gradient by implicit differentiation of the solution.

Dual (as in MetaOptNet's code, ``C = algo.c``, ``r = algo.dual_ridge``): over alpha [n, N],

    min  1/2 sum_m alpha_m^T K alpha_m + r/2 ||alpha||^2 - sum_i alpha[i, y_i]
    s.t. alpha[i, m] <= C [m == y_i],   sum_m alpha[i, m] = 0,

with K = F_s F_s^T the support Gram matrix; the class weights are ``w_m = sum_i alpha[i, m] f_i``
and the query logits ``scale * F_q F_s^T alpha``. ``r > 0`` makes the dual strongly convex (the
primal of the same problem with each support point given its own extra feature of size sqrt(r)).

Solver: each row's feasible set is a scaled simplex after the change of variables
``u_i = C e_{y_i} - alpha_i`` (u_i >= 0, sum u_i = C), so Euclidean projection is one sort per row;
the QP is solved by accelerated projected gradient (step 1/L with L = lambda_max(K) + r,
momentum from the strong convexity r), until the projected-gradient step is at most
``solver_tol`` relative to the iterate, or ``solver_steps`` steps (``solver_tol=0``: always
``solver_steps``). Any solver would do: the gradient does not look at its iterations.

The step count the dual needs grows with sqrt(L / r), and L with the features' scale, so a fixed
count is short of the solution as features grow in training. benchmarks/metaoptnet_solver.py
(Omniglot Conv4 features at initialisation, 16 tasks each, the largest relative error against a
float64 solve): 20-way 1-shot stops by step 292 (error 1.5e-4); 20-way 5-shot by 535 (9.2e-4),
where the fixed 300 steps of the previous default left 1.4e-2; with the features tripled,
20-way 1-shot by 773 (2.1e-4; 300 steps: 2.6e-2) and 20-way 5-shot reaches the 1000-step cap at
7.8e-3 (300 steps: 0.16). On a trained backbone's 20-way 5-shot test episodes: 1.8e-3 by step
687 (300 steps: 4.1e-2), with the same accuracy to 0.01 points. The error is 100-1,800 times
the tolerance in these runs.

At ResNet-12 scales the float32 solve has a floor (a review, 2026-12-04, against a float64 solve;
randomly initialised backbones): with K's condition number ~1e5 (640-d pooled features, |f|^2 ~
1,400) to ~3e6 (the recipes' 16000-d flattened features, |f|^2 ~ 49,000), the 5-way 15-shot
training episodes reach the 1000-step cap at a relative error of 2.4e-2 and 1.9e-2 (the gradient
too), and more steps do not help (10000 steps: 9e-3). The query cross-entropy moved by 0.003 at
logit scale 10 and not in 4 decimals at 1. MetaOptNet itself trains with 3 interior-point
iterations of qpth, in float32 by default.

Meta-gradient (implicit, KKT): at the solution, let P be the orthogonal projector onto the
directions that keep the active bounds active and each row's sum at zero (per row: the coordinates
with u > 0, minus their mean). The KKT conditions say P(grad f) = 0 on that face, so
``d alpha = -(P H P)^+ P (dK alpha)`` with H = K (x) I + r I. The VJP solves
``(P H P + I - P) w = P v`` by conjugate gradient (``jax.scipy.sparse.linalg.cg``, symmetric
positive definite for r > 0) and returns ``dL/dK = -(P w) alpha^T``. Unlike differentiating an
unrolled solver, memory and backward cost do not grow with ``solver_steps``, and the gradient is
that of the exact solution (assuming strict complementarity, which holds almost surely).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml.algorithms import frozen
from mtl_gbml.algorithms.base import Algorithm


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.c = 0.1  # SVM C (MetaOptNet's C_reg)
    c.dual_ridge = 1.0  # r: MetaOptNet adds 1.0 * I to the block kernel
    c.solver_steps = 1000  # at most this many accelerated projected-gradient steps (train, test)
    c.solver_tol = 1e-6  # stop at this relative gradient-mapping step (0: all solver_steps)
    c.cg_steps = 50  # conjugate-gradient iterations of the implicit backward pass
    # Logit scale, meta-learned as its logarithm. MetaOptNet's code starts it at 1 but trains it
    # directly with SGD at lr 0.1 (momentum 0.9), where it moves fast; with our Adam 1e-3 on its
    # logarithm it moves ~1e-3 a step (1 -> 2.07 in 676 steps of the 20w1s budget run), the
    # softmax stays nearly flat (query loss 2.04 at 69% training accuracy, step 100) and
    # learning is slow.
    # Started at 10, as R2D2's: 65.7 -> 83.4% 20w1s validation at step 150 of the same run,
    # paired, same seed (configs/omniglot/metaoptnet.py:budget).
    c.init_scale = 10.0
    # training targets smoothed as in MetaOptNet's train.py --eps (frozen.smoothed_cross_entropy)
    c.label_smoothing = 0.0
    return c


def _project_simplex(v: jax.Array, z: float) -> tuple[jax.Array, jax.Array]:
    """Rows of ``v`` projected onto {u >= 0, sum u = z}; also the support mask (u > 0)."""
    n = v.shape[-1]
    mu = -jnp.sort(-v, axis=-1)
    cssv = jnp.cumsum(mu, axis=-1) - z
    ind = jnp.arange(1, n + 1, dtype=v.dtype)
    rho = jnp.sum(mu - cssv / ind > 0, axis=-1, keepdims=True)
    theta = jnp.take_along_axis(cssv, rho - 1, axis=-1) / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0), v - theta > 0


def _project(alpha: jax.Array, y: jax.Array, c: float):
    """Projection onto {alpha_i <= C y_i, sum_m alpha_im = 0} per row; mask of free coordinates."""
    u, free = _project_simplex(c * y - alpha, c)
    return c * y - u, free


def solve(kernel, y, c: float, ridge: float, steps: int, tol: float = 0.0):
    """(alpha, free mask at the solution, steps taken) for one dual QP.

    ``tol > 0``: stops at the first step whose projected-gradient step from the look-ahead point
    is at most ``tol`` relative, ``||P(look - grad/L) - look|| <= tol ||P(look - grad/L)||``
    (``L`` times it is the gradient mapping, zero exactly at the solution), after at most
    ``steps`` steps (a ``lax.while_loop``; under a vmap each problem keeps its own iterate once
    done, and the loop runs until the last is); ``tol == 0``: exactly ``steps`` steps."""
    y = y.astype(kernel.dtype)
    lipschitz = jnp.linalg.eigvalsh(kernel)[-1] * 1.01 + ridge + 1e-12
    if ridge > 0:
        q = ridge / lipschitz
        momentum = (1 - jnp.sqrt(q)) / (1 + jnp.sqrt(q))
    grad = lambda a: kernel @ a + ridge * a - y

    def step(a, prev, t):
        if ridge > 0:
            beta = momentum
            t_next = t
        else:  # FISTA sequence
            t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
            beta = (t - 1) / t_next
        look = a + beta * (a - prev)
        new, _ = _project(look - grad(look) / lipschitz, y, c)
        return new, t_next, look

    a0 = jnp.zeros_like(y)
    one = jnp.ones((), y.dtype)
    if tol == 0:

        def body(carry, _):
            a, prev, t = carry
            new, t_next, _ = step(a, prev, t)
            return (new, a, t_next), None

        (a, _, _), _ = jax.lax.scan(body, (a0, a0, one), None, length=steps)
        taken = jnp.int32(steps)
    else:

        def cond(carry):
            _, _, _, k, done = carry
            return (k < steps) & ~done

        def body_while(carry):
            a, prev, t, k, _ = carry
            new, t_next, look = step(a, prev, t)
            done = jnp.linalg.norm(new - look) <= tol * jnp.linalg.norm(new)
            return new, a, t_next, k + 1, done

        init = (a0, a0, one, jnp.int32(0), jnp.bool_(False))
        a, _, _, taken, _ = jax.lax.while_loop(cond, body_while, init)
    _, free = _project(a - grad(a) / lipschitz, y, c)  # active set at the solution
    return a, free, taken


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def svm_dual(kernel, y, c: float, ridge: float, steps: int, cg_steps: int, tol: float = 0.0):
    """The dual solution alpha [n, N] for Gram matrix ``kernel`` [n, n] and one-hot ``y`` [n, N]
    (``steps`` and ``tol`` as in ``solve``); differentiable in ``kernel`` by implicit
    differentiation (see the module docstring)."""
    return solve(kernel, y, c, ridge, steps, tol)[0]


def _fwd(kernel, y, c, ridge, steps, cg_steps, tol):
    a, free, _ = solve(kernel, y, c, ridge, steps, tol)
    return a, (kernel, y, a, free)


def _bwd(c, ridge, steps, cg_steps, tol, res, v):
    kernel, y, a, free = res
    m = free.astype(a.dtype)
    count = jnp.maximum(m.sum(-1, keepdims=True), 1.0)
    proj = lambda z: m * (z - (m * z).sum(-1, keepdims=True) / count)
    op = lambda w: proj(kernel @ proj(w) + ridge * proj(w)) + w - proj(w)
    w, _ = jax.scipy.sparse.linalg.cg(op, proj(v), tol=1e-10, maxiter=cg_steps)
    return (-proj(w) @ a.T, jnp.zeros_like(y))


svm_dual.defvjp(_fwd, _bwd)


def logits(params, support_f, support_y, query_f, ways, *, c, ridge, steps, cg_steps, tol=0.0):
    y = jax.nn.one_hot(support_y, ways, dtype=support_f.dtype)
    alpha = svm_dual(support_f @ support_f.T, y, c, ridge, steps, cg_steps, tol)
    return jnp.exp(params["svm"]["log_scale"]) * (query_f @ support_f.T) @ alpha


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo
    if not a.dual_ridge > 0:
        raise ValueError(
            f"algo.dual_ridge={a.dual_ridge} must be > 0: the implicit gradient's CG system is "
            "positive definite only for a strongly convex dual"
        )
    head_logits = functools.partial(
        logits,
        c=a.c,
        ridge=a.dual_ridge,
        steps=a.solver_steps,
        cg_steps=a.cg_steps,
        tol=a.solver_tol,
    )

    def init_head(rng, dim):
        return {"svm": {"log_scale": jnp.log(jnp.asarray(a.init_scale, jnp.float32))}}

    return frozen.make(
        "metaoptnet",
        model,
        config.model.bn_mode,
        init_head,
        head_logits,
        label_smoothing=a.label_smoothing,
    )
