"""Kernel predictors (theory.predictors) against explicitly trained linearised networks.

On tiny problems the ANIL and MTL kernel formulas, evaluated with the *empirical* kernels of one
finite network, must reproduce gradient-descent training of that network's linearisation
(theory.mlp.linear_model trained by theory.training) to round-off: both the finite-step filter
form (exact for any number of steps) and the converged form (after GD has converged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

jax.config.update("jax_enable_x64", True)
X64 = True  # conftest keeps float64 on for this module's tests only

from theory.kernels import kernels  # noqa: E402
from theory.layout import flatten  # noqa: E402
from theory.mlp import (  # noqa: E402
    apply,
    empirical_kernels,
    init_mlp,
    jacobians,
    linear_model,
)
from theory.predictors import (  # noqa: E402
    adapt_matrix,
    anil_meta_kernel,
    anil_predict,
    mtl_kernel,
    mtl_predict,
    mtl_train_sets,
)
from theory.tasks import make_problem  # noqa: E402
from theory.training import anil_test, mtl_test, train_anil, train_mtl  # noqa: E402

WIDTH, DEPTH, LAM, TAU = 32, 2, 0.05, 4


@pytest.fixture(scope="module")
def setup():
    prob = make_problem(n_train=3, n_test=2, n_support=3, n_query=3, dim=4, rep_dim=2, seed=1)
    lay = flatten(prob)
    p = init_mlp(jax.random.PRNGKey(7), 4, WIDTH, DEPTH)
    th, k = empirical_kernels(p["body"], p["head"], jnp.asarray(lay.x))
    return prob, lay, p, th, k


def _spd(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a @ a.T / n + 0.1 * np.eye(n)


# ---------------------------------------------------------------- inner-loop matrix T


def test_adapt_matrix_matches_expm_and_matrix_power() -> None:
    k = _spd(5)
    for lt in [1e-3, 0.3, 5.0]:
        ref = np.linalg.solve(k, np.eye(5) - scipy.linalg.expm(-lt * k))
        np.testing.assert_allclose(adapt_matrix(k, lt), ref, rtol=1e-9, atol=1e-12)
    lam, tau = 0.2, 7
    ref = np.linalg.solve(k, np.eye(5) - np.linalg.matrix_power(np.eye(5) - lam * k, tau))
    np.testing.assert_allclose(adapt_matrix(k, lam * tau, steps=tau), ref, rtol=1e-9)
    np.testing.assert_allclose(adapt_matrix(k, np.inf), np.linalg.inv(k), rtol=1e-8)


def test_adapt_matrix_small_lamtau_and_singular_kernel() -> None:
    v = np.random.default_rng(0).standard_normal((4, 2))
    k = v @ v.T  # rank 2: K^{-1} does not exist, T does
    for lt in [0.0, 1e-14, 1e-6]:
        t = adapt_matrix(k, lt)
        assert np.all(np.isfinite(t))
        np.testing.assert_allclose(t, lt * np.eye(4) - lt**2 * k / 2, atol=1e-12 + 1e-3 * lt)
    assert np.all(adapt_matrix(k, 0.0) == 0.0)


# ---------------------------------------------------------------- meta-kernels


def test_phi_equals_theta_at_zero_lamtau() -> None:
    prob = make_problem(n_train=4, n_test=1, n_support=3, n_query=4, seed=2)
    lay = flatten(prob)
    kk = kernels(lay.x, None, 3)
    phi = anil_meta_kernel(kk.theta, kk.k, lay.train, lam_tau=0.0)
    q = np.concatenate([q for _, q in lay.train])
    np.testing.assert_array_equal(phi, kk.theta[np.ix_(q, q)])
    assert np.abs(anil_meta_kernel(kk.theta, kk.k, lay.train, lam_tau=0.5) - phi).max() > 1e-2


def test_mtl_predict_in_closed_form_for_independent_and_half_shared_heads() -> None:
    """rho = 0: the new head's model is 0 before adaptation, so MTL predicts K(Q,S) T y_S on each
    test task, with T = K^-1 (I - e^{-lam tau K}) (scipy's expm). rho = 1/2: the new head starts
    from g = 1/2 (Theta - K)(., I) a, with a the solution of the training system whose cross-task
    blocks of Theta - K are halved; both written out here."""
    lay = flatten(make_problem(n_train=3, n_test=3, n_support=3, n_query=4, dim=4, seed=4))
    kk = kernels(lay.x, None, 2)
    th, k, y, lt = kk.theta, kk.k, lay.y, 0.4

    def after_adapting(g):
        out = []
        for s, q in lay.test:
            t = np.linalg.solve(
                k[np.ix_(s, s)], np.eye(len(s)) - scipy.linalg.expm(-lt * k[np.ix_(s, s)])
            )
            out.append(g[q] + k[np.ix_(q, s)] @ t @ (y[s] - g[s]))
        return np.concatenate(out)

    got0 = mtl_predict(th, k, y, lay.train, lay.test, lt, rho=0.0)
    np.testing.assert_allclose(got0, after_adapting(np.zeros_like(y)), rtol=1e-8, atol=1e-10)
    idx = np.concatenate([q for _, q in lay.train])
    task = np.concatenate([np.full(len(q), i) for i, (_, q) in enumerate(lay.train)])
    same = task[:, None] == task[None, :]
    body = (th - k)[np.ix_(idx, idx)]
    system = np.where(same, body + k[np.ix_(idx, idx)], 0.5 * body)
    g = 0.5 * (th - k)[:, idx] @ np.linalg.solve(system, y[idx])
    got_half = mtl_predict(th, k, y, lay.train, lay.test, lt, rho=0.5)
    np.testing.assert_allclose(got_half, after_adapting(g), rtol=1e-6, atol=1e-9)
    assert np.abs(got_half - got0).max() > 1e-3


def test_k_equal_theta_reproduces_maml_kernel_blockwise() -> None:
    """Φ with K = Θ against a direct block formula of the MAML meta-kernel (expm path)."""
    prob = make_problem(n_train=3, n_test=1, n_support=3, n_query=2, seed=3)
    lay = flatten(prob)
    th = kernels(lay.x, None, 2).theta
    lt = 0.2
    phi = anil_meta_kernel(th, th, lay.train, lam_tau=lt)
    ts = [
        np.linalg.solve(
            th[np.ix_(s, s)], np.eye(len(s)) - scipy.linalg.expm(-lt * th[np.ix_(s, s)])
        )
        for s, _ in lay.train
    ]
    blocks = []
    for (si, qi), ti in zip(lay.train, ts, strict=True):
        row = []
        for (sj, qj), tj in zip(lay.train, ts, strict=True):
            b = th[np.ix_(qi, qj)]
            b -= th[np.ix_(qi, si)] @ ti @ th[np.ix_(si, qj)]
            b -= th[np.ix_(qi, sj)] @ tj.T @ th[np.ix_(sj, qj)]
            b += th[np.ix_(qi, si)] @ ti @ th[np.ix_(si, sj)] @ tj.T @ th[np.ix_(sj, qj)]
            row.append(b)
        blocks.append(row)
    np.testing.assert_allclose(phi, np.block(blocks), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("maml", [False, True])
def test_meta_kernel_is_gram_of_adapted_prediction_jacobian(setup, maml: bool) -> None:
    """Φ = G Gᵀ with G the Jacobian of the inner-loop-adapted query predictions (explicit)."""
    _, lay, p, th, k = setup
    body0, head0 = p["body"], p["head"]
    x = jnp.asarray(lay.x)
    y = jnp.asarray(lay.y)

    def adapted(params, s, q):
        def loss(pp, xs, ys):
            return 0.5 * jnp.sum((linear_model(pp[0], pp[1], body0, head0, xs) - ys) ** 2)

        pp = params
        for _ in range(TAU):
            g = jax.grad(loss)(pp, x[s], y[s])
            if maml:
                pp = jax.tree_util.tree_map(lambda a, b: a - LAM * b, pp, g)
            else:
                pp = (pp[0], pp[1] - LAM * g[1])
        return linear_model(pp[0], pp[1], body0, head0, x[q])

    rows = []
    for s, q in lay.train:
        jac = jax.jacobian(adapted)((body0, head0), s, q)
        flat = [jnp.reshape(a, (len(q), -1)) for a in jax.tree_util.tree_leaves(jac)]
        rows.append(np.asarray(jnp.concatenate(flat, axis=1)))
    g = np.concatenate(rows)
    phi = anil_meta_kernel(th, th if maml else k, lay.train, lam_tau=LAM * TAU, steps=TAU)
    np.testing.assert_allclose(phi, g @ g.T, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- trained linearised networks


def _arrays(ts):
    return [jnp.asarray(a) for a in (ts.xs, ts.ys, ts.xq, ts.yq)]


def test_anil_predictor_matches_trained_linearised_network(setup) -> None:
    prob, lay, p, th, k = setup
    params0 = (p["body"], p["head"])
    xs, ys, xq, yq = _arrays(prob.train)
    phi = anil_meta_kernel(th, k, lay.train, lam_tau=LAM * TAU, steps=TAU)
    lr = 1.0 / np.linalg.eigvalsh(phi).max()
    txs, tys, txq, _ = _arrays(prob.test)
    for steps in [50, 4000]:
        params, loss, _ = train_anil(linear_model, params0, xs, ys, xq, yq, LAM, TAU, lr, steps)
        net = np.asarray(anil_test(linear_model, params, params0, txs, tys, txq, LAM, TAU))
        ker = anil_predict(
            th, k, lay.y, lay.train, lay.test, LAM * TAU, steps=TAU, outer_lr=lr, outer_steps=steps
        )
        np.testing.assert_allclose(net.ravel(), ker, rtol=1e-7, atol=1e-8)
    assert float(loss) < 1e-12  # converged: compare with the converged closed form too
    ker_inf = anil_predict(th, k, lay.y, lay.train, lay.test, LAM * TAU, steps=TAU)
    np.testing.assert_allclose(net.ravel(), ker_inf, rtol=1e-4, atol=1e-5)


def _empirical_mtl(lay, body0, heads0, head_new0, sets):
    """Empirical MTL kernel and new-head body cross-kernel for arbitrary head inits."""
    x = jnp.asarray(lay.x)
    jw = jacobians(body0, heads0[0], x)[1]
    jb = [jacobians(body0, h, x)[0] for h in heads0]
    jb_new = jacobians(body0, head_new0, x)[0]
    idx = np.concatenate(sets)
    task = np.concatenate([np.full(len(s), i) for i, s in enumerate(sets)])
    a = np.zeros((len(idx), len(idx)))
    cross = np.zeros((len(lay.x), len(idx)))
    for m, (im, tm) in enumerate(zip(idx, task, strict=True)):
        cross[:, m] = jb_new @ jb[tm][im]
        for n_, (in_, tn) in enumerate(zip(idx, task, strict=True)):
            a[m, n_] = jb[tm][im] @ jb[tn][in_] + (tm == tn) * (jw[im] @ jw[in_])
    return a, cross


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("train_on", ["query", "merged"])
def test_mtl_predictor_matches_trained_linearised_network(setup, shared, train_on) -> None:
    prob, lay, p, th, k = setup
    body0, head0 = p["body"], p["head"]
    n = prob.train.n_tasks
    if shared:
        heads0, head_new0 = jnp.tile(head0, (n, 1)), head0
    else:
        hk = jax.random.normal(jax.random.PRNGKey(99), (n + 1, WIDTH))
        heads0, head_new0 = hk[:n], hk[n]
    xs, ys, xq, yq = _arrays(prob.train)
    x_tr = xq if train_on == "query" else jnp.concatenate([xs, xq], axis=1)
    y_tr = yq if train_on == "query" else jnp.concatenate([ys, yq], axis=1)
    sets = mtl_train_sets(lay.train, train_on)
    a, cross = _empirical_mtl(lay, body0, heads0, head_new0, sets)
    if shared:  # at finite width the shared-init MTL kernel is exactly Θ − (1 − δ) K
        np.testing.assert_allclose(a, mtl_kernel(th, k, sets, 1.0), rtol=1e-9, atol=1e-9)
        over = {}
    else:
        over = dict(theta_mtl=a, body_cross=cross)
    lr = 1.0 / np.linalg.eigvalsh(a).max()
    txs, tys, txq, _ = _arrays(prob.test)
    for steps in [30, 3000]:
        (body, _), loss, _ = train_mtl(linear_model, body0, heads0, x_tr, y_tr, lr, steps)
        net = np.asarray(mtl_test(linear_model, body, body0, head_new0, txs, tys, txq, LAM, TAU))
        ker = mtl_predict(
            th,
            k,
            lay.y,
            lay.train,
            lay.test,
            LAM * TAU,
            steps=TAU,
            rho=1.0 if shared else 0.0,
            train_on=train_on,
            outer_lr=lr,
            outer_steps=steps,
            **over,
        )
        np.testing.assert_allclose(net.ravel(), ker, rtol=1e-7, atol=1e-8)
    assert float(loss) < 1e-12
    ker_inf = mtl_predict(
        th,
        k,
        lay.y,
        lay.train,
        lay.test,
        LAM * TAU,
        steps=TAU,
        rho=1.0 if shared else 0.0,
        train_on=train_on,
        **over,
    )
    np.testing.assert_allclose(net.ravel(), ker_inf, rtol=1e-4, atol=1e-5)


def test_independent_heads_decouple_at_large_width() -> None:
    """J_b(x; w_i)·J_b(x'; w_j) / (Θ − K) → 0 for independent heads, = 1 for shared ones."""
    x = jnp.asarray(make_problem(n_train=1, n_support=2, n_query=2, seed=4).train.xq[0])
    ratios = []
    for width in [64, 4096]:
        p = init_mlp(jax.random.PRNGKey(0), x.shape[1], width, 1)
        w2 = jax.random.normal(jax.random.PRNGKey(1), (width,))
        j1 = jacobians(p["body"], p["head"], x)[0]
        j2 = jacobians(p["body"], w2, x)[0]
        ratios.append(np.linalg.norm(j1 @ j2.T) / np.linalg.norm(j1 @ j1.T))
    assert ratios[1] < 0.05 and ratios[1] < ratios[0] / 3


def test_mtl_kernel_conventions() -> None:
    th, k = _spd(6, 1), _spd(6, 2) * 0.3
    sets = [np.arange(0, 3), np.arange(3, 6)]
    same = np.kron(np.eye(2), np.ones((3, 3)))
    np.testing.assert_allclose(mtl_kernel(th, k, sets, 1.0), th - (1 - same) * k)
    np.testing.assert_allclose(mtl_kernel(th, k, sets, 0.0), same * th)


def test_centred_network_has_zero_initial_output() -> None:
    p = init_mlp(jax.random.PRNGKey(0), 3, 16, 2)
    x = jnp.ones((2, 3))
    assert float(jnp.abs(apply(p["body"], p["head"], x)).max()) > 0
    assert float(jnp.abs(linear_model(p["body"], p["head"], p["body"], p["head"], x)).max()) == 0
