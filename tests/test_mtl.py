"""MTL: memory-efficient heads, per-task softmax over the task's classes, vmap against a loop."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import load_config

from mtl_gbml import algorithms, models
from mtl_gbml.data.sampler import make_pool, prepare_tasks, sample_tasks


def _setup(tasks_per_step, num_classes=40, feature_norm=False):
    config = load_config("configs/omniglot/mtl.py", "runlocal")
    config.unlock()
    config.algo.feature_norm = feature_norm
    imgs = np.random.default_rng(0).integers(0, 255, (num_classes * 4, 28, 28, 1), np.uint8)
    pool = make_pool(imgs, np.repeat(np.arange(num_classes), 4))
    algo = algorithms.build("mtl", models.build(config.model), config, pool.num_classes)
    key = jax.random.PRNGKey(0)
    tasks = sample_tasks(pool, key, 5, 1, 2, tasks_per_step)
    tasks = prepare_tasks(tasks, key, "none", 0)
    params, state = algo.init(key, tasks)
    return config, algo, params, state, tasks


def test_head_parameters_do_not_grow_with_tasks():
    sizes = []
    for t in (1, 3, 16):
        config, _, params, _, _ = _setup(t)
        dim = config.model.width * (1 if config.model.pool_last else 9)  # 1x1 or 3x3 last map
        assert params["head"].shape == (40, dim)
        sizes.append(sum(x.size for x in jax.tree.leaves(params)))
    assert len(set(sizes)) == 1


def test_gradient_touches_only_the_rows_of_sampled_classes():
    _, algo, params, state, tasks = _setup(3)
    grads = jax.grad(lambda p: algo.meta_loss(p, state, tasks, jax.random.PRNGKey(1))[0])(params)
    touched = np.flatnonzero(np.abs(np.asarray(grads["head"])).sum(1) > 0)
    np.testing.assert_array_equal(touched, np.unique(np.asarray(tasks.class_ids)))


def test_vmapped_loss_matches_a_python_loop():
    config, algo, params, state, tasks = _setup(4, feature_norm=True)
    loss, _ = algo.meta_loss(params, state, tasks, jax.random.PRNGKey(1))
    # independent computation: one backbone pass, then a loop over tasks with an explicit softmax
    x = jnp.concatenate([tasks.support_x, tasks.query_x], 1)
    y = np.concatenate([tasks.support_y, tasks.query_y], 1)
    feats, _ = models.forward(
        models.build(config.model),
        params["backbone"],
        state,
        x.reshape((-1, 28, 28, 1)),
        train=True,
    )
    feats = np.asarray(feats, np.float64).reshape(4, x.shape[1], -1)
    head = np.asarray(params["head"], np.float64)
    total = 0.0
    for t in range(4):
        f = feats[t] / np.linalg.norm(feats[t], axis=1, keepdims=True)
        logits = config.algo.logit_scale * f @ head[np.asarray(tasks.class_ids[t])].T
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        # label smoothing (the runlocal config's 0.1): the target puts ls / ways on every class
        ls, ways = config.algo.label_smoothing, logits.shape[1]
        target = np.eye(ways)[y[t]] * (1 - ls) + ls / ways
        total += -(target * logp).sum(1).mean()
    np.testing.assert_allclose(float(loss), total / 4, rtol=1e-5)


def test_official_head_init_scale():
    from mtl_gbml.algorithms.mtl import init_head

    h = np.asarray(init_head(jax.random.PRNGKey(0), "official", 64, 640, 5))
    bound = np.sqrt(1 / 640) * np.sqrt(64 / 5)
    assert h.shape == (64, 640) and np.abs(h).max() <= bound and np.abs(h).max() > 0.95 * bound
