"""Compute ANIL and MTL predictions on unseen tasks over a (depth L) × (λτ) grid.

Separated from :mod:`theory.verify_gap` (CLI, checks, reporting) so it can be reused.
Variants of MTL (see :mod:`theory.predictors` for the derivation):

* ``shared_query``  -- heads share one initialisation (ρ = 1), MTL trained on the query sets,
  test head fitted with the same inner loop (λ, τ) as ANIL. The theorem's setting; checks use it.
* ``shared_merged`` -- ρ = 1, MTL trained on support ∪ query of every training task.
* ``indep_query``   -- independently initialised heads (ρ = 0), query sets.
* ``shared_query_fit`` -- ρ = 1, query sets, test head fitted to convergence (λτ_test = ∞).
"""

from __future__ import annotations

import numpy as np

from theory.kernels import kernels
from theory.layout import Layout, split_by_task
from theory.predictors import anil_predict, mtl_predict

VARIANTS: dict[str, dict] = {
    "shared_query": dict(rho=1.0, train_on="query", test_lam_tau=None),
    "shared_merged": dict(rho=1.0, train_on="merged", test_lam_tau=None),
    "indep_query": dict(rho=0.0, train_on="query", test_lam_tau=None),
    "shared_query_fit": dict(rho=1.0, train_on="query", test_lam_tau=np.inf),
}


def _per_task_rel(a: np.ndarray, b: np.ndarray, tasks: list) -> np.ndarray:
    """‖a_t − b_t‖ / ‖b_t‖ per task (inf where ‖b_t‖ = 0)."""
    out = []
    for at, bt in zip(split_by_task(a, tasks), split_by_task(b, tasks), strict=True):
        nb = np.linalg.norm(bt)
        out.append(np.linalg.norm(at - bt) / nb if nb > 0 else np.inf)
    return np.asarray(out)


def _summary(v: np.ndarray) -> dict:
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return dict(mean=None, std=None, median=None, q10=None, q90=None, n_inf=int(v.size))
    return dict(
        mean=float(finite.mean()),
        std=float(finite.std()),
        median=float(np.median(finite)),
        q10=float(np.quantile(finite, 0.1)),
        q90=float(np.quantile(finite, 0.9)),
        n_inf=int(v.size - finite.size),
    )


def sweep(layout: Layout, depths: list[int], lam_taus: list[float]) -> list[dict]:
    """Return one record per (L, λτ) with per-task gap statistics for every MTL variant.

    ``lam_taus`` must contain 0.0 (the reference for ANIL's drift).
    """
    if 0.0 not in lam_taus:
        raise ValueError("lam_taus must include 0.0")
    records = []
    for depth in depths:
        kk = kernels(layout.x, None, depth)
        th, k = kk.theta, kk.k
        f_anil0 = anil_predict(th, k, layout.y, layout.train, layout.test, 0.0)
        for lt in lam_taus:
            f_anil = anil_predict(th, k, layout.y, layout.train, layout.test, lt)
            rec: dict = dict(depth=depth, lam_tau=float(lt))
            drift = _per_task_rel(f_anil, f_anil0, layout.test)
            rec["anil_drift"] = _summary(drift)
            rec["anil_norm"] = float(np.linalg.norm(f_anil) / np.sqrt(f_anil.size))
            for name, kw in VARIANTS.items():
                f_mtl = mtl_predict(th, k, layout.y, layout.train, layout.test, lt, **kw)
                rec[name] = dict(
                    gap=_summary(_per_task_rel(f_anil, f_mtl, layout.test)),
                    gap_rel_anil=_summary(_per_task_rel(f_mtl, f_anil, layout.test)),
                )
            records.append(rec)
    return records
