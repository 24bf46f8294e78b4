"""iMAML: the implicit (CG) meta-gradient against the gradient differentiated through the proximal
inner GD unrolled to convergence, on a strongly convex inner problem (float64); the loss value is
the real query loss; the runlocal config trains and evaluates."""

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
from mtl_gbml.algorithms import imaml
from mtl_gbml.algorithms import whole_network as wn
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


def test_implicit_gradient_matches_unrolled_to_convergence():
    with jax.experimental.enable_x64():
        lam, lr, steps = 4.0, 0.1, 600
        config = base_config.get_config("imaml")
        config.data.ways = 3
        config.algo.lam, config.algo.inner_lr, config.algo.inner_steps = lam, lr, steps
        config.algo.cg_steps, config.algo.head_init = 200, "learned"
        config.algo.cg_damping, config.algo.lam_damping = 0.0, 0.0  # the exact implicit gradient
        model = TinyNet()
        algo = imaml.build(model, config, 10)
        tasks = random_tasks(jax.random.PRNGKey(0))
        params, state = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), algo.init(jax.random.PRNGKey(1), tasks)
        )
        params = jax.tree.map(lambda p: p + 0.1, params)
        key = jax.random.PRNGKey(2)
        (loss, _), got = jax.value_and_grad(algo.meta_loss, has_aux=True)(params, state, tasks, key)

        net = wn.Net(model, config)

        def unrolled(p, t):
            support = lambda f, k: net.loss(f, state, tasks.support_x[t], tasks.support_y[t])[0]
            # the anchor is p itself: both the start and the proximal centre move with p
            phi = wn.gradient_descent(support, p, key, steps=steps, lr=lr, prox=(lam, p))
            return net.loss(phi, state, tasks.query_x[t], tasks.query_y[t])[0]

        def unrolled_mean(p):
            return (unrolled(p, 0) + unrolled(p, 1)) / 2

        ref_loss, expected = jax.value_and_grad(unrolled_mean)(params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)  # the logged value is real
        np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-6, atol=1e-9)
        # the implicit correction matters: the plain query gradient at phi* differs
        config.algo.cg_steps = 0
        plain = jax.grad(
            lambda p: imaml.build(model, config, 10).meta_loss(p, state, tasks, key)[0]
        )(params)
        assert np.abs(flat(plain) - flat(expected)).max() > 1e-3 * np.abs(flat(expected)).max()


@pytest.mark.parametrize("cg_damping,lam_damping", [(1.0, 10.0), (0.5, 3.0)])
def test_damped_direction_solves_the_damped_system_built_from_the_dense_hessian(
    cg_damping, lam_damping
):
    """CG's direction against numpy's dense solve of ((1 + c) I + H / (lam + d)) x = g, with H
    the support loss's full Hessian by ``jax.hessian`` at an adapted point (float64)."""
    from jax.flatten_util import ravel_pytree

    with jax.experimental.enable_x64():
        lam = 2.0
        config = base_config.get_config("imaml")
        config.data.ways, config.algo.head_init = 3, "learned"
        model = TinyNet()
        net = wn.Net(model, config)
        tasks = random_tasks(jax.random.PRNGKey(3), t=1)
        params, state = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64),
            imaml.build(model, config, 10).init(jax.random.PRNGKey(4), tasks),
        )
        fast0 = net.initial_fast(params, state, tasks.support_x[0], 3)
        fast0 = jax.tree.map(lambda p: p + 0.3, fast0)  # a non-zero head: curvature everywhere
        support = lambda f: net.loss(f, state, tasks.support_x[0], tasks.support_y[0])[0]
        phi = wn.gradient_descent(
            lambda f, k: support(f), fast0, jax.random.PRNGKey(0), steps=20, lr=0.3,
            prox=(lam, fast0),
        )  # fmt: skip
        g = jax.grad(lambda f: net.loss(f, state, tasks.query_x[0], tasks.query_y[0])[0])(phi)
        flat_phi, unravel = ravel_pytree(phi)
        hessian = np.asarray(jax.hessian(lambda v: support(unravel(v)))(flat_phi))
        n = flat_phi.size
        system = (1.0 + cg_damping) * np.eye(n) + hessian / (lam + lam_damping)
        assert np.linalg.eigvalsh(system).min() > 0  # CG's premise: positive definite
        expected = np.linalg.solve(system, np.asarray(ravel_pytree(g)[0]))
        got = imaml.implicit_direction(support, g, phi, lam, 3 * n, cg_damping, lam_damping)
        np.testing.assert_allclose(ravel_pytree(got)[0], expected, rtol=1e-6, atol=1e-9)
        # the damping matters: the undamped solve is another vector
        undamped = np.linalg.solve(np.eye(n) + hessian / lam, np.asarray(ravel_pytree(g)[0]))
        assert np.abs(undamped - expected).max() > 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("lam", 0.0, "algo.lam=0.0 must be positive"),
        ("cg_steps", -1, "algo.cg_steps=-1 must be >= 0"),
        ("cg_damping", -0.5, "algo.cg_damping=-0.5 must be >= 0"),
        ("lam_damping", -1.0, "algo.lam_damping=-1.0 must be >= 0"),
    ],
)
def test_bad_imaml_values_fail_before_compiling(key, value, message):
    from conftest import load_config

    from mtl_gbml.config_validation import ConfigError, validate

    config = load_config("configs/omniglot/imaml.py", "runlocal")
    config.unlock()
    config.algo[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


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
    run_runlocal("imaml", tmp_path)


def test_conjugate_gradient_solves_spd_and_stays_finite_on_negative_curvature():
    from mtl_gbml.algorithms.imaml import conjugate_gradient

    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    spd = a @ a.T + 0.5 * np.eye(6)
    b = rng.standard_normal(6)
    x = conjugate_gradient(lambda v: {"v": jnp.asarray(spd) @ v["v"]}, {"v": jnp.asarray(b)}, 30)
    np.testing.assert_allclose(x["v"], np.linalg.solve(spd, b), rtol=1e-3, atol=1e-4)
    # indefinite: I + H/lam with a strongly negative eigenvalue; no inf/nan, and b itself is
    # returned when the very first direction has non-positive curvature
    indefinite = np.diag([1.0, 2.0, -5.0, 1.0, 1.0, 1.0])
    bad = {"v": jnp.asarray([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])}
    x = conjugate_gradient(lambda v: {"v": jnp.asarray(indefinite) @ v["v"]}, bad, 5)
    assert np.all(np.isfinite(x["v"]))
    y = conjugate_gradient(lambda v: {"v": jnp.asarray(indefinite) @ v["v"]}, {"v": jnp.ones(6)}, 5)
    assert np.all(np.isfinite(y["v"]))


def test_test_time_adaptation_is_a_plain_loop_of_gradient_steps():
    """adapt_and_predict with test_inner_steps/test_inner_lr (not the training ones) on the
    proximal loss (+ lam/2 ||fast - start||^2), for a zero and a meta-learned head and both
    BatchNorm modes, against a Python loop over models.forward (tests/adaptation_reference.py)."""
    check_adapt_and_predict("imaml", whole=True, lam=2.0)


def test_meta_loss_state_and_gradient_are_the_means_over_tasks():
    with jax.experimental.enable_x64():  # random_tasks draws float64
        tasks = random_tasks(jax.random.PRNGKey(3), t=3)
    check_meta_loss_is_the_mean_over_tasks("imaml", TinyNet(), tasks)
