"""Markdown table and PNG plots for :mod:`theory.verify_gap` results."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _rec(payload: dict, depth: int, lt: float) -> dict:
    return next(r for r in payload["records"] if r["depth"] == depth and r["lam_tau"] == lt)


def _fmt(s: dict | None) -> str:
    if s is None or s.get("mean") is None:
        return "∞ (‖F_MTL‖=0)"
    return f"{s['mean']:.3g} ± {s['std']:.2g}"


def write_markdown(payload: dict, path: Path) -> None:
    """Write gap.md: command, checks, L sweep, λτ sweep, fitted exponents."""
    depths = payload["depths"]
    lts = payload["config"]["lam_taus"]
    small = [lt for lt in lts if lt > 0][0]
    fixed = payload["config"]["fixed_depth"]
    lines = [
        "# ANIL vs MTL prediction gap on unseen tasks (infinite width)",
        "",
        f"Command: `{payload['command']}` ({payload['seconds']:.0f} s).  ",
        f"Problem: `{payload['config']['problem']}`.  ",
        "Gap = ‖F_ANIL − F_MTL‖/‖F_MTL‖ per unseen task, mean ± std over tasks. Main variant "
        "`shared_query`: MTL heads share one initialisation, MTL trains on the query sets, the "
        "test head is adapted with the same λτ as ANIL. Other columns: `shared_merged` (MTL "
        "trains on support ∪ query), `indep_query` (independent head init; gap shown relative "
        "to ‖F_ANIL‖ since F_MTL = 0 at λτ = 0), `shared_query_fit` (test head fitted to "
        "convergence).",
        "",
        "## Checks",
        "",
    ]
    for name, c in payload["checks"].items():
        detail = {k: v for k, v in c.items() if k not in ("passed", "rule")}
        lines.append(
            f"- **{name}**: {'PASS' if c['passed'] else 'FAIL'} ({c['rule']}); `{_short(detail)}`"
        )
    lines += [
        "",
        f"## Depth sweep (λτ = 0 and λτ = {small:.0e})",
        "",
        "| L | 1/(L+1) | gap λτ=0 | gap λτ=" + f"{small:.0e}" + " | merged λτ=0 | "
        "indep (rel. ANIL) λτ=0 | gap·L λτ=0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in depths:
        r0, rs = _rec(payload, d, 0.0), _rec(payload, d, small)
        g0 = r0["shared_query"]["gap"]
        lines.append(
            f"| {d} | {1 / (d + 1):.3f} | {_fmt(g0)} | {_fmt(rs['shared_query']['gap'])} | "
            f"{_fmt(r0['shared_merged']['gap'])} | {_fmt(r0['indep_query']['gap_rel_anil'])} | "
            f"{g0['mean'] * d:.3g} |"
        )
    for depth in dict.fromkeys([fixed, depths[-1]]):
        lines += [
            "",
            f"## λτ sweep at L = {depth}",
            "",
            "| λτ | gap (main) | ANIL drift ‖F(λτ)−F(0)‖/‖F(0)‖ | merged | fit-to-convergence | "
            "gap/(λτ+1/L) |",
            "|---|---|---|---|---|---|",
        ]
        for lt in lts:
            r = _rec(payload, depth, lt)
            env = lt + 1.0 / depth
            lines.append(
                f"| {lt:.2g} | {_fmt(r['shared_query']['gap'])} | {_fmt(r['anil_drift'])} | "
                f"{_fmt(r['shared_merged']['gap'])} | {_fmt(r['shared_query_fit']['gap'])} | "
                f"{r['shared_query']['gap']['mean'] / env:.3g} |"
            )
    lines += ["", "## Fitted local log-log exponents", ""]
    for name, f in payload["fits"].items():
        lines.append(f"- {name}: `{_short(f)}`")
    lines.append("")
    path.write_text("\n".join(lines))


def _short(obj):
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: _short(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_short(v) for v in obj]
    return obj


def write_plots(payload: dict, out: Path) -> None:
    """gap_vs_lamtau.png, gap_vs_depth.png, anil_drift.png (all log-log, with envelope)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = payload["depths"]
    pos = [lt for lt in payload["config"]["lam_taus"] if lt > 0]
    c = payload["envelope_constant"]
    cmap = plt.get_cmap("viridis")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, d in enumerate(depths):
        col = cmap(i / max(1, len(depths) - 1))
        m = np.array([_rec(payload, d, lt)["shared_query"]["gap"]["mean"] for lt in pos])
        lo = np.array([_rec(payload, d, lt)["shared_query"]["gap"]["q10"] for lt in pos])
        hi = np.array([_rec(payload, d, lt)["shared_query"]["gap"]["q90"] for lt in pos])
        ax.plot(pos, m, "o-", color=col, ms=3, label=f"L={d}")
        ax.fill_between(pos, lo, hi, color=col, alpha=0.12)
        ax.plot(pos, c * (np.asarray(pos) + 1.0 / d), "--", color=col, lw=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="λτ",
        ylabel="‖F_ANIL − F_MTL‖ / ‖F_MTL‖",
        title=f"gap vs λτ (dashed: {c:.2g}·(λτ + 1/L); band: 10–90% of tasks)",
    )
    top = max(_rec(payload, d, lt)["shared_query"]["gap"]["q90"] for d in depths for lt in pos)
    ax.set_ylim(top=5 * top)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_lamtau.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dd = np.asarray(depths, dtype=float)
    for lt, mk in [(0.0, "o-"), (pos[0], "s--")]:
        m = [_rec(payload, d, lt)["shared_query"]["gap"]["mean"] for d in depths]
        lo = [_rec(payload, d, lt)["shared_query"]["gap"]["q10"] for d in depths]
        hi = [_rec(payload, d, lt)["shared_query"]["gap"]["q90"] for d in depths]
        ax.plot(dd, m, mk, label=f"shared init, query sets, λτ={lt:.0e}")
        ax.fill_between(dd, lo, hi, alpha=0.15)
    m = [_rec(payload, d, 0.0)["shared_merged"]["gap"]["mean"] for d in depths]
    ax.plot(dd, m, "^:", label="shared init, support∪query, λτ=0")
    m = [_rec(payload, d, 0.0)["indep_query"]["gap_rel_anil"]["mean"] for d in depths]
    ax.plot(dd, m, "x:", label="independent heads (rel. to ANIL), λτ=0")
    ax.plot(dd, c / dd, "k--", lw=1, label=f"envelope {c:.2g}/L")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="depth L",
        ylabel="relative gap",
        title="gap vs depth at small λτ",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_depth.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, d in enumerate(depths):
        m = [_rec(payload, d, lt)["anil_drift"]["mean"] for lt in pos]
        ax.plot(pos, m, "o-", ms=3, color=cmap(i / max(1, len(depths) - 1)), label=f"L={d}")
    ref = np.asarray(pos)
    m0 = _rec(payload, depths[0], pos[0])["anil_drift"]["mean"]
    ax.plot(ref, m0 * ref / ref[0], "k--", lw=1, label="slope 1")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="λτ",
        ylabel="‖F_ANIL(λτ) − F_ANIL(0)‖ / ‖F_ANIL(0)‖",
        title="ANIL drift from λτ = 0 (log-log)",
    )
    ax.set_ylim(top=10 * max(_rec(payload, d, pos[-1])["anil_drift"]["mean"] for d in depths))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "anil_drift.png", dpi=120)
    plt.close(fig)
