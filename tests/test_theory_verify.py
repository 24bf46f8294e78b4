"""The three checks of theory.verify_gap pass on bound-respecting data and fail otherwise."""

from __future__ import annotations

import numpy as np

from theory.verify_gap import DEPTHS, analyse

LTS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def _records(gap_fn, drift_fn) -> list[dict]:
    recs = []
    for d in DEPTHS:
        for lt in LTS:
            g = gap_fn(d, lt)
            recs.append(
                dict(
                    depth=d,
                    lam_tau=lt,
                    anil_drift=dict(mean=drift_fn(lt)),
                    shared_query=dict(gap=dict(mean=g, q90=1.2 * g)),
                )
            )
    return recs


def _passed(recs) -> dict:
    res = analyse(recs, DEPTHS, LTS, 4)
    return {k[0]: v["passed"] for k, v in res["checks"].items()}


def test_checks_pass_on_bound_respecting_data() -> None:
    recs = _records(lambda d, lt: 1.5 / d + 0.8 * min(lt, 0.5), lambda lt: 2 * lt / (1 + lt))
    assert _passed(recs) == {"1": True, "2": True, "3": True}


def test_check1_fails_when_gap_does_not_shrink_like_one_over_depth() -> None:
    recs = _records(lambda d, lt: 1.0 / np.sqrt(d) + lt, lambda lt: lt)
    assert not _passed(recs)["1"]


def test_check2_fails_when_anil_drift_is_quadratic() -> None:
    recs = _records(lambda d, lt: 1.0 / d + lt, lambda lt: lt**2)
    assert not _passed(recs)["2"]


def test_check3_fails_when_gap_outgrows_envelope() -> None:
    recs = _records(lambda d, lt: 1.0 / d + 30 * lt, lambda lt: lt)
    assert not _passed(recs)["3"]
