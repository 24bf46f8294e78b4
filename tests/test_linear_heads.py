"""The vmapped test-time logistic regression agrees with scikit-learn's LogisticRegression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from mtl_gbml.algorithms.base import l2_normalize
from mtl_gbml.linear_heads import (
    _spd_inverse,
    logistic_regression,
    logistic_regression_dual,
    prototypes,
)


def _episodes(n_episodes, ways, shots, queries, dim, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_episodes, ways, dim))
    s = means[:, :, None] + 1.2 * rng.normal(size=(n_episodes, ways, shots, dim))
    q = means[:, :, None] + 1.2 * rng.normal(size=(n_episodes, ways, queries, dim))
    sy = np.repeat(np.arange(ways), shots)
    qy = np.repeat(np.arange(ways), queries)
    norm = lambda a: np.asarray(l2_normalize(jnp.asarray(a, jnp.float32)))
    return norm(s.reshape(n_episodes, -1, dim)), sy, norm(q.reshape(n_episodes, -1, dim)), qy


@pytest.mark.parametrize("dim", [32, 8])  # 25 support points: the dual path (32), the primal (8)
def test_matches_sklearn_on_100_episodes(dim):
    ways, shots, queries = 5, 5, 15
    sf, sy, qf, qy = _episodes(100, ways, shots, queries, dim)

    @jax.jit
    @jax.vmap
    def fit_predict(s, q):
        w, b = logistic_regression(s, jnp.asarray(sy), ways, c=3.0)  # default tolerance
        return q @ w.T + b, w, b

    logits, w, b = fit_predict(jnp.asarray(sf), jnp.asarray(qf))
    ours = (np.asarray(logits).argmax(-1) == qy).mean(-1)
    ref, max_coef_err = [], 0.0
    for e in range(100):
        clf = LogisticRegression(C=3.0, solver="lbfgs", max_iter=1000, tol=1e-8).fit(sf[e], sy)
        ref.append((clf.predict(qf[e]) == qy).mean())
        max_coef_err = max(max_coef_err, np.abs(clf.coef_ - np.asarray(w[e])).max())
    assert abs(100 * ours.mean() - 100 * np.mean(ref)) <= 0.5
    # the same optimum, not only the same accuracy (sklearn's multinomial coefficients are
    # identified up to a shift shared by all classes, which the L2 penalty pins to zero)
    assert max_coef_err < 1e-2


def test_tolerance_stop_is_the_converged_fit_in_fewer_steps():
    """Stopping at the gradient tolerance gives the fit that a fixed 600 steps converge to, in
    fewer steps, and the cap binds: with 5 steps allowed it is the 5-step iterate."""
    ways, shots, dim = 5, 1, 64
    sf, sy, _, _ = _episodes(50, ways, shots, 15, dim, seed=1)
    y, sf = jnp.asarray(sy), jnp.asarray(sf)
    fit = lambda steps, tol: jax.jit(
        jax.vmap(lambda s: logistic_regression(s, y, ways, 3.0, steps, tol))
    )(sf)
    w_fixed, b_fixed = (np.asarray(x) for x in fit(600, 0.0))
    w_tol, b_tol = (np.asarray(x) for x in fit(600, 1e-5))
    np.testing.assert_allclose(w_tol, w_fixed, atol=2e-4)
    np.testing.assert_allclose(b_tol, b_fixed, atol=2e-4)
    dual = jax.vmap(lambda s: logistic_regression_dual(s @ s.T, y, ways, 3.0, 600, 1e-5, True))
    taken = np.asarray(dual(sf)[2])
    assert 5 < taken.min() and taken.max() < 200, taken
    w_short = np.asarray(fit(5, 0.0)[0])
    assert np.abs(w_short - w_fixed).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(fit(5, 1e-5)[0]), w_short)


@pytest.mark.parametrize("ways,shots,most", [(5, 1, 22), (5, 5, 45), (20, 1, 45)])
def test_the_preconditioned_accelerated_fit_stops_early(ways, shots, most):
    """Median steps to tol 1e-5 on 50 episodes: 16 / 30 / 29 with Nesterov's momentum from
    sqrt(L) (the rate the docstrings quote); 26 / 68 / 70 with the momentum from L instead, which
    still converges to the same fit, so only the step count shows it."""
    sf, sy, _, _ = _episodes(50, ways, shots, 15, 64, seed=1)
    y = jnp.asarray(sy)
    fit = lambda s: logistic_regression_dual(s @ s.T, y, ways, 3.0, 600, 1e-5, True)
    taken = np.asarray(jax.jit(jax.vmap(fit))(jnp.asarray(sf))[2])
    assert np.median(taken) <= most, taken


@pytest.mark.parametrize("ways,shots", [(5, 1), (4, 3), (3, 12)])  # n = 5, 12, 36 (> _SMALL)
def test_episodes_on_leading_axes_are_the_fits_one_at_a_time(ways, shots):
    """Leading axes of the Gram matrix are independent episodes, fitted together with the episode
    axis innermost: each is the fit of a Python loop over single episodes, with the same steps
    taken (its own tolerance stop, not the slowest episode's), and so are the fixed-step fits."""
    sf, sy, _, _ = _episodes(6, ways, shots, 1, 40, seed=3)
    # features scaled differently per episode, so that their fits need different numbers of steps
    scale = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], np.float32)[:, None, None]
    grams = jnp.asarray(scale * sf @ sf.transpose(0, 2, 1)).reshape(2, 3, ways * shots, -1)
    y = jnp.asarray(sy)
    for steps, tol in [(1000, 1e-5), (25, 0.0)]:
        a, b, taken = logistic_regression_dual(grams, y, ways, 3.0, steps, tol, True)
        assert a.shape == (2, 3, ways * shots, ways) and b.shape == (2, 3, ways)
        for i in range(2):
            for j in range(3):
                a1, b1, t1 = logistic_regression_dual(grams[i, j], y, ways, 3.0, steps, tol, True)
                np.testing.assert_allclose(np.asarray(a[i, j]), np.asarray(a1), atol=1e-5)
                np.testing.assert_allclose(np.asarray(b[i, j]), np.asarray(b1), atol=1e-5)
                # the same stop (a step apart at most: float32 rounding near the tolerance
                # may differ between the vectorised and the one-episode program on other CPUs)
                assert abs(int(taken[i, j]) - int(t1)) <= 1
        if tol:  # the stops differ by more than that: a batch run to its slowest would fail
            assert np.ptp(np.asarray(taken)) >= 3, taken
        else:
            assert np.all(np.asarray(taken) == steps)


