"""theory.gap_sweep: each record's statistics against the predictors called directly, per task."""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
X64 = True  # conftest keeps float64 on for this module's tests only

from theory.gap_sweep import VARIANTS, sweep  # noqa: E402
from theory.kernels import kernels  # noqa: E402
from theory.layout import flatten  # noqa: E402
from theory.predictors import anil_predict, mtl_predict  # noqa: E402
from theory.tasks import make_problem  # noqa: E402


def _per_task(values: np.ndarray, layout) -> list[np.ndarray]:
    """The concatenated query predictions cut into the test tasks' query sets."""
    ends = np.cumsum([len(q) for _, q in layout.test])
    return np.split(values, ends[:-1])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||, inf where b = 0 (MTL with independent heads predicts 0 at lam tau 0)."""
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else np.inf


def _check(stats: dict, values: list[float], where: str) -> None:
    v = np.asarray(values)
    finite = v[np.isfinite(v)]
    assert stats["n_inf"] == v.size - finite.size, where
    if finite.size == 0:
        assert stats["mean"] is None, where
        return
    for key, want in (
        ("mean", finite.mean()),
        ("median", np.median(finite)),
        ("q90", np.quantile(finite, 0.9)),
    ):
        assert stats[key] == pytest.approx(want, rel=1e-9, abs=1e-15), (where, key)


def test_sweep_records_are_the_per_task_relative_gaps():
    layout = flatten(
        make_problem(n_train=3, n_test=4, n_support=3, n_query=4, dim=4, rep_dim=2, seed=2)
    )
    depths, lam_taus = [1, 3], [0.0, 0.1, 1.0]
    records = sweep(layout, depths, lam_taus)
    assert [(r["depth"], r["lam_tau"]) for r in records] == [
        (d, lt) for d in depths for lt in lam_taus
    ]
    for r in records:
        kk = kernels(layout.x, None, r["depth"])
        args = (kk.theta, kk.k, layout.y, layout.train, layout.test, r["lam_tau"])
        anil = _per_task(anil_predict(*args), layout)
        anil0 = _per_task(anil_predict(*args[:-1], 0.0), layout)
        at = f"L={r['depth']} lam_tau={r['lam_tau']}"
        _check(r["anil_drift"], [_rel(a, a0) for a, a0 in zip(anil, anil0, strict=True)], at)
        if r["lam_tau"] == 0.0:
            assert r["anil_drift"]["mean"] == 0.0
        for name, kw in VARIANTS.items():
            mtl = _per_task(mtl_predict(*args, **kw), layout)
            pairs = list(zip(anil, mtl, strict=True))
            _check(r[name]["gap"], [_rel(a, m) for a, m in pairs], f"{name} {at}")
            _check(r[name]["gap_rel_anil"], [_rel(m, a) for a, m in pairs], f"{name} {at}")
    # the gap is not trivially zero, and MTL's variants differ
    assert min(r["shared_query"]["gap"]["mean"] for r in records) > 0
    assert records[1]["indep_query"]["gap"]["mean"] != records[1]["shared_query"]["gap"]["mean"]


def test_sweep_needs_the_lamtau_zero_reference():
    layout = flatten(make_problem(n_train=2, n_test=2, n_support=2, n_query=2, dim=3, seed=0))
    with pytest.raises(ValueError, match="0.0"):
        sweep(layout, [1], [0.1])
