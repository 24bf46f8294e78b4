"""The three checks of theory.verify_gap pass on bound-respecting data and fail otherwise, each of
their conditions on its own."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_check1_needs_both_slopes_the_last_local_one_too() -> None:
    """1/L up to L=32, then flat: the least-squares slope still passes, the last local one
    (0) does not, so check 1 fails."""
    recs = _records(lambda d, lt: 1.0 / min(d, 32) + lt, lambda lt: lt)
    res = analyse(recs, DEPTHS, LTS, 4)["checks"]["1_gap_shrinks_like_1_over_L_at_lamtau0"]
    assert res["least_squares_slope"] <= -0.8 and res["last_local_slope"] == pytest.approx(0.0)
    assert not res["passed"]


def test_check3_fails_on_a_blow_up_at_the_smallest_envelope_alone() -> None:
    """gap = envelope everywhere (ratio 1) except at L=64, lam tau=0, where the ratio is 9.6:
    under the bound of 10 but more than 3x the median, so check 3 fails."""
    recs = _records(lambda d, lt: 0.15 if (d, lt) == (64, 0.0) else 1.0 / d + lt, lambda lt: lt)
    res = analyse(recs, DEPTHS, LTS, 4)["checks"]["3_gap_over_envelope_bounded"]
    assert res["max_ratio"] == pytest.approx(9.6) and not res["passed"]
