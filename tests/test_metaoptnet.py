"""MetaOptNet: the Crammer-Singer dual solution against scikit-learn's LinearSVC (liblinear's
independent solver); the implicit meta-gradient against central finite differences (float64);
the runlocal config trains and evaluates."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_gbml.algorithms import metaoptnet


@pytest.mark.parametrize("ridge", [1.0, 0.3])
def test_dual_solution_matches_sklearn_crammer_singer(ridge):
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    ways, per, dim, c = 4, 3, 6, 0.5
    x = rng.normal(size=(ways * per, dim))
    y = rng.permutation(np.repeat(np.arange(ways), per))
    n = len(y)
    # the dual with ridge r is the primal on features [x, sqrt(r) e_i]: alpha = extra weights / sqrt(r)
    aug = np.concatenate([x, np.sqrt(ridge) * np.eye(n)], 1)
    svc = LinearSVC(
        multi_class="crammer_singer", C=c, fit_intercept=False, tol=1e-10, max_iter=1_000_000
    ).fit(aug, y)
    expected_alpha = svc.coef_[:, dim:].T / np.sqrt(ridge)
    with jax.experimental.enable_x64():
        onehot = jax.nn.one_hot(y, ways, dtype=jnp.float64)
        alpha = metaoptnet.svm_dual(jnp.asarray(x @ x.T), onehot, c, ridge, 3000, 50)
        alpha = np.asarray(alpha)
    np.testing.assert_allclose(alpha, expected_alpha, atol=2e-5)
    np.testing.assert_allclose(alpha.T @ x, svc.coef_[:, :dim], atol=1e-4)  # class weights
    assert np.all(alpha <= c * np.eye(ways)[y] + 1e-9)
    np.testing.assert_allclose(alpha.sum(1), 0, atol=1e-9)
    assert np.any((alpha > 1e-6) & (alpha < c - 1e-6))  # not a trivial all-bounds solution


def test_implicit_gradient_matches_finite_differences():
    with jax.experimental.enable_x64():
        rng = np.random.default_rng(1)
        ways, per, dim = 3, 3, 4
        sf = jnp.asarray(rng.normal(size=(ways * per, dim)))
        sy = jnp.asarray(rng.permutation(np.repeat(np.arange(ways), per)))
        qf = jnp.asarray(rng.normal(size=(5, dim)))
        qy = jnp.asarray(rng.integers(0, ways, 5))
        params = {"svm": {"log_scale": jnp.log(2.0)}}

        def loss(sf, qf, log_scale):
            p = {"svm": {"log_scale": log_scale}}
            lg = metaoptnet.logits(p, sf, sy, qf, ways, c=0.5, ridge=0.5, steps=4000, cg_steps=200)
            return -jnp.take_along_axis(jax.nn.log_softmax(lg), qy[:, None], 1).mean()

        g_sf, g_qf, g_s = jax.grad(loss, argnums=(0, 1, 2))(sf, qf, params["svm"]["log_scale"])
        f = jax.jit(loss)
        eps = 1e-5
        fd = np.zeros(sf.shape)
        for i in range(sf.shape[0]):
            for j in range(sf.shape[1]):
                e = jnp.zeros(sf.shape).at[i, j].set(eps)
                fd[i, j] = (
                    f(sf + e, qf, params["svm"]["log_scale"])
                    - f(sf - e, qf, params["svm"]["log_scale"])
                ) / (2 * eps)
        np.testing.assert_allclose(np.asarray(g_sf), fd, rtol=1e-4, atol=1e-7)
        assert np.abs(fd).max() > 1e-3 and np.all(np.isfinite(np.asarray(g_qf)))

        # the implicit term matters: dropping it (alpha as a constant) gives another gradient
        def loss_const_alpha(sf):
            y = jax.nn.one_hot(sy, ways, dtype=sf.dtype)
            alpha = jax.lax.stop_gradient(metaoptnet.svm_dual(sf @ sf.T, y, 0.5, 0.5, 4000, 200))
            lg = 2.0 * (qf @ sf.T) @ alpha
            return -jnp.take_along_axis(jax.nn.log_softmax(lg), qy[:, None], 1).mean()

        assert (
            np.abs(np.asarray(jax.grad(loss_const_alpha)(sf)) - fd).max() > 1e-3 * np.abs(fd).max()
        )


def test_default_solver_steps_converge_on_a_20_way_5_shot_gram():
    """solver_steps=300 (the default) against 30,000 steps: 20-way 5-shot, 576-d ReLU features
    scaled to a Gram matrix of largest eigenvalue ~850 (condition number ~850 with ridge 1). The
    accelerated rate (momentum (1 - sqrt q) / (1 + sqrt q), q = ridge / L) leaves 3e-6 here; a
    momentum of (1 - q) / (1 + q) left 3e-2. (At ~9,400, features unscaled, 300 steps leave 3e-3.)"""
    cfg = metaoptnet.default_config()
    rng = np.random.default_rng(0)
    f = 0.3 * np.maximum(rng.normal(size=(100, 576)), 0).astype(np.float32)
    kernel, y = jnp.asarray(f @ f.T), jax.nn.one_hot(jnp.repeat(jnp.arange(20), 5), 20)
    solve = lambda steps: metaoptnet.svm_dual(kernel, y, cfg.c, cfg.dual_ridge, steps, cfg.cg_steps)
    a, ref = solve(cfg.solver_steps), solve(30000)
    assert float(jnp.linalg.norm(a - ref) / jnp.linalg.norm(ref)) < 1e-4


def test_the_logit_scale_starts_at_init_scale():
    from adaptation_reference import BatchNormNet

    from mtl_gbml import base_config
    from mtl_gbml.data.sampler import Tasks

    config = base_config.get_config("metaoptnet")
    config.algo.init_scale = 3.5
    x = jnp.zeros((1, 6, 4, 4, 1))
    y = jnp.zeros((1, 6), jnp.int32)
    params, _ = metaoptnet.build(BatchNormNet(), config, 10).init(
        jax.random.PRNGKey(0), Tasks(x, y, x, y, y[:, :1])
    )
    assert float(jnp.exp(params["svm"]["log_scale"])) == pytest.approx(3.5)


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
    run_runlocal("metaoptnet", tmp_path)