def test_dual_fit_from_the_gram_matrix_is_the_primal_optimum():
    """``logistic_regression_dual`` sees only F F^T; W = A^T F is the primal optimum, found here
    independently by scipy's L-BFGS on the primal objective in float64."""
    ways, shots, dim = 4, 5, 16
    sf, sy, _, _ = _episodes(3, ways, shots, 3, dim, seed=2)
    for e in range(3):
        f = jnp.asarray(sf[e])
        a, b = logistic_regression_dual(f @ f.T, jnp.asarray(sy), ways, 3.0, 2000, 1e-7)
        w_ref, b_ref = _primal_reference(sf[e].astype(np.float64), sy, ways, 3.0)
        np.testing.assert_allclose(np.asarray(a.T @ f), w_ref, atol=1e-3)
        # the intercepts are identified up to a shift shared by all classes (unpenalised)
        b, b_ref = np.asarray(b), b_ref
        np.testing.assert_allclose(b - b.mean(), b_ref - b_ref.mean(), atol=1e-3)


def _primal_reference(f, y, ways, c):
    """Independent answer: scipy's L-BFGS on the primal objective, float64."""
    from scipy.optimize import minimize

    n, d = f.shape
    onehot = np.eye(ways)[y]

    def obj(theta):
        w, b = theta[: d * ways].reshape(ways, d), theta[d * ways :]
        z = f @ w.T + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        p = np.exp(logp)
        gw = c * (p - onehot).T @ f + w
        gb = c * (p - onehot).sum(0)
        return -c * (onehot * logp).sum() + 0.5 * (w * w).sum(), np.concatenate([gw.ravel(), gb])

    res = minimize(obj, np.zeros(d * ways + ways), jac=True, method="L-BFGS-B", tol=1e-12)
    return res.x[: d * ways].reshape(ways, d), res.x[d * ways :]


@pytest.mark.parametrize("n", [5, 20, 40])  # unrolled elimination (<= _SMALL), jnp.linalg.inv
def test_spd_inverse_is_numpys_inverse(n):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(3, n, 2 * n)).astype(np.float32)
    m = np.eye(n, dtype=np.float32) + 1.5 * f @ f.transpose(0, 2, 1) / (2 * n)  # I + 0.5 c K
    inv = np.asarray(_spd_inverse(jnp.asarray(np.moveaxis(m, 0, -1))))
    ref = np.linalg.inv(m.astype(np.float64))
    np.testing.assert_allclose(np.moveaxis(inv, -1, 0), ref, atol=1e-5)


@pytest.mark.parametrize("ways,shots", [(5, 1), (3, 12)])  # n = 5, 36: both layouts
def test_dual_step_minimises_boehnings_quadratic_bound(ways, shots):
    """The first step from zero (no momentum yet) is the minimiser of the quadratic that majorises
    the objective with Boehning's Hessian bound, ``0.5 c [F 1]^T [F 1]`` per class: found here
    independently in the primal (W, b) coordinates by numpy in float64, from the gradient at
    zero."""
    dim, c = 48, 3.0
    sf, sy, _, _ = _episodes(2, ways, shots, 1, dim, seed=4)
    n = ways * shots
    for e in range(2):
        f = sf[e].astype(np.float64)
        a, b = logistic_regression_dual(
            jnp.asarray(sf[e] @ sf[e].T), jnp.asarray(sy), ways, c, 1, 0
        )
        xa = np.concatenate([f, np.ones((n, 1))], axis=1)
        grad = c * xa.T @ (np.full((n, ways), 1.0 / ways) - np.eye(ways)[sy])  # at W = 0, b = 0
        bound = 0.5 * c * xa.T @ xa + np.diag(np.r_[np.ones(dim), 0.0])
        step = np.linalg.solve(bound, -grad)  # [D + 1, ways]
        np.testing.assert_allclose(np.asarray(a).T @ f, step[:dim].T, atol=1e-4)
        np.testing.assert_allclose(np.asarray(b), step[dim], atol=1e-4)


def test_prototypes_are_class_means():
    f = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    y = np.array([0, 1, 2] * 4)
    p = np.asarray(prototypes(jnp.asarray(f), jnp.asarray(y), 3))
    for c in range(3):
        np.testing.assert_allclose(p[c], f[y == c].mean(0), rtol=1e-5)
