"""Analytic infinite-width kernels (theory.kernels) against finite networks (theory.mlp).

Tolerances: a Monte-Carlo average over S networks of width n has relative error
~ c/sqrt(S n) + O(1/n) on these 6-point Gram matrices (c ≈ 1-3); with S = 16, n = 512 that is
≈ 3-5%, so we require a relative Frobenius error below 8%. A wrong layer scaling (e.g. a missing
factor W_std² = 2 or an off-by-one depth) changes the kernels by ≥ 25% and fails.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
X64 = True  # conftest keeps float64 on for this module's tests only

from theory.kernels import kernels  # noqa: E402
from theory.mlp import features, init_mlp, jacobians  # noqa: E402

WIDTH, SEEDS, TOL = 512, 16, 0.08


def _x(n: int = 6, d: int = 5, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(d)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _mc(depth: int):
    x = _x()
    th, kk, body_ntk = [], [], []
    for s in range(SEEDS):
        p = init_mlp(jax.random.PRNGKey(100 + s), x.shape[1], WIDTH, depth)
        jb, jw = jacobians(p["body"], p["head"], x)
        th.append(jb @ jb.T + jw @ jw.T)
        kk.append(jw @ jw.T)
        body_ntk.append(jb @ jb.T)
    return x, np.mean(th, 0), np.mean(kk, 0), np.mean(body_ntk, 0)


@pytest.mark.parametrize("depth", [1, 3])
def test_analytic_kernels_match_monte_carlo(depth: int) -> None:
    x, th, k, body = _mc(depth)
    an = kernels(x, None, depth)
    assert an.theta.dtype == np.float64
    assert _rel(th, an.theta) < TOL
    assert _rel(k, an.k) < TOL
    # Θ − K is the NTK of all but the last layer (body-only Jacobians).
    assert _rel(body, an.theta - an.k) < TOL
    # The deviation is not trivially small: K is a sizeable, distinct part of Θ.
    assert _rel(an.theta - an.k, an.theta) > 0.2


def test_last_layer_kernel_is_feature_gram_exactly() -> None:
    x = _x()
    p = init_mlp(jax.random.PRNGKey(0), x.shape[1], 64, 2)
    _, jw = jacobians(p["body"], p["head"], x)
    h = np.asarray(features(p["body"], x))
    np.testing.assert_allclose(jw @ jw.T, 2.0 * h @ h.T / h.shape[1], rtol=1e-10)


@pytest.mark.parametrize("depth", [1, 2, 4, 16, 64])
def test_trace_ratio_is_one_over_depth_plus_one(depth: int) -> None:
    an = kernels(_x(), None, depth)
    assert np.trace(an.k) / np.trace(an.theta) == pytest.approx(1.0 / (depth + 1), rel=1e-10)
    assert np.all(np.linalg.eigvalsh(an.theta - an.k) > -1e-10)  # body NTK is PSD


def test_cross_kernel_blocks_are_consistent() -> None:
    x = _x(8)
    full = kernels(x, None, 3)
    cross = kernels(x[:3], x[3:], 3)
    np.testing.assert_allclose(cross.theta, full.theta[:3, 3:], rtol=1e-12)
    np.testing.assert_allclose(cross.k, full.k[:3, 3:], rtol=1e-12)
