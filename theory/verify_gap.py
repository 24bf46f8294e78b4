"""Check numerically that ANIL and MTL predictions on unseen tasks differ by O(λτ + 1/L).

Usage::

    python -m theory.verify_gap [--quick] --out DIR

Builds a synthetic multi-task problem (:mod:`theory.tasks`), computes the infinite-width NTK Θ and
last-layer kernel K of depth-L ReLU MLPs (:mod:`theory.kernels`) and the ANIL / MTL predictors
(:mod:`theory.predictors`) over the grid L ∈ {1, 2, 4, …, 64} × λτ ∈ {0} ∪ geometric grid.
Gap = ‖F_ANIL − F_MTL‖ / ‖F_MTL‖ per unseen task (query set), summarised over tasks.

Checks (exit status 1 if the data contradict one of them), on the theorem's MTL variant
(shared head initialisation, MTL trained on query sets, matched test-time head adaptation):

1. at λτ = 0 the gap shrinks with L about as 1/L or faster: least-squares log-log slope over L
   and the local slope between the two largest L are both ≤ −(1 − SLOPE_TOL);
2. ANIL's predictions move from their λτ = 0 values linearly in λτ: the local log-log slope of
   ‖F_ANIL(λτ) − F_ANIL(0)‖ between the two smallest λτ > 0 is within 1 ± SLOPE_TOL at every L;
3. gap / (λτ + 1/L) is bounded over the grid: its maximum is ≤ RATIO_BOUND and its value at the
   grid point with the smallest envelope is ≤ RATIO_EDGE × its median (no blow-up where the
   envelope goes to zero).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SLOPE_TOL = 0.2
RATIO_BOUND = 10.0
RATIO_EDGE = 3.0
DEPTHS = [1, 2, 4, 8, 16, 32, 64]
MAIN = "shared_query"


def _config(quick: bool) -> dict:
    if quick:
        return dict(
            problem=dict(n_train=6, n_test=12, n_support=5, n_query=8, dim=8, rep_dim=4, seed=0),
            lam_taus=[0.0, *np.geomspace(1e-4, 10.0, 6).tolist()],
            fixed_depth=4,
        )
    return dict(
        problem=dict(n_train=16, n_test=40, n_support=5, n_query=10, dim=8, rep_dim=4, seed=0),
        lam_taus=[0.0, *np.geomspace(1e-4, 1e2, 19).tolist()],
        fixed_depth=4,
    )


def _slopes(x: list[float], y: list[float]) -> list[float]:
    lx, ly = np.log(np.asarray(x)), np.log(np.asarray(y))
    return (np.diff(ly) / np.diff(lx)).tolist()


def _ls_slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def _get(records: list[dict], depth: int, lt: float) -> dict:
    return next(r for r in records if r["depth"] == depth and r["lam_tau"] == lt)


def analyse(records: list[dict], depths: list[int], lam_taus: list[float], fixed: int) -> dict:
    """Fitted local exponents and the three checks."""
    pos = [lt for lt in lam_taus if lt > 0]
    gap0 = [_get(records, d, 0.0)[MAIN]["gap"]["mean"] for d in depths]
    gap_small = [_get(records, d, pos[0])[MAIN]["gap"]["mean"] for d in depths]
    fits: dict = {
        "gap_vs_depth_at_lamtau0": dict(
            local=_slopes(depths, gap0), least_squares=_ls_slope(depths, gap0)
        ),
        f"gap_vs_depth_at_lamtau{pos[0]:.0e}": dict(
            local=_slopes(depths, gap_small), least_squares=_ls_slope(depths, gap_small)
        ),
        "anil_drift_vs_lamtau": {},
        f"gap_vs_lamtau_at_L{fixed}": _slopes(
            pos, [_get(records, fixed, lt)[MAIN]["gap"]["mean"] for lt in pos]
        ),
    }
    for d in depths:
        drift = [_get(records, d, lt)["anil_drift"]["mean"] for lt in pos]
        fits["anil_drift_vs_lamtau"][str(d)] = _slopes(pos, drift)

    ls1 = fits["gap_vs_depth_at_lamtau0"]["least_squares"]
    last1 = fits["gap_vs_depth_at_lamtau0"]["local"][-1]
    c1 = ls1 <= -(1 - SLOPE_TOL) and last1 <= -(1 - SLOPE_TOL)
    first_drift = {d: s[0] for d, s in fits["anil_drift_vs_lamtau"].items()}
    c2 = all(abs(s - 1.0) <= SLOPE_TOL for s in first_drift.values())
    ratios = []
    for r in records:
        env = r["lam_tau"] + 1.0 / r["depth"]
        ratios.append(
            dict(
                depth=r["depth"],
                lam_tau=r["lam_tau"],
                envelope=env,
                ratio=r[MAIN]["gap"]["mean"] / env,
                ratio_q90=r[MAIN]["gap"]["q90"] / env,
            )
        )
    rv = np.asarray([x["ratio"] for x in ratios])
    edge = min(ratios, key=lambda x: x["envelope"])
    c3 = rv.max() <= RATIO_BOUND and edge["ratio"] <= RATIO_EDGE * float(np.median(rv))
    checks = {
        "1_gap_shrinks_like_1_over_L_at_lamtau0": dict(
            passed=bool(c1),
            least_squares_slope=ls1,
            last_local_slope=last1,
            rule=f"both slopes <= -{1 - SLOPE_TOL}",
        ),
        "2_anil_drift_linear_in_lamtau": dict(
            passed=bool(c2),
            small_lamtau_slopes=first_drift,
            rule=f"|slope - 1| <= {SLOPE_TOL} between the two smallest lamtau > 0, every L",
        ),
        "3_gap_over_envelope_bounded": dict(
            passed=bool(c3),
            max_ratio=float(rv.max()),
            median_ratio=float(np.median(rv)),
            ratio_at_smallest_envelope=edge["ratio"],
            smallest_envelope_point=edge,
            rule=f"max <= {RATIO_BOUND} and ratio at smallest envelope <= {RATIO_EDGE} x median",
        ),
    }
    return dict(fits=fits, checks=checks, ratios=ratios, envelope_constant=float(rv.max()))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--quick", action="store_true", help="small problem, coarse grid (<2 min)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    from theory.gap_sweep import VARIANTS, sweep
    from theory.layout import flatten
    from theory.report import write_markdown, write_plots
    from theory.tasks import make_problem

    cfg = _config(args.quick)
    t0 = time.time()
    layout = flatten(make_problem(**cfg["problem"]))
    records = sweep(layout, DEPTHS, cfg["lam_taus"])
    result = analyse(records, DEPTHS, cfg["lam_taus"], cfg["fixed_depth"])
    cmd = "python -m theory.verify_gap" + (" --quick" if args.quick else "") + f" --out {args.out}"
    payload = dict(
        command=cmd,
        config=cfg,
        depths=DEPTHS,
        variants=list(VARIANTS),
        main_variant=MAIN,
        gap_definition="||F_ANIL - F_MTL|| / ||F_MTL|| on each unseen task's query set",
        records=records,
        seconds=time.time() - t0,
        **result,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gap.json").write_text(json.dumps(payload, indent=1))
    write_markdown(payload, args.out / "gap.md")
    write_plots(payload, args.out)
    ok = all(c["passed"] for c in result["checks"].values())
    for name, c in result["checks"].items():
        print(f"check {name}: {'PASS' if c['passed'] else 'FAIL'}")
    print(f"wrote {args.out}/gap.json, gap.md, *.png in {time.time() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
