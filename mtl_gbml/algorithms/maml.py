"""MAML (Finn, Abbeel, Levine, ICML 2017): second-order meta-gradient through the inner loop.

Per task: ``inner_steps`` GD steps of size ``inner_lr`` on all parameters (backbone and N-way head,
see :mod:`mtl_gbml.algorithms.whole_network`) on the support set, as a ``lax.scan``; the task's loss
is the query cross-entropy of the adapted parameters, differentiated through the scan (second
order). Written for one task and vmapped over tasks. ``remat`` wraps each inner step in
``jax.checkpoint``. Test time: ``test_inner_steps`` steps of ``test_inner_lr``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_collections

from mtl_gbml.algorithms import whole_network as wn
from mtl_gbml.algorithms.base import Algorithm


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.inner_steps = 5
    c.inner_lr = 0.1
    c.test_inner_steps = 10
    c.test_inner_lr = 0.1
    c.tasks_vmapped = 0  # tasks per vmapped group, groups in sequence; 0 = all (see whole_network)
    c.head_init = "zeros"  # 'zeros' (per task, not meta-learned) | 'learned' (see whole_network)
    c.remat = False  # jax.checkpoint each inner step: less memory, one more forward per step
    return c


def build(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    num_base_classes: int,
    *,
    first_order: bool = False,
    name: str = "maml",
) -> Algorithm:
    a = config.algo
    net = wn.Net(model, config)

    def task_loss(params, state, sx, sy, qx, qy, rng, ways):
        k_inner, k_query = jax.random.split(rng)
        fast0 = net.initial_fast(params, state, sx, ways)
        support_loss = lambda f, k: net.loss(f, state, sx, sy, k)[0]
        fast = wn.gradient_descent(
            support_loss,
            fast0,
            k_inner,
            steps=a.inner_steps,
            lr=a.inner_lr,
            first_order=first_order,
            remat=a.remat,
        )
        return net.loss(fast, state, qx, qy, k_query)

    def meta_loss(params, state, tasks, rng):
        keys = jax.random.split(rng, tasks.support_y.shape[0])
        one = functools.partial(task_loss, ways=tasks.class_ids.shape[1])
        per_task = lambda xs: one(params, state, *xs)
        vmapped = wn.resolve_tasks_vmapped(a.tasks_vmapped, keys.shape[0])
        losses, (states, accs) = wn.map_tasks(per_task, (*wn.task_arrays(tasks), keys), vmapped)
        return losses.mean(), (wn.mean_state(states), {"accuracy": accs.mean()})

    return Algorithm(
        name=name,
        init=net.init,
        meta_loss=meta_loss,
        adapt_and_predict=wn.make_adapt_and_predict(
            net, steps=a.test_inner_steps, lr=a.test_inner_lr
        ),
        frozen_backbone=False,
    )
