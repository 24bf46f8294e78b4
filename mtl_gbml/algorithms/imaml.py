"""iMAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019): implicit meta-gradients.

Per task, the inner problem is proximal to the meta-parameters theta:
``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2``, solved approximately by
``inner_steps`` GD steps of ``inner_lr`` from theta (a ``lax.scan``; nothing is differentiated
through it). The meta-gradient of ``L_query(phi*(theta))`` is, by the implicit function theorem,
``(I + H / lam)^{-1} g`` with ``g = grad L_query(phi*)`` and ``H`` the Hessian of ``L_support`` at
phi*; it is computed by ``cg_steps`` iterations of conjugate gradient
(:func:`conjugate_gradient`, the iteration of ``jax.scipy.sparse.linalg.cg``) on
Hessian-vector products, never forming H.

CG solves the damped system ``(1 + cg_damping) I + H / (lam + lam_damping)``, as the authors'
code does (``Learner.matrix_evaluator`` in github.com/aravindr93/imaml_dev, with its Omniglot
command's ``--cg_damping 1.0`` and the default ``lam_damping=10.0``); ``cg_damping = lam_damping
= 0`` is the exact system above. Undamped, this project's Conv4 did not learn: on the 20-way
1-shot ``:budget`` config the query loss stayed at 2.6 over 40 steps (query accuracy 48%), where
the damped system and the plain query gradient (``cg_steps=0``) both brought it to 2.0 (67-68%).
H has eigenvalues below ``-lam`` there (CG meets non-positive curvature after 2 steps at
initialisation), and after a few steps ``I + H/lam`` is close to singular: 10 CG steps gave a
direction 40x longer than the query gradient, nearly orthogonal to it (cosine 0.11). The damped
direction's cosine with the gradient through the 16 unrolled inner steps was 0.72 there, the
plain query gradient's 0.66.
``meta_loss`` returns a surrogate whose value is the real query loss and whose gradient is this
direction (:func:`mtl_gbml.algorithms.whole_network.surrogate`). Test time: the same proximal GD
from theta on the support set (``test_inner_steps``, ``test_inner_lr``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml.algorithms import whole_network as wn
from mtl_gbml.algorithms.base import Algorithm


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lam = 2.0  # proximal strength lambda
    c.inner_steps = 16
    c.inner_lr = 0.1
    c.test_inner_steps = 16
    c.test_inner_lr = 0.1
    c.cg_steps = 5
    # CG's system is (1 + cg_damping) I + H / (lam + lam_damping); 0 and 0 give the exact
    # (I + H / lam). 1.0 and 10.0 are those of the authors' code (imaml_dev, see module docstring)
    c.cg_damping = 1.0
    c.lam_damping = 10.0
    c.tasks_vmapped = 0  # tasks per vmapped group, groups in sequence; 0 = all (see whole_network)
    c.head_init = "zeros"  # 'zeros' (per task) | 'learned' (see whole_network)
    return c


def conjugate_gradient(matvec, b, steps: int):
    """``steps`` iterations of CG for ``matvec(x) = b`` (pytrees), from x0 = b.

    The same iteration as ``jax.scipy.sparse.linalg.cg`` with a fixed count and no tolerance;
    jax 0.5.3's ``cg`` fails inside the vmapped, sharded train step (its ``device_put`` of the
    right-hand side raises an AssertionError under vmap there), while this one is plain lax.
    ``I + H / lam`` is positive definite only where the support loss is convex enough (H >
    -lam I); CG stops at the first direction of non-positive curvature (or an exact solution)
    and returns its iterate so far, instead of dividing by p.Ap <= 0 (which overflows).
    """
    dot = lambda u, v: wn.tree_vdot(u, v)
    x = b
    r = wn.tree_add(b, matvec(x), -1.0)
    p, rs = r, dot(r, r)

    def body(_, carry):
        x, r, p, rs, done = carry
        ap = matvec(p)
        pap = dot(p, ap)
        done = done | ~(pap > 0) | ~(rs > 0)
        alpha = jnp.where(done, 0.0, rs / jnp.where(done, 1.0, pap))
        x = wn.tree_add(x, p, alpha)
        r = wn.tree_add(r, ap, -alpha)
        rs_new = dot(r, r)
        beta = jnp.where(done, 0.0, rs_new / jnp.where(done, 1.0, rs))
        p = wn.tree_add(r, p, beta)
        return x, r, p, rs_new, done

    x, *_ = jax.lax.fori_loop(0, steps, body, (x, r, p, rs, jnp.asarray(False)))
    return x


def implicit_direction(
    support_loss,
    query_grad,
    phi,
    lam: float,
    cg_steps: int,
    cg_damping: float = 0.0,
    lam_damping: float = 0.0,
):
    """``((1 + cg_damping) I + H / (lam + lam_damping))^{-1} query_grad`` by CG, with H the Hessian
    of ``support_loss`` at ``phi``; with no damping, ``(I + H/lam)^{-1} query_grad``.

    ``H v`` is the VJP of the gradient (H is symmetric), linearised once for all CG steps:
    reverse over reverse, so it works through reverse-mode-only layers (``jax.custom_vjp``, e.g.
    Conv4's chunked first block), and no step recomputes the forward pass."""
    _, hvp = jax.vjp(jax.grad(support_loss), phi)

    def matvec(v):
        scale = 1.0 / (lam + lam_damping)
        return jax.tree.map(lambda x, h: (1.0 + cg_damping) * x + scale * h, v, hvp(v)[0])

    return conjugate_gradient(matvec, query_grad, cg_steps)


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo
    net = wn.Net(model, config)

    def task_loss(params, state, sx, sy, qx, qy, rng, ways):
        k_inner, k_support, k_query = jax.random.split(rng, 3)
        theta = jax.lax.stop_gradient(params)
        fast0 = net.initial_fast(theta, state, sx, ways)
        support_loss = lambda f, k=k_support: net.loss(f, state, sx, sy, k)[0]
        phi = wn.gradient_descent(
            support_loss,
            fast0,
            k_inner,
            steps=a.inner_steps,
            lr=a.inner_lr,
            first_order=True,
            prox=(a.lam, fast0),
        )
        (q_loss, (new_state, acc)), q_grad = jax.value_and_grad(net.loss, has_aux=True)(
            phi, state, qx, qy, k_query
        )
        direction = implicit_direction(
            support_loss, q_grad, phi, a.lam, a.cg_steps, a.cg_damping, a.lam_damping
        )
        if a.head_init != "learned":  # the zero head is not a meta-parameter
            direction = {"backbone": direction["backbone"]}
        return wn.surrogate(q_loss, direction, params), (new_state, acc)

    def meta_loss(params, state, tasks, rng):
        keys = jax.random.split(rng, tasks.support_y.shape[0])
        one = functools.partial(task_loss, ways=tasks.class_ids.shape[1])
        per_task = lambda xs: one(params, state, *xs)
        vmapped = wn.resolve_tasks_vmapped(a.tasks_vmapped, keys.shape[0])
        losses, (states, accs) = wn.map_tasks(per_task, (*wn.task_arrays(tasks), keys), vmapped)
        return losses.mean(), (wn.mean_state(states), {"accuracy": accs.mean()})

    return Algorithm(
        name="imaml",
        init=net.init,
        meta_loss=meta_loss,
        adapt_and_predict=wn.make_adapt_and_predict(
            net, steps=a.test_inner_steps, lr=a.test_inner_lr, prox_lam=a.lam
        ),
        frozen_backbone=False,
    )
