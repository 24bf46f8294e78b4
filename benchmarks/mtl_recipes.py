"""Collect the Omniglot MTL recipe runs: validation accuracy against wall time (one plot), each
recipe's final test accuracies, and the best recipe's results.json as benchmarks/results/omniglot/mtl.json.

python benchmarks/mtl_recipes.py --runs plain64=/work/runs/mtl_plain64 cosine576=/work/runs/mtl_cosine576 \
    smooth576=/work/runs/mtl_smooth576 --out benchmarks/results/omniglot
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


def read_curve(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="name=workdir pairs")
    p.add_argument("--out", required=True)
    p.add_argument("--command", default="", help="the command that trained the runs (for the md)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for pair in args.runs:
        name, workdir = pair.split("=", 1)
        curve = read_curve(workdir)
        val = [(m["wall_s"], m["step"], m["val_accuracy"]) for m in curve if "val_accuracy" in m]
        res_path = os.path.join(workdir, "results.json")
        results = json.load(open(res_path)) if os.path.exists(res_path) else None
        summary[name] = {
            "workdir": workdir,
            "config": json.load(open(os.path.join(workdir, "config.json"))),
            "val_curve": [{"wall_s": w, "step": s, "val_accuracy": a} for w, s, a in val],
            "best_val": max((a for _, _, a in val), default=None),
            "results": results,
            "finished": results is not None,
        }
    finished = {k: v for k, v in summary.items() if v["finished"]}
    validated = [k for k in finished if finished[k]["best_val"] is not None]
    best = max(validated, key=lambda k: finished[k]["best_val"]) if validated else None
    with open(os.path.join(args.out, "mtl_recipes.json"), "w") as f:
        json.dump({"best": best, "recipes": summary}, f, indent=2)
    if best:
        shutil.copy(
            os.path.join(summary[best]["workdir"], "results.json"),
            os.path.join(args.out, "mtl.json"),
        )
        shutil.copy(
            os.path.join(summary[best]["workdir"], "config.json"),
            os.path.join(args.out, "mtl.config.json"),
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, s in summary.items():
        if s["val_curve"]:
            ax.plot(
                [v["wall_s"] / 60 for v in s["val_curve"]],
                [v["val_accuracy"] for v in s["val_curve"]],
                marker="o",
                ms=3,
                label=name,
            )
    ax.set_xlabel("training wall time (min, 2-core CPU, shared)")
    ax.set_ylabel("validation 20-way 1-shot accuracy (%)")
    ax.set_title("MTL on Omniglot (Vinyals split, Conv4): recipes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "mtl_recipes.png"), dpi=120)

    lines = ["# MTL on Omniglot: recipes measured", "", f"`{' '.join(sys.argv)}`", ""]
    if args.command:
        lines += ["Trained with:", "", "```", args.command, "```", ""]
    lines += [
        "| recipe | steps | train wall (s) | best val 20w1s | test 5w1s | test 5w5s | test 20w1s | test 20w5s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        r = s["results"]
        if r:
            e = r["eval"]
            cell = lambda k, e=e: f"{e[k]['accuracy']:.2f} ± {e[k]['ci95']:.2f}" if k in e else "—"
            lines.append(
                f"| {name} | {r['train']['steps']} | {r['train']['wall_s']:.0f} | {'-' if s['best_val'] is None else format(s['best_val'], '.2f')} | "
                f"{cell('5way1shot')} | {cell('5way5shot')} | {cell('20way1shot')} | {cell('20way5shot')} |"
            )
        else:
            last = s["val_curve"][-1] if s["val_curve"] else None
            lines.append(
                f"| {name} | stopped at step {last['step'] if last else 0} | "
                f"{last['wall_s'] if last else 0:.0f} | {s['best_val'] or 0:.2f} | not evaluated | | | |"
            )
    lines += ["", "![validation accuracy against wall time](mtl_recipes.png)", ""]
    with open(os.path.join(args.out, "mtl_recipes.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
