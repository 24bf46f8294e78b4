"""A fast Conv4 on CPU: the MTL train step on omniglot-20w1s with each backbone implementation.

python benchmarks/fast_backbone.py [--variants a,b,...] [--max_steps 5]

Each variant runs the real jitted train step (``mtl_gbml.train.make_train_step``, configs/omniglot/
mtl.py on the 20w1s workload) in a fresh process; a per-block forward/gradient profile at the same
batch shows where the time goes. Writes benchmarks/results/fast_backbone.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# name: (config overrides, XLA_FLAGS)
CLASSIC = "--xla_cpu_use_thunk_runtime=false"
# name: (config overrides, XLA_FLAGS); every variant names chunk_first (the default is 64)
VARIANTS = {
    "reference": (
        {"model.conv_impl": "xla", "model.block": "reference", "model.chunk_first": 0},
        "",
    ),
    "im2col_first": (
        {"model.conv_impl": "im2col_first", "model.block": "reference", "model.chunk_first": 0},
        "",
    ),
    "fused": ({"model.conv_impl": "xla", "model.block": "fused", "model.chunk_first": 0}, ""),
    "fused+im2col_first": (
        {"model.conv_impl": "im2col_first", "model.block": "fused", "model.chunk_first": 0},
        "",
    ),
    "fused+chunk16": (
        {"model.conv_impl": "xla", "model.block": "fused", "model.chunk_first": 16},
        "",
    ),
    "fused+chunk64": (
        {"model.conv_impl": "xla", "model.block": "fused", "model.chunk_first": 64},
        "",
    ),
    "fused+chunk256": (
        {"model.conv_impl": "xla", "model.block": "fused", "model.chunk_first": 256},
        "",
    ),
    "fused+chunk64+bf16": (
        {"model.block": "fused", "model.chunk_first": 64, "model.dtype": "bfloat16"},
        "",
    ),
    # XLA's classic CPU runtime sends bf16 convolutions to oneDNN (AMX on this CPU) but segfaults
    # on the chunked first block: these two keep chunk_first=0
    "fused+classic": ({"model.block": "fused", "model.chunk_first": 0}, CLASSIC),
    "fused+bf16+classic": (
        {"model.block": "fused", "model.chunk_first": 0, "model.dtype": "bfloat16"},
        CLASSIC,
    ),
}
CPU_NOTE = (
    "Times are given twice: by the process's CPU time (all threads) divided by the 2 cores, what "
    "the step would take with the machine to itself, robust to other processes sharing the CPU "
    "(memory-bandwidth and cache sharing still inflate it), and by wall time (what it took in "
    "this run, inflated by whatever else ran). Rank and ratios by the CPU columns."
)
EXACT = {"reference", "im2col_first", "fused", "fused+im2col_first", "fused+classic"}
EXACT |= {"fused+chunk16", "fused+chunk64", "fused+chunk256"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--max_steps", type=int, default=5)
    ap.add_argument("--budget_s", type=float, default=60.0)
    ap.add_argument("--layer_batch", type=int, default=5120)
    ap.add_argument("--skip_layers", action="store_true")
    ap.add_argument(
        "--overrides", default="", help="extra k=v (smoke tests: data.tasks_per_step=2)"
    )
    args = ap.parse_args()
    extra = {}
    for kv in filter(None, args.overrides.split(",")):
        k, v = kv.split("=")
        extra[k] = int(v) if v.isdigit() else v
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    busy_before = C.other_processes()
    ceiling = [C.run_worker({"mode": "matmul"})]
    rows = {}
    for name in args.variants.split(","):
        over, flags = VARIANTS[name]
        spec = {
            "algorithm": "mtl",
            "overrides": {**over, **extra},
            "max_steps": args.max_steps,
            "budget_s": args.budget_s,
        }
        r = C.run_worker(spec, flags)
        r["xla_flags"], r["exact"] = flags, name in EXACT
        rows[name] = r
        print(name, {k: r.get(k) for k in ("step_ms", "gflops", "error")}, flush=True)
    ceiling.append(C.run_worker({"mode": "matmul"}))
    layers = {}
    if not args.skip_layers:
        layers = C.run_worker(
            {
                "mode": "layers",
                "batch": args.layer_batch,
                "variants": [
                    ["xla", "reference"],
                    ["im2col", "fused"],
                    ["xla", "fused"],
                    ["xla", "chunk64"],
                ],
            }
        )
    busy_after = C.other_processes()
    matmul, matmul_cpu = C.matmul_ceiling(ceiling)
    ref = rows.get("reference", {})
    ref = ref if "step_ms" in ref else {}  # a failed reference worker: no speedups, not a crash
    for r in rows.values():
        if "step_ms" in r and CLASSIC in r["xla_flags"] and "step_ms" in rows.get("fused", {}):
            # the classic runtime's oneDNN custom calls carry no FLOPs in XLA's cost analysis:
            # count the same step (exact variants: the same function) in the default runtime
            r["gflop_xla_cost_analysis"] = r["gflop"]
            r["gflop"] = rows["fused"]["gflop"]
            r["gflops"] = r["gflop"] / (r["step_ms"] / 1e3)
            r["gflops_cpu"] = r["gflop"] / (r["step_cpu_ms"] / 1e3)
    for r in rows.values():
        if "step_ms" in r:
            r["fraction_of_matmul"] = r["gflops"] / matmul
            r["fraction_of_matmul_cpu"] = r["gflops_cpu"] / matmul_cpu
            r["speedup_vs_reference"] = ref["step_ms"] / r["step_ms"] if ref else float("nan")
            r["speedup_vs_reference_cpu"] = (
                ref["step_cpu_ms"] / r["step_cpu_ms"] if ref else float("nan")
            )
    ok = {k: v for k, v in rows.items() if "step_ms" in v and v["exact"]}
    best = min(ok, key=lambda k: ok[k]["step_cpu_ms"]) if ok else None
    out = {
        "workload": C.WORKLOAD,
        "algorithm": "mtl (configs/omniglot/mtl.py default recipe, on the 20w1s workload)",
        "matmul_gflops": matmul,
        "matmul_gflops_cpu": matmul_cpu,
        "matmul_before_after": ceiling,
        "cpu_time_note": CPU_NOTE,
        "variants": rows,
        "fastest_exact": best,
        "layers": layers,
        "started_utc": started,
        "other_processes_before": busy_before,
        "other_processes_after": busy_after,
        "loadavg_after": C.loadavg(),
    }
    C.write_json("fast_backbone", out)
    md = [
        f"`{C.command_line()}`",
        "",
        f"# Fast Conv4 on CPU ({started} UTC)",
        "",
        "MTL train step (real `make_train_step`, Omniglot pool) on omniglot-20w1s: 16 tasks x 20 "
        "ways x (1 + 15) images = 5,120 images of 1x28x28, Conv4 width 64. Median step time over "
        "repeated steps after compilation and one warm-up step, each variant in a fresh process. "
        f"float32 2048^2 matmul ceiling: {matmul_cpu:.0f} GFLOP/s by CPU time, {matmul:.0f} by wall "
        "time (mean of before and after). GFLOP: XLA's cost analysis of the step; for a chunked "
        "variant, of the same step unchunked (the function it computes: XLA counts a while "
        "loop's body once, not once per trip).",
        "",
        CPU_NOTE,
        "",
        "| variant | conv_impl | block | chunk_first | dtype | XLA flags | exact | GFLOP | step, CPU "
        "(ms) | GFLOP/s, CPU | of matmul, CPU | speedup, CPU | step, wall (ms) | of matmul, wall "
        "| speedup, wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "step_ms" not in r:
            md.append(f"| {name} | failed: {r.get('error', '')[-120:]!r} |")
            continue
        m = r["model"]
        md.append(
            f"| {name} | {m.get('conv_impl')} | {m.get('block')} | {m.get('chunk_first', 0)} | "
            f"{m.get('dtype')} | "
            f"{r['xla_flags'] or '-'} | {'yes' if r['exact'] else 'no (bf16)'} | "
            f"{r['gflop']:.0f} | {r['step_cpu_ms']:.0f} | {r['gflops_cpu']:.1f} | "
            f"{100 * r['fraction_of_matmul_cpu']:.0f}% | {r['speedup_vs_reference_cpu']:.2f}x | "
            f"{r['step_ms']:.0f} | {100 * r['fraction_of_matmul']:.0f}% | "
            f"{r['speedup_vs_reference']:.2f}x |"
        )
    md += ["", f"Fastest exact variant: **{best}**.", ""]
    if layers and "error" not in layers:
        md += [
            f"## Where the time goes: per block at batch {args.layer_batch} (training mode)",
            "",
            "| block | input | fwd, CPU (ms) | fwd+bwd, CPU (ms) | fwd+bwd GFLOP | GFLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in layers.items():
            md.append(
                f"| {k} | {'x'.join(map(str, v['input']))} | {v['fwd_ms']:.0f} | "
                f"{v['grad_ms']:.0f} | {v['grad_gflop']:.1f} | "
                f"{v['grad_gflop'] / v['grad_ms'] * 1e3:.1f} |"
            )
    md += [
        "",
        "Other processes using CPU (ps, >=10%) before: "
        + ("; ".join(busy_before) or "none")
        + ". After: "
        + ("; ".join(busy_after) or "none")
        + f". Load average after: {C.loadavg()}.",
    ]
    C.write_md("fast_backbone", md)


if __name__ == "__main__":
    main()
