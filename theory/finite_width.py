"""Finite-width check: real wide MLPs trained by GD against the infinite-width predictors.

Usage::

    python -m theory.finite_width --out DIR [--quick] [--resume]

For each depth L and inner-loop budget λτ (τ = 5 GD steps of rate λ = λτ/τ), and for several
widths and seeds, real NTK-parameterised ReLU MLPs (:mod:`theory.mlp`, centred so the initial
output is 0) are trained with plain full-batch GD on the squared loss (:mod:`theory.training`):

* ANIL: second-order meta-gradient through the head-only inner loop, all parameters meta-trained;
* MTL: shared body, one head per training task (all heads start from the same initialisation as
  ANIL's head -- the shared-init convention), trained jointly on the query sets; at test a new
  head starting from that initialisation is adapted on the support set with ANIL's inner loop.

Both use the same initial network per seed, the same learning rate (1/λ_max of the infinite-width
training kernel) and the same number of outer steps; the kernel predictions use the finite-step
GD filter with that rate and step count, so the comparison is exact in the infinite-width limit
whether or not training has fully converged (the final training losses are reported).

Reported: (a) ‖F_net − F_kernel‖/‖F_kernel‖ per method vs width (with the fitted log-log slope);
(b) the networks' ANIL–MTL gap ‖F_ANIL − F_MTL‖/‖F_MTL‖ against the kernel gap.
Writes finite_width.json, finite_width.md and finite_width.png to DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TAU = 5


def _config(quick: bool) -> dict:
    problem = dict(n_train=4, n_test=8, n_support=4, n_query=4, dim=8, rep_dim=4, seed=0)
    if quick:
        return dict(problem=problem, runs=[(1, 0.5, [64, 256, 1024])], seeds=2, steps=300)
    return dict(
        problem=problem,
        runs=[
            (1, 0.05, [128, 512, 2048, 8192]),
            (1, 0.5, [128, 512, 2048, 8192]),
            (2, 0.05, [128, 256, 512, 1024]),
            (2, 0.5, [128, 256, 512, 1024]),
            (4, 0.05, [128, 256, 512]),
            (4, 0.5, [128, 256, 512]),
        ],
        seeds=3,
        steps=600,
    )


def _rel_per_task(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def run_config(prob, layout, depth: int, lam_tau: float, widths: list[int], seeds: int, steps):
    """Train networks for one (L, λτ) over widths × seeds; return a result record."""
    import jax
    import jax.numpy as jnp

    from theory.kernels import kernels
    from theory.mlp import centred_model, init_mlp
    from theory.predictors import (
        anil_meta_kernel,
        anil_predict,
        mtl_kernel,
        mtl_predict,
        mtl_train_sets,
    )
    from theory.training import anil_test, mtl_test, train_anil, train_mtl

    lam = lam_tau / TAU
    kk = kernels(layout.x, None, depth)
    th, k = kk.theta, kk.k
    phi = anil_meta_kernel(th, k, layout.train, lam_tau=lam_tau, steps=TAU)
    amtl = mtl_kernel(th, k, mtl_train_sets(layout.train, "query"), 1.0)
    lr_a = float(1.0 / np.linalg.eigvalsh(phi).max())
    lr_m = float(1.0 / np.linalg.eigvalsh(amtl).max())
    nq = prob.test.xq.shape[1]
    k_anil = anil_predict(
        th,
        k,
        layout.y,
        layout.train,
        layout.test,
        lam_tau,
        steps=TAU,
        outer_lr=lr_a,
        outer_steps=steps,
    ).reshape(-1, nq)
    k_mtl = mtl_predict(
        th,
        k,
        layout.y,
        layout.train,
        layout.test,
        lam_tau,
        steps=TAU,
        outer_lr=lr_m,
        outer_steps=steps,
    ).reshape(-1, nq)
    k_anil_inf = anil_predict(th, k, layout.y, layout.train, layout.test, lam_tau, steps=TAU)
    k_mtl_inf = mtl_predict(th, k, layout.y, layout.train, layout.test, lam_tau, steps=TAU)
    kernel_gap = _rel_per_task(k_anil, k_mtl)

    f32 = jnp.float32
    tr = [jnp.asarray(a, f32) for a in (prob.train.xs, prob.train.ys, prob.train.xq, prob.train.yq)]
    te = [jnp.asarray(a, f32) for a in (prob.test.xs, prob.test.ys, prob.test.xq)]
    n_train = prob.train.n_tasks
    per_width = []
    for width in widths:
        t_w = time.time()
        rows = []
        for seed in range(seeds):
            p = init_mlp(
                jax.random.PRNGKey(1000 * depth + seed), layout.x.shape[1], width, depth, dtype=f32
            )
            p0 = (p["body"], p["head"])
            pa, loss_a, _ = train_anil(centred_model, p0, *tr, lam, TAU, lr_a, steps)
            fa = np.asarray(anil_test(centred_model, pa, p0, *te, lam, TAU), np.float64)
            heads0 = jnp.tile(p["head"], (n_train, 1))
            (body, _), loss_m, _ = train_mtl(
                centred_model, p["body"], heads0, tr[2], tr[3], lr_m, steps
            )
            fm = np.asarray(
                mtl_test(centred_model, body, p["body"], p["head"], *te, lam, TAU), np.float64
            )
            rows.append(
                dict(
                    seed=seed,
                    err_anil=float(np.linalg.norm(fa - k_anil) / np.linalg.norm(k_anil)),
                    err_mtl=float(np.linalg.norm(fm - k_mtl) / np.linalg.norm(k_mtl)),
                    gap=float(np.mean(_rel_per_task(fa, fm))),
                    loss_anil=float(loss_a),
                    loss_mtl=float(loss_m),
                )
            )
        agg = {
            key: dict(
                mean=float(np.mean([r[key] for r in rows])),
                std=float(np.std([r[key] for r in rows])),
            )
            for key in ("err_anil", "err_mtl", "gap", "loss_anil", "loss_mtl")
        }
        per_width.append(dict(width=width, seeds=rows, seconds=time.time() - t_w, **agg))
        print(
            f"L={depth} λτ={lam_tau} width={width}: err_anil={agg['err_anil']['mean']:.3g} "
            f"err_mtl={agg['err_mtl']['mean']:.3g} gap={agg['gap']['mean']:.3g} "
            f"(kernel {kernel_gap.mean():.3g})",
            flush=True,
        )
    ws = [r["width"] for r in per_width]
    slope = {
        m: float(np.polyfit(np.log(ws), np.log([r[f"err_{m}"]["mean"] for r in per_width]), 1)[0])
        for m in ("anil", "mtl")
    }
    return dict(
        depth=depth,
        lam_tau=lam_tau,
        lam=lam,
        tau=TAU,
        lr_anil=lr_a,
        lr_mtl=lr_m,
        steps=steps,
        kernel_gap=float(kernel_gap.mean()),
        kernel_gap_converged=float(
            np.mean(_rel_per_task(k_anil_inf.reshape(-1, nq), k_mtl_inf.reshape(-1, nq)))
        ),
        widths=per_width,
        err_vs_width_slope=slope,
    )


def write_outputs(payload: dict, out: Path) -> None:
    """finite_width.json / .md / .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "finite_width.json").write_text(json.dumps(payload, indent=1))
    lines = [
        "# Finite-width networks vs infinite-width kernel predictors",
        "",
        *([] if payload.get("complete", True) else ["**Partial results (run interrupted).**", ""]),
        f"Command: `{payload['command']}` ({payload['seconds']:.0f} s). "
        f"Problem `{payload['config']['problem']}`, τ = {TAU}, {payload['config']['seeds']} seeds "
        f"per width, {payload['config']['steps']} outer GD steps, float32 networks.",
        "",
        "err = ‖F_net − F_kernel‖/‖F_kernel‖ on unseen tasks' queries (mean ± std over seeds); "
        "gap = ‖F_ANIL − F_MTL‖/‖F_MTL‖ (mean over tasks, then seeds).",
        "",
        "| L | λτ | width | err ANIL | err MTL | net gap | kernel gap | final loss ANIL / MTL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        for w in r["widths"]:
            lines.append(
                f"| {r['depth']} | {r['lam_tau']} | {w['width']} | "
                f"{w['err_anil']['mean']:.3g} ± {w['err_anil']['std']:.2g} | "
                f"{w['err_mtl']['mean']:.3g} ± {w['err_mtl']['std']:.2g} | "
                f"{w['gap']['mean']:.3g} ± {w['gap']['std']:.2g} | {r['kernel_gap']:.3g} | "
                f"{w['loss_anil']['mean']:.1e} / {w['loss_mtl']['mean']:.1e} |"
            )
    lines += ["", "Fitted log-log slope of err vs width (−0.5 expected for O(1/√n)):", ""]
    for r in payload["results"]:
        s = r["err_vs_width_slope"]
        lines.append(
            f"- L={r['depth']}, λτ={r['lam_tau']}: ANIL {s['anil']:.2f}, MTL {s['mtl']:.2f}"
        )
    lines.append("")
    (out / "finite_width.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(payload["results"]):
        ws = [w["width"] for w in r["widths"]]
        lab = f"L={r['depth']}, λτ={r['lam_tau']}"
        axes[0].plot(
            ws,
            [w["err_anil"]["mean"] for w in r["widths"]],
            "o-",
            color=cmap(i),
            label=f"{lab} ANIL",
        )
        axes[0].plot(
            ws,
            [w["err_mtl"]["mean"] for w in r["widths"]],
            "s--",
            color=cmap(i),
            label=f"{lab} MTL",
        )
        g = [w["gap"]["mean"] for w in r["widths"]]
        axes[1].errorbar(
            ws, g, yerr=[w["gap"]["std"] for w in r["widths"]], fmt="o-", color=cmap(i), label=lab
        )
        axes[1].axhline(r["kernel_gap"], color=cmap(i), ls=":", lw=1)
        axes[2].plot(r["kernel_gap"], g[-1], "o", color=cmap(i), label=lab)
    ws_all = sorted({w["width"] for r in payload["results"] for w in r["widths"]})
    ref = np.asarray(ws_all, float)
    axes[0].plot(ref, 0.5 * np.sqrt(ref[0] / ref), "k:", label="∝ 1/√width")
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="width",
        ylabel="‖F_net − F_kernel‖/‖F_kernel‖",
        title="(a) networks → kernel predictors",
    )
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="width",
        ylabel="ANIL–MTL gap",
        title="(b) network gap vs width (dotted: kernel gap)",
    )
    axes[1].legend(fontsize=7)
    lim = [
        min(r["kernel_gap"] for r in payload["results"]) * 0.7,
        max(r["kernel_gap"] for r in payload["results"]) * 1.4,
    ]
    axes[2].plot(lim, lim, "k--", lw=1, label="y = x")
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="kernel gap",
        ylabel="network gap (widest)",
        title="(b) network gap follows kernel gap",
    )
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "finite_width.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="finite-width ANIL/MTL vs kernel predictors")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--resume", action="store_true", help="reuse configs already in the json")
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    from theory.layout import flatten
    from theory.tasks import make_problem

    cfg = _config(args.quick)
    t0 = time.time()
    prob = make_problem(**cfg["problem"])
    layout = flatten(prob)
    cmd = (
        "python -m theory.finite_width" + (" --quick" if args.quick else "") + f" --out {args.out}"
    )
    done: dict = {}
    if args.resume and (args.out / "finite_width.json").exists():
        old = json.loads((args.out / "finite_width.json").read_text())
        if old["config"]["seeds"] == cfg["seeds"] and old["config"]["steps"] == cfg["steps"]:
            done = {(r["depth"], r["lam_tau"]): r for r in old["results"]}
    results = []
    for d, lt, ws in cfg["runs"]:
        prev = done.get((d, lt))
        if prev is not None and [w["width"] for w in prev["widths"]] == ws:
            results.append(prev)  # --resume: configuration already computed
        else:
            results.append(run_config(prob, layout, d, lt, ws, cfg["seeds"], cfg["steps"]))
        complete = len(results) == len(cfg["runs"])
        payload = dict(
            command=cmd, config=cfg, results=results, complete=complete, seconds=time.time() - t0
        )
        write_outputs(payload, args.out)  # after every configuration: partial results survive
    print(f"wrote {args.out}/finite_width.{{json,md,png}} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
