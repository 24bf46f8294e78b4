"""MTL: memory-efficient heads, per-task softmax over the task's classes, vmap against a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from mtl_gbml import algorithms, models
from mtl_gbml.data.sampler import make_pool, prepare_tasks, sample_tasks


def _setup(tasks_per_step, num_classes=40, feature_norm=False, bn_per_task=False):
    config = load_config("configs/omniglot/mtl.py", "runlocal")
    config.unlock()
    config.algo.feature_norm, config.algo.bn_per_task = feature_norm, bn_per_task
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


@pytest.mark.parametrize("bn_per_task", [False, True])
def test_vmapped_loss_matches_a_python_loop(bn_per_task):
    """The loss, and with ``bn_per_task`` the BatchNorm state: the mean of the tasks' updates,
    each task through the backbone as its own batch (a loop), else all tasks as one batch."""
    config, algo, params, state, tasks = _setup(4, feature_norm=True, bn_per_task=bn_per_task)
    loss, (new_state, _) = algo.meta_loss(params, state, tasks, jax.random.PRNGKey(1))
    # independent computation: backbone passes, then a loop over tasks with an explicit softmax
    x = jnp.concatenate([tasks.support_x, tasks.query_x], 1)
    y = np.concatenate([tasks.support_y, tasks.query_y], 1)
    fwd = lambda x: models.forward(
        models.build(config.model), params["backbone"], state, x, train=True
    )
    if bn_per_task:
        outs = [fwd(x[t]) for t in range(4)]
        feats = np.stack([np.asarray(f, np.float64) for f, _ in outs])
        want_state = jax.tree.map(lambda *s: np.mean(s, axis=0), *[s for _, s in outs])
    else:
        feats, want_state = fwd(x.reshape((-1, 28, 28, 1)))
        feats = np.asarray(feats, np.float64).reshape(4, x.shape[1], -1)
    for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
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


def test_normal_head_init_has_standard_deviation_one_over_sqrt_dim():
    from mtl_gbml.algorithms.mtl import init_head

    h = np.asarray(init_head(jax.random.PRNGKey(0), "normal", 4112, 64, 20))
    assert h.shape == (4112, 64) and abs(h.std() * np.sqrt(64) - 1) < 0.02


def test_test_time_head_is_scikit_learns_logistic_regression_with_eval_logreg_c():
    """adapt_and_predict: features of support + query under model.bn_mode, L2-normalised, then
    LogisticRegression(C=eval.logreg_c) fitted on the support (scikit-learn, lbfgs); logits
    compared up to the per-query constant the softmax ignores. C and the BatchNorm mode both
    change the result."""
    from adaptation_reference import BatchNormNet
    from sklearn.linear_model import LogisticRegression

    from mtl_gbml import base_config
    from mtl_gbml.algorithms import mtl
    from mtl_gbml.data.sampler import Tasks

    rng = np.random.default_rng(0)
    ways = 4
    sx = jnp.asarray(rng.normal(size=(ways * 3, 4, 4, 1)), jnp.float32)
    qx = jnp.asarray(1.0 + 2.0 * rng.normal(size=(10, 4, 4, 1)), jnp.float32)
    sy = jnp.repeat(jnp.arange(ways), 3)
    centred = lambda z: np.asarray(z) - np.asarray(z).mean(1, keepdims=True)
    out = {}
    for c, bn_mode in ((0.5, "transductive"), (3.0, "transductive"), (0.5, "inductive")):
        config = base_config.get_config("mtl")
        config.eval.logreg_c, config.model.bn_mode = c, bn_mode
        algo = mtl.build(BatchNormNet(), config, 10)
        params, state = algo.init(
            jax.random.PRNGKey(1), Tasks(sx[None], sy[None], qx[None], sy[None], sy[None, :ways])
        )
        state = jax.tree.map(lambda s: s + 0.3, state)  # running statistics != the batch's
        out[c, bn_mode] = centred(algo.adapt_and_predict(params, state, sx, sy, qx, ways))
        x = jnp.concatenate([sx, qx])
        f = np.asarray(
            models.forward(
                BatchNormNet(), params["backbone"], state, x, train=False, bn_mode=bn_mode
            )[0],
            np.float64,
        )
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        clf = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(f[: ways * 3], np.asarray(sy))
        want = centred(clf.decision_function(f[ways * 3 :]))
        np.testing.assert_allclose(out[c, bn_mode], want, atol=2e-3, err_msg=f"C={c} {bn_mode}")
    assert np.abs(out[0.5, "transductive"] - out[3.0, "transductive"]).max() > 0.05
    assert np.abs(out[0.5, "transductive"] - out[0.5, "inductive"]).max() > 0.05


def test_two_way_episodes_get_scikit_learns_binary_model():
    """With two classes LogisticRegression fits one weight vector (penalty 0.5 ||d||^2), not the
    multinomial model: both test-time paths (adapt_and_predict, and predict_from_gram for the
    cached features) give its decision function as the difference of their two logits."""
    from adaptation_reference import BatchNormNet
    from sklearn.linear_model import LogisticRegression

    from mtl_gbml import base_config
    from mtl_gbml.algorithms import mtl
    from mtl_gbml.data.sampler import Tasks

    rng = np.random.default_rng(1)
    ways = 2
    sx = jnp.asarray(rng.normal(size=(ways * 3, 4, 4, 1)), jnp.float32)
    qx = jnp.asarray(rng.normal(size=(10, 4, 4, 1)), jnp.float32)
    sy = jnp.repeat(jnp.arange(ways), 3)
    config = base_config.get_config("mtl")
    algo = mtl.build(BatchNormNet(), config, 10)
    params, state = algo.init(
        jax.random.PRNGKey(1), Tasks(sx[None], sy[None], qx[None], sy[None], sy[None, :ways])
    )
    f = np.asarray(algo.embed(params, state, jnp.concatenate([sx, qx])), np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sf, qf = f[: ways * 3], f[ways * 3 :]
    clf = LogisticRegression(C=config.eval.logreg_c, tol=1e-10, max_iter=10000)
    want = clf.fit(sf, np.asarray(sy)).decision_function(qf)
    got = {
        "adapt_and_predict": algo.adapt_and_predict(params, state, sx, sy, qx, ways),
        "predict_from_gram": algo.predict_from_gram(
            params, jnp.asarray(sf @ sf.T, jnp.float32), jnp.asarray(qf @ sf.T, jnp.float32), sy, 2
        ),
    }
    for path, logits in got.items():
        logits = np.asarray(logits)
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], want, atol=2e-3, err_msg=path)
