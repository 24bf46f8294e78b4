"""R2D2: the Woodbury-form ridge head against numpy's primal solve and lstsq (float64); gradients
reach lambda, the scale and the backbone; the runlocal config trains and evaluates."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_gbml import base_config
from mtl_gbml.algorithms import r2d2
from mtl_gbml.data.sampler import Tasks
from mtl_gbml.models.conv4 import Conv4


@pytest.mark.parametrize("intercept", [True, False])  # False: MetaOptNet's R2D2Head
@pytest.mark.parametrize("n_per_class,dim", [(2, 9), (5, 4)])  # n < D+1 and n > D+1
def test_ridge_head_matches_numpy(n_per_class, dim, intercept):
    rng = np.random.default_rng(0)
    ways, lam, scale, bias = 3, 0.7, 2.5, 0.3
    sf = rng.normal(size=(ways * n_per_class, dim))
    sy = rng.permutation(np.repeat(np.arange(ways), n_per_class))
    qf = rng.normal(size=(6, dim))
    ones = lambda f: np.concatenate([f, np.ones((len(f), 1))], 1) if intercept else f
    x = ones(sf)
    d = x.shape[1]
    y = np.eye(ways)[sy]
    w = np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ y)  # primal d x d system
    # the same minimiser as least squares on the augmented system [x; sqrt(lam) I] w = [y; 0]
    aug_x = np.concatenate([x, np.sqrt(lam) * np.eye(d)])
    aug_y = np.concatenate([y, np.zeros((d, ways))])
    np.testing.assert_allclose(w, np.linalg.lstsq(aug_x, aug_y, rcond=None)[0], atol=1e-10)
    expected = scale * ones(qf) @ w + bias
    with jax.experimental.enable_x64():
        got_w = r2d2.ridge_weights(jnp.asarray(sf), jnp.asarray(sy), ways, lam, intercept)
        np.testing.assert_allclose(np.asarray(got_w), w, rtol=1e-9, atol=1e-11)
        params = {
            "r2d2": {
                "log_lambda": jnp.log(lam),
                "log_scale": jnp.log(scale),
                "bias": jnp.asarray(bias),
            }
        }
        got = r2d2.logits(
            params, jnp.asarray(sf), jnp.asarray(sy), jnp.asarray(qf), ways, intercept
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9, atol=1e-11)


def test_meta_gradient_reaches_lambda_scale_and_backbone():
    config = base_config.get_config("r2d2")
    config.data.ways = 3
    algo = r2d2.build(Conv4(width=4), config, 10)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    tasks = Tasks(
        jax.random.normal(k1, (2, 3, 16, 16, 1)),
        jnp.tile(jnp.arange(3), (2, 1)),
        jax.random.normal(k2, (2, 6, 16, 16, 1)),
        jnp.tile(jnp.repeat(jnp.arange(3), 2), (2, 1)),
        jnp.tile(jnp.arange(3), (2, 1)),
    )
    params, state = algo.init(jax.random.PRNGKey(1), tasks)
    grads = jax.grad(lambda p: algo.meta_loss(p, state, tasks, jax.random.PRNGKey(2))[0])(params)
    assert abs(float(grads["r2d2"]["log_lambda"])) > 0
    assert abs(float(grads["r2d2"]["log_scale"])) > 0
    assert abs(float(grads["r2d2"]["bias"])) < 1e-6  # a scalar shift cancels in the softmax
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["backbone"])) > 0


def test_initial_values_and_a_fixed_lambda():
    """lambda and the scale start at init_lambda / init_scale; learn_lambda=False leaves lambda's
    gradient exactly zero while the scale and the backbone still learn."""
    from adaptation_reference import BatchNormNet

    config = base_config.get_config("r2d2")
    config.data.ways = 3
    config.algo.init_lambda, config.algo.init_scale, config.algo.learn_lambda = 0.7, 3.0, False
    algo = r2d2.build(BatchNormNet(), config, 10)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    tasks = Tasks(
        jax.random.normal(k1, (2, 6, 4, 4, 1)),
        jnp.tile(jnp.repeat(jnp.arange(3), 2), (2, 1)),
        jax.random.normal(k2, (2, 6, 4, 4, 1)),
        jnp.tile(jnp.repeat(jnp.arange(3), 2), (2, 1)),
        jnp.tile(jnp.arange(3), (2, 1)),
    )
    params, state = algo.init(jax.random.PRNGKey(1), tasks)
    assert float(jnp.exp(params["r2d2"]["log_lambda"])) == pytest.approx(0.7)
    assert float(jnp.exp(params["r2d2"]["log_scale"])) == pytest.approx(3.0)
    grads = jax.grad(lambda p: algo.meta_loss(p, state, tasks, jax.random.PRNGKey(2))[0])(params)
    assert float(grads["r2d2"]["log_lambda"]) == 0.0
    assert abs(float(grads["r2d2"]["log_scale"])) > 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["backbone"])) > 0
    # weight decay (the RGB recipes' 5e-4 with SGD 0.1) moves every parameter, the stored
    # log_lambda too: the head must keep using init_lambda (it decayed 50 -> 1 in 20 epochs)
    decayed = dict(params, r2d2=dict(params["r2d2"], log_lambda=jnp.asarray(0.0)))
    loss = lambda p: algo.meta_loss(p, state, tasks, jax.random.PRNGKey(2))[0]
    assert float(loss(decayed)) == float(loss(params))
    config.algo.learn_lambda = True
    learned = r2d2.build(BatchNormNet(), config, 10)
    assert float(learned.meta_loss(decayed, state, tasks, jax.random.PRNGKey(2))[0]) != float(
        loss(params)
    )


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
    run_runlocal("r2d2", tmp_path)
