r"""Infinite-width (kernel-regime) predictors of ANIL and multi-task learning (MTL).

All functions are plain numpy on precomputed Gram matrices ``theta`` (NTK Θ) and ``k``
(last-layer kernel K) over one array of *all* points; tasks are given by integer index arrays
into that array (see :mod:`theory.layout`). This lets the same code run on analytic
infinite-width kernels and on empirical kernels of one finite network (used by the tests).

Setting and conventions
-----------------------
Scalar-output network f(x; θ) with parameters θ = (b, w): body b, output layer (head) w.
Squared loss ½‖f(X) − Y‖² (summed). In the NTK regime the trained network is its linearisation
around the initialisation θ₀ and we take the initial output to be zero (f(·; θ₀) = 0, i.e. the
centred/linearised model f(x; θ) = J(x)(θ − θ₀)); Θ = J Jᵀ, K = J_w J_wᵀ, Θ − K = J_b J_bᵀ.

Inner loop (ANIL's adaptation, and MTL's test-time head fit): the head alone is trained on a
support set (X', Y') with learning rate λ. J_w does not change in the linear model, so
f(X') − Y' evolves as exp(−λtK') (gradient flow) or (I − λK')^τ (τ steps of GD), K' = K(X',X'),
and any point x moves by −K(x, X') T (f(X') − Y') with

    T = K'^{-1} (I − exp(−λτ K'))      (flow)       T = K'^{-1} (I − (I − λK')^τ)   (GD).

``adapt_matrix`` evaluates T on the eigenvalues of K' (1 − e^{−λτμ})/μ with a series at μ → 0,
so λτ → 0 (T → λτ I) and a singular K' are both fine; λτ = ∞ gives the pseudo-inverse.

ANIL (meta-training to convergence). The adapted query prediction of task i is
F_i(θ) = f(X_i) + K_i T_i (Y'_i − f(X'_i)), K_i = K(X_i, X'_i); it is linear in θ with Jacobian
G_i = J(X_i) − K_i T_i J(X'_i), so gradient flow on Σ_i ½‖F_i − Y_i‖² is kernel regression with
the meta-kernel Φ_ij = G_i G_jᵀ = Θ_ij − K_i T_i Θ(X'_i,X_j) − Θ(X_i,X'_j) T_jᵀ K_jᵀ
+ K_i T_i Θ(X'_i,X'_j) T_jᵀ K_jᵀ, and on a test task

    F_ANIL = K(X,X') T Y' + Φ(test, train) Φ(train, train)^{-1} (𝒴 − [K_i T_i Y'_i]_i).

At λτ = 0, T = 0 and Φ = Θ; with K = Θ this is the MAML meta-kernel. ANIL trains only on the
query sets (X_i, Y_i); support sets enter through the inner loop only.

MTL (derived here). Shared body b, one head w_i per training task i, model f_i(x) = f(x; b, w_i),
loss Σ_i ½‖f_i(D_i) − 𝒴_i‖² over a training set D_i per task -- either the query set only
(``train_on="query"``, the like-for-like comparison with ANIL) or support ∪ query
(``train_on="merged"``, as done in practice). All parameters (b, w_1..w_N) are trained jointly by
gradient flow to convergence. Head initialisation: heads w_i⁰ = √ρ w̄ + √(1−ρ) ε_i with a common
draw w̄ and independent ε_i. The body gradient of f_i is linear in w_i⁰, so at infinite width
J_b(x; w_i⁰)·J_b(x'; w_j⁰) → (ρ + (1−ρ)δ_ij)(Θ − K)(x, x') and the MTL NTK is

    Θ_MTL((x,i),(x',j)) = (ρ + (1 − ρ) δ_ij) (Θ − K)(x,x') + δ_ij K(x,x').

ρ = 1 (all heads start from ONE shared initialisation) gives Θ − (1 − δ_ij) K; ρ = 0
(independent heads) gives δ_ij Θ: tasks decouple. Training converges to α = Θ_MTL^{-1} 𝒴 (all
parameters move by J_MTLᵀ α). At test a NEW head for the unseen task is initialised with the same
rule (correlation ρ with every training head, e.g. the shared w̄ when ρ = 1), so before adaptation

    g(x) = Σ_j ρ (Θ − K)(x, D_j) α_j,

and the head is then fitted on the support set by the same inner loop (λ, τ) as ANIL
(``test_lam_tau=None``; this matched adaptation is what Theorem 1 compares) or to convergence
(``test_lam_tau=inf``):  F_MTL = g(X) + K(X, X') T (Y' − g(X')).

Which convention the O(λτ + 1/L) bound needs: ρ = 1. Then at λτ = 0, F_ANIL = Θ(X,𝒳)Θ^{-1}𝒴 and
F_MTL = (Θ−K)(X,𝒳)(Θ − K∘(1−δ))^{-1}𝒴 differ only through K, whose share of Θ is 1/(L + 1).
With ρ = 0, g ≡ 0: the new head sees none of what the body learnt (at infinite width), F_MTL is
K(X,X')TY' and the gap to ANIL is O(1) for every L.

Finite training time (for comparing with finite-step networks): ``outer_lr``/``outer_steps``
replace the converged inverse by the GD filter (I − (I − ηA)^s) A^{-1} of the training kernel A.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IndexTasks = Sequence[tuple[np.ndarray, np.ndarray]]  # (support_idx, query_idx) per task


def _spectral_filter(mu: np.ndarray, lam: float, tau: float, discrete: bool) -> np.ndarray:
    """Return h(μ) = (1 − e^{−λτμ})/μ (flow) or (1 − (1 − λμ)^τ)/μ (GD), stable at μ → 0."""
    mu = np.maximum(mu, 0.0)
    if np.isinf(lam * tau):
        scale = mu.max() if mu.size else 1.0
        keep = mu > 1e-13 * scale
        return np.where(keep, 1.0 / np.where(keep, mu, 1.0), 0.0)
    if not discrete:
        x = lam * tau * mu
        small = x < 1e-8
        ratio = np.where(small, 1.0 - x / 2.0, -np.expm1(-x) / np.where(small, 1.0, x))
        return lam * tau * ratio
    y = lam * mu
    small = y < 1e-10
    ys = np.where(small, 0.5, y)
    ratio = np.where(
        ys < 1.0,
        -np.expm1(tau * np.log1p(-np.minimum(ys, 0.999999999))) / ys,
        (1.0 - (1.0 - ys) ** tau) / ys,
    )
    return lam * np.where(small, tau - tau * (tau - 1) * y / 2.0, ratio)


def filter_matrix(
    a: np.ndarray, lam: float, tau: float = 1.0, discrete: bool = False
) -> np.ndarray:
    """Apply the GD/flow filter h(A) to a symmetric PSD matrix via its eigendecomposition."""
    a = 0.5 * (a + a.T)
    mu, v = np.linalg.eigh(a)
    return (v * _spectral_filter(mu, lam, tau, discrete)) @ v.T


def adapt_matrix(k_ss: np.ndarray, lam_tau: float, steps: int | None = None) -> np.ndarray:
    """Inner-loop matrix T = K^{-1}(I − e^{−λτK}); with ``steps`` = τ (GD), λ = lam_tau / τ."""
    if steps is None:
        return filter_matrix(k_ss, lam_tau, 1.0, discrete=False)
    return filter_matrix(k_ss, lam_tau / steps, float(steps), discrete=True)


def _solve(a: np.ndarray, rhs: np.ndarray, outer_lr: float | None, outer_steps: int | None):
    if outer_steps is None:
        return np.linalg.solve(0.5 * (a + a.T), rhs)
    return filter_matrix(a, outer_lr, float(outer_steps), discrete=True) @ rhs


def anil_jacobian_map(
    k: np.ndarray, tasks: IndexTasks, lam_tau: float, steps: int | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return G (Σ n_q × n_all) with G_i = E_{Q_i} − K(Q_i,S_i) T_i E_{S_i}, and the T_i."""
    n_all = k.shape[0]
    rows, ts = [], []
    for s, q in tasks:
        t = adapt_matrix(k[np.ix_(s, s)], lam_tau, steps)
        g = np.zeros((len(q), n_all))
        g[np.arange(len(q)), q] = 1.0
        g[:, s] -= k[np.ix_(q, s)] @ t
        rows.append(g)
        ts.append(t)
    return np.concatenate(rows, axis=0), ts


