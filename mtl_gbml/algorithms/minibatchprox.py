"""Meta-MinibatchProx (Zhou, Yuan, Xu, Yan, Feng, NeurIPS 2019): proximal inner solve, first-order
proximal meta-update.

Meta-objective: the mean over tasks of the Moreau envelope
``F_T(theta) = min_phi L_T(phi) + lam/2 ||phi - theta||^2``. Its exact gradient is
``lam * (theta - phi*_T)`` (no second-order terms: envelope theorem). Per task, ``phi*`` is
approximated by ``inner_steps`` GD steps of ``inner_lr`` from theta (a ``lax.scan``, nothing
differentiated through it) on the task's training data: support and query merged in training (the
method has no support/query split), the support set at test time. ``meta_loss`` returns a
surrogate whose gradient is ``lam * (theta - phi*)`` and whose value is the task loss at phi*
(logged with its accuracy; both on the data phi* was fitted to).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_collections

from mtl_gbml.algorithms import whole_network as wn
from mtl_gbml.algorithms.base import Algorithm, merge_support_query


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lam = 1.0  # proximal strength lambda
    c.inner_steps = 10
    c.inner_lr = 0.1
    c.test_inner_steps = 10
    c.test_inner_lr = 0.1
    c.tasks_vmapped = 0  # tasks per vmapped group, groups in sequence; 0 = all (see whole_network)
    c.head_init = "zeros"  # 'zeros' (per task) | 'learned' (see whole_network)
    return c


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo
    net = wn.Net(model, config)

    def task_loss(params, state, x, y, rng, ways):
        k_inner, k_final = jax.random.split(rng)
        theta = jax.lax.stop_gradient(params)
        fast0 = net.initial_fast(theta, state, x, ways)
        train_loss = lambda f, k: net.loss(f, state, x, y, k)[0]
        phi = wn.gradient_descent(
            train_loss,
            fast0,
            k_inner,
            steps=a.inner_steps,
            lr=a.inner_lr,
            first_order=True,
            prox=(a.lam, fast0),
        )
        loss, (new_state, acc) = net.loss(phi, state, x, y, k_final)
        direction = jax.tree.map(lambda t, p: a.lam * (t - p), fast0, phi)
        if a.head_init != "learned":  # the zero head is not a meta-parameter
            direction = {"backbone": direction["backbone"]}
        return wn.surrogate(loss, direction, params), (new_state, acc)

    def meta_loss(params, state, tasks, rng):
        x, y = merge_support_query(tasks)
        keys = jax.random.split(rng, y.shape[0])
        one = functools.partial(task_loss, ways=tasks.class_ids.shape[1])
        per_task = lambda xs: one(params, state, *xs)
        vmapped = wn.resolve_tasks_vmapped(a.tasks_vmapped, keys.shape[0])
        losses, (states, accs) = wn.map_tasks(per_task, (x, y, keys), vmapped)
        return losses.mean(), (wn.mean_state(states), {"accuracy": accs.mean()})

    return Algorithm(
        name="minibatchprox",
        init=net.init,
        meta_loss=meta_loss,
        adapt_and_predict=wn.make_adapt_and_predict(
            net, steps=a.test_inner_steps, lr=a.test_inner_lr, prox_lam=a.lam, merged=True
        ),
        frozen_backbone=False,
    )
