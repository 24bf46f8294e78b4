"""FO-MAML: its meta-gradient equals the query gradient at the parameters adapted by MAML's inner
loop with every inner gradient stopped (written here as a Python loop); it differs from MAML's;
the runlocal config trains and evaluates."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptation_reference import check_adapt_and_predict

from mtl_gbml import base_config, models
from mtl_gbml.algorithms import fomaml, maml
from mtl_gbml.algorithms.base import cross_entropy
from mtl_gbml.data.sampler import Tasks


class TinyNet(nn.Module):
    width: int = 5

    @nn.compact
    def __call__(self, x, *, train, use_batch_stats):
        x = x.reshape(x.shape[0], -1)
        x = nn.BatchNorm(use_running_average=not use_batch_stats, momentum=0.9)(nn.Dense(5)(x))
        return jnp.tanh(nn.Dense(self.width)(jnp.tanh(x)))


def random_tasks(key, t=2, ways=3, shots=2, queries=2, hw=3):
    ks = jax.random.split(key, 2)
    sx = jax.random.normal(ks[0], (t, ways * shots, hw, hw, 1))
    qx = jax.random.normal(ks[1], (t, ways * queries, hw, hw, 1))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (t, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (t, 1))
    return Tasks(sx, sy, qx, qy, jnp.tile(jnp.arange(ways), (t, 1)))


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_gradient_is_maml_with_inner_gradients_stopped():
    config = base_config.get_config("fomaml")
    config.data.ways = 3
    config.algo.inner_steps, config.algo.inner_lr = 3, 0.5
    config.algo.head_init = "learned"
    model = TinyNet()
    algo = fomaml.build(model, config, 10)
    tasks = random_tasks(jax.random.PRNGKey(0))
    params, state = algo.init(jax.random.PRNGKey(1), tasks)
    params = jax.tree.map(lambda p: p + 0.2, params)
    key = jax.random.PRNGKey(2)
    got = jax.grad(lambda p: algo.meta_loss(p, state, tasks, key)[0])(params)

    def loss(p, x, y):
        f, _ = models.forward(model, p["backbone"], state, x, train=True)
        return cross_entropy(f @ p["head"]["w"].T + p["head"]["b"], y)

    expected = []
    for t in range(2):
        fast = params
        for _ in range(3):  # plain numbers: nothing to differentiate through
            g = jax.grad(loss)(fast, tasks.support_x[t], tasks.support_y[t])
            fast = jax.tree.map(lambda p, g: p - 0.5 * g, fast, g)
        expected.append(jax.grad(loss)(fast, tasks.query_x[t], tasks.query_y[t]))
    expected = jax.tree.map(lambda *g: sum(g) / 2, *expected)
    np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-4, atol=1e-6)
    second = maml.build(model, config, 10)
    so = jax.grad(lambda p: second.meta_loss(p, state, tasks, key)[0])(params)
    assert np.max(np.abs(flat(so) - flat(got))) > 1e-3 * np.max(np.abs(flat(got)))


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


def test_runlocal_trains_and_evaluates(tmp_path):
    run_runlocal("fomaml", tmp_path)


def test_test_time_adaptation_is_a_plain_loop_of_gradient_steps():
    """adapt_and_predict with test_inner_steps/test_inner_lr (not the training ones), for a
    zero and a meta-learned head and both BatchNorm modes, against a Python loop over
    models.forward (tests/adaptation_reference.py)."""
    check_adapt_and_predict("fomaml", whole=True)
