"""The vmapped test-time logistic regression agrees with scikit-learn's LogisticRegression."""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from mtl_gbml.algorithms.base import l2_normalize
from mtl_gbml.linear_heads import logistic_regression, prototypes


def _episodes(n_episodes, ways, shots, queries, dim, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_episodes, ways, dim))
    s = means[:, :, None] + 1.2 * rng.normal(size=(n_episodes, ways, shots, dim))
    q = means[:, :, None] + 1.2 * rng.normal(size=(n_episodes, ways, queries, dim))
    sy = np.repeat(np.arange(ways), shots)
    qy = np.repeat(np.arange(ways), queries)
    norm = lambda a: np.asarray(l2_normalize(jnp.asarray(a, jnp.float32)))
    return norm(s.reshape(n_episodes, -1, dim)), sy, norm(q.reshape(n_episodes, -1, dim)), qy


def test_matches_sklearn_on_100_episodes():
    ways, shots, queries, dim = 5, 5, 15, 32
    sf, sy, qf, qy = _episodes(100, ways, shots, queries, dim)

    @jax.jit
    @jax.vmap
    def fit_predict(s, q):
        w, b = logistic_regression(s, jnp.asarray(sy), ways, c=3.0, steps=300)
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


def test_prototypes_are_class_means():
    f = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    y = np.array([0, 1, 2] * 4)
    p = np.asarray(prototypes(jnp.asarray(f), jnp.asarray(y), 3))
    for c in range(3):
        np.testing.assert_allclose(p[c], f[y == c].mean(0), rtol=1e-5)
