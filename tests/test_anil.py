"""ANIL: its meta-gradient equals MAML's with the backbone frozen in the inner loop (written here
as an unrolled Python loop over the head), in float64; the runlocal config trains and evaluates."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptation_reference import check_adapt_and_predict

from mtl_gbml import base_config, models
from mtl_gbml.algorithms import anil
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
    sx = jax.random.normal(ks[0], (t, ways * shots, hw, hw, 1), jnp.float64)
    qx = jax.random.normal(ks[1], (t, ways * queries, hw, hw, 1), jnp.float64)
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (t, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (t, 1))
    return Tasks(sx, sy, qx, qy, jnp.tile(jnp.arange(ways), (t, 1)))


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("head_init", ["zeros", "learned"])
def test_gradient_is_maml_with_frozen_backbone(head_init):
    with jax.experimental.enable_x64():
        config = base_config.get_config("anil")
        config.data.ways = 3
        config.algo.inner_steps, config.algo.inner_lr = 3, 0.7
        config.algo.head_init = head_init
        model = TinyNet()
        algo = anil.build(model, config, 10)
        tasks = random_tasks(jax.random.PRNGKey(0))
        params, state = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), algo.init(jax.random.PRNGKey(1), tasks)
        )
        params = jax.tree.map(lambda p: p + 0.1, params)
        key = jax.random.PRNGKey(2)
        (loss, (new_state, _)), got = jax.value_and_grad(algo.meta_loss, has_aux=True)(
            params, state, tasks, key
        )

        def maml_frozen_backbone(p):
            total, states = 0.0, []
            for t in range(2):
                fs, _ = models.forward(model, p["backbone"], state, tasks.support_x[t], train=True)
                if head_init == "learned":
                    head = p["head"]
                else:
                    head = {"w": jnp.zeros((3, 5)), "b": jnp.zeros(3)}
                for _ in range(3):  # unrolled, differentiated through (second order)
                    g = jax.grad(
                        lambda h, fs=fs, t=t: cross_entropy(
                            fs @ h["w"].T + h["b"], tasks.support_y[t]
                        )
                    )(head)
                    head = jax.tree.map(lambda h, g: h - 0.7 * g, head, g)
                fq, st = models.forward(model, p["backbone"], state, tasks.query_x[t], train=True)
                total += cross_entropy(fq @ head["w"].T + head["b"], tasks.query_y[t]) / 2
                states.append(st)
            return total, jax.tree.map(lambda *s: sum(s) / 2, *states)

        (ref_loss, ref_state), expected = jax.value_and_grad(maml_frozen_backbone, has_aux=True)(
            params
        )
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(flat(new_state), flat(ref_state), rtol=1e-12)
        assert np.abs(flat(got["backbone"])).max() > 1e-4  # the meta-gradient reaches the backbone
        # test time on cached features is the same rule
        fs = algo.embed(params, state, tasks.support_x[0])
        fq = algo.embed(params, state, tasks.query_x[0])
        logits = algo.predict_from_features(params, fs, tasks.support_y[0], fq, 3)
        direct = algo.adapt_and_predict(
            params, state, tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], 3
        )
        np.testing.assert_allclose(logits, direct, rtol=1e-10)


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
    run_runlocal("anil", tmp_path)


def test_test_time_adaptation_is_a_plain_loop_of_gradient_steps():
    """adapt_and_predict with test_inner_steps/test_inner_lr (not the training ones), for a
    zero and a meta-learned head and both BatchNorm modes, against a Python loop over
    models.forward (tests/adaptation_reference.py)."""
    check_adapt_and_predict("anil", whole=False)
