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


def _gram_20_way_5_shot(scale: float):
    rng = np.random.default_rng(0)
    f = scale * np.maximum(rng.normal(size=(100, 576)), 0)
    return f @ f.T, np.asarray(jax.nn.one_hot(jnp.repeat(jnp.arange(20), 5), 20))


def _converged(kernel, y, c, ridge):
    """float64, 100,000 steps (the float64 gradient mapping is at rounding level long before)."""
    with jax.experimental.enable_x64():
        a, _, _ = metaoptnet.solve(jnp.asarray(kernel), jnp.asarray(y), c, ridge, 100_000, 1e-14)
        return np.asarray(a)


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_default_solver_stops_at_its_tolerance_close_to_the_converged_dual(scale):
    """20-way 5-shot, 576-d ReLU features: a Gram matrix of largest eigenvalue ~850 (scale 0.3)
    and ~9,400 (scale 1, condition number ~9,400 with ridge 1). The default tolerance stops
    before ``solver_steps`` within 1e-3 of the converged dual (float64), where the fixed 300
    steps of the previous default left 3e-3 at ~9,400; the accelerated rate (momentum
    (1 - sqrt q) / (1 + sqrt q), q = ridge / L) is what makes either possible: a momentum of
    (1 - q) / (1 + q) left 3e-2 at ~850 in 300 steps."""
    cfg = metaoptnet.default_config()
    kernel, y = _gram_20_way_5_shot(scale)
    ref = _converged(kernel, y, cfg.c, cfg.dual_ridge)
    k32, y32 = jnp.asarray(kernel, jnp.float32), jnp.asarray(y, jnp.float32)
    a, _, taken = metaoptnet.solve(
        k32, y32, cfg.c, cfg.dual_ridge, cfg.solver_steps, cfg.solver_tol
    )
    rel = lambda a: float(np.linalg.norm(np.asarray(a) - ref) / np.linalg.norm(ref))
    assert 0 < int(taken) < cfg.solver_steps
    assert rel(a) < 1e-3
    # svm_dual (the differentiable entry point) gives the same solution
    np.testing.assert_array_equal(
        a, metaoptnet.svm_dual(k32, y32, cfg.c, cfg.dual_ridge, cfg.solver_steps, 1, cfg.solver_tol)
    )
    if scale == 1.0:  # the fixed step count it replaces was short of the solution here
        fixed, _, taken = metaoptnet.solve(k32, y32, cfg.c, cfg.dual_ridge, 300, 0.0)
        assert int(taken) == 300 and rel(fixed) > 2e-3


def test_a_vmapped_solve_stops_each_problem_at_its_own_step():
    """Problems of very different conditioning in one vmap (the while loop runs until the last
    one stops): each gets exactly what it gets alone, steps taken included (a Python loop)."""
    cfg = metaoptnet.default_config()
    kernels, ys = zip(*(_gram_20_way_5_shot(s) for s in (0.1, 0.3, 1.0)), strict=True)
    kernels, ys = jnp.asarray(np.stack(kernels), jnp.float32), jnp.asarray(np.stack(ys))
    solve = lambda k, y: metaoptnet.solve(k, y, cfg.c, cfg.dual_ridge, cfg.solver_steps, 1e-5)
    a, free, taken = jax.jit(jax.vmap(solve))(kernels, ys)
    alone = [jax.jit(solve)(k, y) for k, y in zip(kernels, ys, strict=True)]
    assert len(set(np.asarray(taken).tolist())) == 3  # each stopped at another step
    for i, (a_i, free_i, taken_i) in enumerate(alone):
        assert int(taken[i]) == int(taken_i)
        np.testing.assert_allclose(a[i], a_i, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(free[i], free_i)


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
