"""ProtoNet: logits against a numpy loop; the vmapped meta-loss against a Python loop over tasks;
the runlocal config trains and evaluates."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_gbml import base_config
from mtl_gbml.algorithms import protonet
from mtl_gbml.data.sampler import Tasks
from mtl_gbml.models.conv4 import Conv4


def test_logits_match_numpy_loop():
    rng = np.random.default_rng(0)
    ways, shots, nq, d = 4, 3, 7, 5
    sf = rng.normal(size=(ways * shots, d))
    sy = np.repeat(np.arange(ways), shots)
    perm = rng.permutation(len(sy))  # class order must not matter
    sf, sy = sf[perm], sy[perm]
    qf = rng.normal(size=(nq, d))
    expected = np.zeros((nq, ways))
    for q in range(nq):
        for k in range(ways):
            proto = sf[sy == k].mean(0)
            expected[q, k] = -np.sum((qf[q] - proto) ** 2)
    with jax.experimental.enable_x64():
        got = protonet.logits(jnp.asarray(sf), jnp.asarray(sy), jnp.asarray(qf), ways)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-10)


def random_tasks(key, t=3, ways=3, shots=2, queries=2, hw=16):
    ks = jax.random.split(key, 2)
    sx = jax.random.normal(ks[0], (t, ways * shots, hw, hw, 1))
    qx = jax.random.normal(ks[1], (t, ways * queries, hw, hw, 1))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (t, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (t, 1))
    return Tasks(sx, sy, qx, qy, jnp.tile(jnp.arange(ways), (t, 1)))


def test_vmapped_meta_loss_matches_python_loop_over_tasks():
    config = base_config.get_config("protonet")
    config.data.ways = 3
    model = Conv4(width=4)
    algo = protonet.build(model, config, 10)
    tasks = random_tasks(jax.random.PRNGKey(1))
    params, state = algo.init(jax.random.PRNGKey(0), tasks)
    f = jax.value_and_grad(algo.meta_loss, has_aux=True)
    (loss, (new_state, _)), grads = f(params, state, tasks, jax.random.PRNGKey(2))
    per = []
    for i in range(3):
        one = jax.tree.map(lambda a, i=i: a[i : i + 1], tasks)
        per.append(f(params, state, one, jax.random.PRNGKey(2)))
    np.testing.assert_allclose(loss, np.mean([p[0][0] for p in per]), rtol=1e-5)
    loop_grads = jax.tree.map(lambda *g: sum(g) / 3, *[p[1] for p in per])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(loop_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    loop_state = jax.tree.map(lambda *s: sum(s) / 3, *[p[0][1][0] for p in per])
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(loop_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the running statistics moved
    assert not np.allclose(jax.tree.leaves(new_state)[0], jax.tree.leaves(state)[0])
    # the embedding is what evaluation caches
    assert algo.embed(params, state, tasks.query_x[0]).shape == (6, 4)


def run_runlocal(algorithm: str, tmp_path):
    """Train and evaluate configs/omniglot/<algorithm>.py:runlocal end to end."""
    if not os.environ.get("MTL_GBML_DATA_DIR"):
        pytest.fail("MTL_GBML_DATA_DIR must name the data directory (omniglot/, splits/)")
    from mtl_gbml.train import train_and_evaluate

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "omniglot", f"{algorithm}.py")
    spec = importlib.util.spec_from_file_location(f"cfg_{algorithm}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("runlocal")
    results = train_and_evaluate(config, str(tmp_path))
    assert results["algorithm"] == algorithm
    assert results["train"]["steps"] == config.train.steps
    for setting in config.eval.settings:
        ways = int(setting.split("w")[0])
        acc = results["eval"][f"{ways}way1shot"]["accuracy"]
        assert 0.0 <= acc <= 100.0 and np.isfinite(acc)
    return results


def test_evaluation_features_use_the_running_statistics():
    """embed (what the cached-feature evaluator stores) is the inductive forward: an image's
    features do not depend on the rest of its batch, and equal models.forward(train=False)."""
    from adaptation_reference import BatchNormNet

    from mtl_gbml import models

    config = base_config.get_config("protonet")
    algo = protonet.build(BatchNormNet(), config, 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 4, 4, 1))
    y = jnp.zeros((1, 8), jnp.int32)
    params, state = algo.init(jax.random.PRNGKey(1), Tasks(x, y, x, y, y[:, :1]))
    state = jax.tree.map(lambda s: s + 0.3, state)  # running statistics != any batch's
    whole = np.asarray(algo.embed(params, state, x[0]))
    np.testing.assert_allclose(
        np.asarray(algo.embed(params, state, x[0, :3])), whole[:3], atol=1e-6
    )
    want = models.forward(BatchNormNet(), params["backbone"], state, x[0], train=False)[0]
    np.testing.assert_allclose(whole, np.asarray(want), atol=1e-6)


def test_runlocal_trains_and_evaluates(tmp_path):
    run_runlocal("protonet", tmp_path)