def anil_meta_kernel(
    theta: np.ndarray,
    k: np.ndarray,
    tasks_a: IndexTasks,
    tasks_b: IndexTasks | None = None,
    lam_tau: float = 0.0,
    steps: int | None = None,
) -> np.ndarray:
    """ANIL meta-kernel Φ(tasks_a, tasks_b) (MAML's when ``k`` is ``theta``)."""
    ga, _ = anil_jacobian_map(k, tasks_a, lam_tau, steps)
    gb = ga if tasks_b is None else anil_jacobian_map(k, tasks_b, lam_tau, steps)[0]
    return ga @ theta @ gb.T


def _adapt_offset(k: np.ndarray, tasks: IndexTasks, ts: list[np.ndarray], y: np.ndarray):
    """[K(Q_i,S_i) T_i r_i]_i for residual vector ``y`` over all points."""
    return np.concatenate([k[np.ix_(q, s)] @ t @ y[s] for (s, q), t in zip(tasks, ts, strict=True)])


def anil_predict(
    theta: np.ndarray,
    k: np.ndarray,
    y_all: np.ndarray,
    train: IndexTasks,
    test: IndexTasks,
    lam_tau: float,
    steps: int | None = None,
    outer_lr: float | None = None,
    outer_steps: int | None = None,
) -> np.ndarray:
    """Predictions on the test tasks' query sets (concatenated) after adapting to support."""
    g_tr, t_tr = anil_jacobian_map(k, train, lam_tau, steps)
    g_te, t_te = anil_jacobian_map(k, test, lam_tau, steps)
    phi = g_tr @ theta @ g_tr.T
    phi_te = g_te @ theta @ g_tr.T
    yq = np.concatenate([y_all[q] for _, q in train])
    resid = yq - _adapt_offset(k, train, t_tr, y_all)
    alpha = _solve(phi, resid, outer_lr, outer_steps)
    return _adapt_offset(k, test, t_te, y_all) + phi_te @ alpha


