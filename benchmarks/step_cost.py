"""Step cost on the standard workload omniglot-20w1s: every algorithm against the supervised floor.

python benchmarks/step_cost.py [--algorithms mtl,maml,...] [--max_steps 5] [--budget_s 60]

Each measurement is the real jitted train step (``mtl_gbml.train.make_train_step``) of the shipped
config ``configs/omniglot/<algorithm>.py`` with the data section set to the workload (20-way
1-shot, 15 queries per class, 16 tasks per step = 5,120 images of 1x28x28, Conv4 width 64) on the
real Omniglot training pool, run in a fresh process: median step time over repeated steps after
compilation and one warm-up step; FLOPs from XLA's cost analysis of the compiled step; memory from
XLA's buffer assignment of the compiled step (``peak_mb``: arguments + outputs + temporaries -
donated) and the process's peak-RSS growth over compile and steps (``rss_peak_delta_mb``; CPU
devices report no ``memory_stats``). Writes benchmarks/results/step_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

CPU_NOTE = (
    "Step times are given by the process's CPU time (all threads) divided by the 2 cores, what "
    "the step would take with the machine to itself and robust to other processes sharing the "
    "CPU (memory-bandwidth and cache sharing still inflate it), and by wall time (what it took in "
    "this run). Ratios and GFLOP/s use the CPU times."
)
SCAN_NOTE = (
    "XLA's cost analysis counts a while loop's body once, whatever its trip count, so the GFLOP "
    "of algorithms with `lax.scan` inner loops or iterative solvers (maml, fomaml, anil, imaml, "
    "minibatchprox, metaoptnet) are lower bounds and their GFLOP/s too."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithms", default=",".join(C.ALGORITHMS))
    ap.add_argument("--max_steps", type=int, default=5)
    ap.add_argument("--min_steps", type=int, default=2)
    ap.add_argument("--budget_s", type=float, default=60.0)
    ap.add_argument("--five_shot", default="supervised,mtl,maml", help="also at 20w5s")
    ap.add_argument("--maml_inner", default="1,5,10", help="MAML with these inner steps")
    ap.add_argument(
        "--xla_conv",
        default="fomaml",
        help="also time these (whole-network) algorithms with model.conv_impl='xla' instead of "
        "their configs' 'im2col', side by side",
    )
    ap.add_argument("--overrides", default="", help="k=v,... for every run (smoke tests)")
    args = ap.parse_args()
    extra = {}
    for kv in filter(None, args.overrides.split(",")):
        k, v = kv.split("=")
        extra[k] = int(v) if v.lstrip("-").isdigit() else v
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    busy_before = C.other_processes()
    ceiling = [C.run_worker({"mode": "matmul"})]

    def measure(algorithm, shots=1, over=None):
        spec = {
            "algorithm": algorithm,
            "shots": shots,
            "overrides": {**extra, **(over or {})},
            "max_steps": args.max_steps,
            "min_steps": args.min_steps,
            "budget_s": args.budget_s,
        }
        r = C.run_worker(spec)
        print(algorithm, shots, over or "", {k: r.get(k) for k in ("step_ms", "error")}, flush=True)
        return r

    out = {"workload": C.WORKLOAD["name"], "workload_details": C.WORKLOAD, "cpu": C.cpu_model()}
    rows = {"supervised": measure("supervised")}
    for a in filter(None, args.algorithms.split(",")):
        rows[a] = measure(a)
    for a in filter(None, args.xla_conv.split(",")):
        rows[f"{a}, conv_impl=xla"] = measure(a, over={"model.conv_impl": "xla"})
    five = {}
    for a in filter(None, args.five_shot.split(",")):
        five[a] = measure(a, shots=5)
    inner = {}
    for k in filter(None, args.maml_inner.split(",")):
        if int(k) == C.load_config("maml").algo.inner_steps and "maml" in rows:
            inner[k] = rows["maml"]
        else:
            inner[k] = measure("maml", over={"algo.inner_steps": int(k)})
    ceiling.append(C.run_worker({"mode": "matmul"}))
    matmul, matmul_cpu = C.matmul_ceiling(ceiling)
    busy_after = C.other_processes()

    def ratio(a, b, table=rows, key="step_cpu_ms"):
        try:
            return table[a][key] / table[b][key]
        except (KeyError, TypeError):
            return None

    for table in (rows, five, inner):
        for r in table.values():
            if "step_ms" in r:
                r["fraction_of_matmul"] = r["gflops"] / matmul
                r["fraction_of_matmul_cpu"] = r["gflops_cpu"] / matmul_cpu
    out.update(
        {
            "matmul_gflops": matmul,
            "matmul_gflops_cpu": matmul_cpu,
            "matmul_before_after": ceiling,
            "cpu_time_note": CPU_NOTE,
            **rows,
            "20w5s": five,
            "maml_inner_steps": inner,
            "ratios": {
                "by": "process CPU time per step (step_cpu_ms); *_wall: by wall time",
                "mtl_over_supervised_wall": ratio("mtl", "supervised", key="step_ms"),
                "maml_over_mtl_wall": ratio("maml", "mtl", key="step_ms"),
                "mtl_over_supervised": ratio("mtl", "supervised"),
                "maml_over_mtl": ratio("maml", "mtl"),
                "20w5s_mtl_over_supervised": ratio("mtl", "supervised", five),
                "20w5s_maml_over_mtl": ratio("maml", "mtl", five),
                **{a + "_over_mtl": ratio(a, "mtl") for a in rows if a not in ("mtl",)},
            },
            "memory_note": "peak_mb: XLA buffer assignment of the compiled step (arguments + "
            "outputs + temporaries - donated); rss_peak_delta_mb: peak RSS growth of a fresh "
            "process over compilation and steps (CPU devices have no memory_stats).",
            "flops_note": SCAN_NOTE,
            "started_utc": started,
            "other_processes_before": busy_before,
            "other_processes_after": busy_after,
            "loadavg_after": C.loadavg(),
        }
    )
    C.write_json("step_cost", out)

    def table(rs, first="algorithm"):
        lines = [
            f"| {first} | step, CPU (ms) | x supervised | x MTL | GFLOP | GFLOP/s, CPU | of matmul "
            "| step, wall (ms) | XLA memory (MB) | peak RSS growth (MB) | steps timed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        sup = rs.get("supervised", {}).get("step_cpu_ms")
        mtl = rs.get("mtl", {}).get("step_cpu_ms")
        for name, r in rs.items():
            if "step_ms" not in r:
                lines.append(f"| {name} | failed: {r.get('error', '')[-150:]!r} |")
                continue
            xs = f"{r['step_cpu_ms'] / sup:.2f}" if sup else "-"
            xm = f"{r['step_cpu_ms'] / mtl:.2f}" if mtl else "-"
            lines.append(
                f"| {name} | {r['step_cpu_ms']:.0f} | {xs} | {xm} | {r['gflop']:.0f} | "
                f"{r['gflops_cpu']:.1f} | {100 * r['fraction_of_matmul_cpu']:.0f}% | "
                f"{r['step_ms']:.0f} | {r['peak_mb']:.0f} | {r['rss_peak_delta_mb']:.0f} | "
                f"{len(r['step_ms_all'])} |"
            )
        return lines

    mdl = rows.get("mtl", rows["supervised"]).get("model", {})
    rt = out["ratios"]
    fmt = lambda x: f"{x:.2f}" if x else "n/a"
    md = [
        f"`{C.command_line()}`",
        "",
        f"# Step cost on omniglot-20w1s ({started} UTC)",
        "",
        "Real jitted train step (`mtl_gbml.train.make_train_step`) of each shipped Omniglot "
        "config, data set to the workload: 16 tasks x 20 ways x (1 shot + 15 queries) = 5,120 "
        f"images of 1x28x28, Conv4 width 64 (backbone: conv_impl={mdl.get('conv_impl')}, "
        f"block={mdl.get('block')}, chunk_first={mdl.get('chunk_first', 0)} (-1: 64 on CPU), "
        f"dtype={mdl.get('dtype')}), real Omniglot pool. Median step "
        "time after compilation and a warm-up step, each row in a fresh process, all rows in "
        f"one run. float32 2048^2 matmul ceiling measured in the same run: {matmul_cpu:.0f} GFLOP/s "
        f"by CPU time ({matmul:.0f} by wall time). `supervised`: the same backbone and "
        "images, one linear head over all training classes, plain cross-entropy (the floor).",
        "",
        f"**MTL / supervised = {fmt(rt['mtl_over_supervised'])}; MAML / MTL = "
        f"{fmt(rt['maml_over_mtl'])}** (20w5s: {fmt(rt['20w5s_mtl_over_supervised'])} and "
        f"{fmt(rt['20w5s_maml_over_mtl'])}); by wall time: {fmt(rt['mtl_over_supervised_wall'])} "
        f"and {fmt(rt['maml_over_mtl_wall'])}.",
        "",
        CPU_NOTE,
        "",
        *table(rows),
        "",
        "## 20-way 5-shot (16 tasks x 20 x (5 + 15) = 6,400 images)",
        "",
        *table(five),
        "",
        "## MAML inner steps (20w1s)",
        "",
        *table(inner, "inner steps"),
        "",
        f"Memory: {out['memory_note']}",
        "",
        f"FLOPs: {SCAN_NOTE}",
        "",
        "Per-algorithm configs as shipped (e.g. MTL's default recipe keeps the last 3x3 map: "
        "pool_last=False; MAML 5 inner steps; the whole-network algorithms maml, fomaml, imaml "
        "and minibatchprox use conv_impl='im2col', because under a vmap over tasks with per-task "
        "weights `lax.conv` becomes a grouped convolution: the `conv_impl=xla` row is the same "
        "step with it); see each row's `pool_last` and `model` in the JSON.",
        "",
        "Other processes using CPU (ps, >=10%) before: "
        + ("; ".join(busy_before) or "none")
        + ". After: "
        + ("; ".join(busy_after) or "none")
        + f". Load average after: {C.loadavg()}.",
    ]
    C.write_md("step_cost", md)


if __name__ == "__main__":
    main()
