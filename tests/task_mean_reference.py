"""The task batch of a meta-loss, checked against one task at a time (for the GBML tests)."""

from __future__ import annotations

import importlib

import jax
import numpy as np

from mtl_gbml import base_config


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def check_meta_loss_is_the_mean_over_tasks(algorithm: str, model, tasks) -> None:
    """``algorithm`` built on ``model`` (3 ways, 3 inner steps of 0.2), meta_loss over the T tasks
    (cast to float32): its loss, gradient and new BatchNorm state are the means of those of the T
    one-task batches (a Python loop), and the state moved."""
    config = base_config.get_config(algorithm)
    config.data.ways = 3
    config.algo.inner_steps, config.algo.inner_lr = 3, 0.2
    algo = importlib.import_module(f"mtl_gbml.algorithms.{algorithm}").build(model, config, 10)
    tasks = jax.tree.map(
        lambda a: np.asarray(a, np.float32 if a.dtype.kind == "f" else np.int32), tasks
    )
    params, state = algo.init(jax.random.PRNGKey(4), tasks)
    key = jax.random.PRNGKey(5)
    f = jax.value_and_grad(algo.meta_loss, has_aux=True)
    (loss, (new_state, _)), grads = f(params, state, tasks, key)
    t = tasks.support_x.shape[0]
    per = [
        f(params, state, jax.tree.map(lambda a, i=i: a[i : i + 1], tasks), key) for i in range(t)
    ]
    np.testing.assert_allclose(loss, np.mean([p[0][0] for p in per]), rtol=1e-5)
    loop_grads = jax.tree.map(lambda *g: sum(g) / t, *[p[1] for p in per])
    np.testing.assert_allclose(_flat(grads), _flat(loop_grads), rtol=1e-4, atol=1e-6)
    loop_state = jax.tree.map(lambda *s: sum(s) / t, *[p[0][1][0] for p in per])
    np.testing.assert_allclose(_flat(new_state), _flat(loop_state), rtol=1e-5, atol=1e-7)
    assert not np.allclose(_flat(new_state), _flat(state))