def mtl_train_sets(train: IndexTasks, train_on: str) -> list[np.ndarray]:
    """Per-task MTL training index sets: ``"query"`` or ``"merged"`` (support ∪ query)."""
    if train_on == "query":
        return [np.asarray(q) for _, q in train]
    if train_on == "merged":
        return [np.concatenate([s, q]) for s, q in train]
    raise ValueError(f"train_on must be 'query' or 'merged', got {train_on!r}")


def mtl_kernel(theta: np.ndarray, k: np.ndarray, sets: Sequence[np.ndarray], rho: float):
    """Θ_MTL over the concatenated training sets for head-init correlation ρ."""
    idx = np.concatenate(sets)
    task = np.concatenate([np.full(len(s), i) for i, s in enumerate(sets)])
    same = (task[:, None] == task[None, :]).astype(float)
    body = (theta - k)[np.ix_(idx, idx)]
    return (rho + (1.0 - rho) * same) * body + same * k[np.ix_(idx, idx)]


def mtl_predict(
    theta: np.ndarray,
    k: np.ndarray,
    y_all: np.ndarray,
    train: IndexTasks,
    test: IndexTasks,
    lam_tau: float,
    steps: int | None = None,
    rho: float = 1.0,
    train_on: str = "query",
    test_lam_tau: float | None = None,
    outer_lr: float | None = None,
    outer_steps: int | None = None,
    theta_mtl: np.ndarray | None = None,
    body_cross: np.ndarray | None = None,
) -> np.ndarray:
    """MTL predictions on the test query sets after a new head is fitted on each support set.

    ``theta_mtl`` (training MTL kernel) and ``body_cross`` (body kernel between the new head's
    model at every point and the training points, shape (n_all, n_train)) override the
    infinite-width forms; the tests pass empirical ones of a finite network.
    """
    sets = mtl_train_sets(train, train_on)
    idx = np.concatenate(sets)
    a = mtl_kernel(theta, k, sets, rho) if theta_mtl is None else theta_mtl
    alpha = _solve(a, y_all[idx], outer_lr, outer_steps)
    cross = rho * (theta - k)[:, idx] if body_cross is None else body_cross
    g = cross @ alpha  # new-head model on every point before adaptation
    lt = lam_tau if test_lam_tau is None else test_lam_tau
    st = steps if test_lam_tau is None else None
    out = []
    for s, q in test:
        t = adapt_matrix(k[np.ix_(s, s)], lt, st)
        out.append(g[q] + k[np.ix_(q, s)] @ t @ (y_all[s] - g[s]))
    return np.concatenate(out)
