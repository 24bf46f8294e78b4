"""Meta-MinibatchProx: its meta-gradient lam * (theta - phi*) against central finite differences of
the Moreau envelope min_phi L(phi) + lam/2 ||phi - theta||^2 (float64, strongly convex inner
problem), and the logged value is L(phi*); the runlocal config trains and evaluates."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptation_reference import check_adapt_and_predict
from task_mean_reference import check_meta_loss_is_the_mean_over_tasks

from mtl_gbml import base_config
from mtl_gbml.algorithms import minibatchprox
from mtl_gbml.algorithms import whole_network as wn
from mtl_gbml.algorithms.base import merge_support_query
from mtl_gbml.data.sampler import Tasks


class TinyNet(nn.Module):
    width: int = 4

    @nn.compact
    def __call__(self, x, *, train, use_batch_stats):
        x = x.reshape(x.shape[0], -1)
        x = nn.BatchNorm(use_running_average=not use_batch_stats, momentum=0.9)(nn.Dense(4)(x))
        return jnp.tanh(nn.Dense(self.width)(jnp.tanh(x)))


def random_tasks(key, t=2, ways=3, shots=2, queries=2, hw=2):
    ks = jax.random.split(key, 2)
    sx = jax.random.normal(ks[0], (t, ways * shots, hw, hw, 1), jnp.float64)
    qx = jax.random.normal(ks[1], (t, ways * queries, hw, hw, 1), jnp.float64)
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (t, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (t, 1))
    return Tasks(sx, sy, qx, qy, jnp.tile(jnp.arange(ways), (t, 1)))


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_gradient_is_the_moreau_envelope_gradient():
    with jax.experimental.enable_x64():
        lam, lr, steps = 4.0, 0.1, 600
        config = base_config.get_config("minibatchprox")
        config.data.ways = 3
        config.algo.lam, config.algo.inner_lr, config.algo.inner_steps = lam, lr, steps
        config.algo.head_init = "learned"
        model = TinyNet()
        algo = minibatchprox.build(model, config, 10)
        tasks = random_tasks(jax.random.PRNGKey(0))
        params, state = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), algo.init(jax.random.PRNGKey(1), tasks)
        )
        params = jax.tree.map(lambda p: p + 0.1, params)
        key = jax.random.PRNGKey(2)
        (loss, _), got = jax.value_and_grad(algo.meta_loss, has_aux=True)(params, state, tasks, key)
        net = wn.Net(model, config)
        x, y = merge_support_query(tasks)

        def envelope(p, with_value=False):
            total, data = 0.0, 0.0
            for t in range(2):
                task = lambda f, k, t=t: net.loss(f, state, x[t], y[t])[0]
                phi = wn.gradient_descent(
                    task, p, key, steps=steps, lr=lr, first_order=True, prox=(lam, p)
                )
                dist = sum(
                    jnp.sum((a - b) ** 2)
                    for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(p), strict=True)
                )
                total += (task(phi, key) + lam / 2 * dist) / 2
                data += task(phi, key) / 2
            return (total, data) if with_value else total

        np.testing.assert_allclose(loss, envelope(params, True)[1], rtol=1e-10)
        leaves, treedef = jax.tree.flatten(params)
        sizes = [leaf.size for leaf in leaves]
        x0 = flat(params)

        def unflat(v):
            out, i = [], 0
            for leaf, n in zip(leaves, sizes, strict=True):
                out.append(jnp.asarray(v[i : i + n]).reshape(leaf.shape))
                i += n
            return jax.tree.unflatten(treedef, out)

        f = jax.jit(lambda v: envelope(unflat(v)))
        g = flat(got)
        idx = np.argsort(-np.abs(g))[:12]  # the informative coordinates
        eps = 1e-5
        fd = [
            (f(x0 + eps * np.eye(len(x0))[i]) - f(x0 - eps * np.eye(len(x0))[i])) / (2 * eps)
            for i in idx
        ]
        np.testing.assert_allclose(g[idx], np.array(fd), rtol=1e-5, atol=1e-9)


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
    run_runlocal("minibatchprox", tmp_path)


def test_test_time_adaptation_is_a_plain_loop_of_gradient_steps():
    """adapt_and_predict with test_inner_steps/test_inner_lr (not the training ones) on the
    proximal loss (+ lam/2 ||fast - start||^2), for a zero and a meta-learned head and both
    BatchNorm modes, against a Python loop over models.forward (tests/adaptation_reference.py)."""
    check_adapt_and_predict("minibatchprox", whole=True, lam=1.5, merged=True)


def test_meta_loss_state_and_gradient_are_the_means_over_tasks():
    with jax.experimental.enable_x64():  # random_tasks draws float64
        tasks = random_tasks(jax.random.PRNGKey(3), t=3)
    check_meta_loss_is_the_mean_over_tasks("minibatchprox", TinyNet(), tasks)
