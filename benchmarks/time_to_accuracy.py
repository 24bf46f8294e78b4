"""Time to accuracy on Omniglot: every algorithm trains for the same wall-clock budget.

python benchmarks/time_to_accuracy.py --budget_s 3600 [--algorithms mtl,maml,...] [--parallel 2]
    [--val_settings 20w1s[,5w1s]] [--eval_every N] [--val_episodes N]
    [--test_episodes 10000] [--test_episodes_whole 500] [--workdir_root /work/runs/tta]

Each algorithm trains from its shipped config (configs/omniglot/<algorithm>.py, 20-way 1-shot
training tasks) through ``mtl_gbml.train.train_and_evaluate`` with ``train.time_budget_s`` =
``--budget_s`` and validation every ``train.eval_every`` steps on ``train.val_setting``; the curve
is validation accuracy against ``wall_s`` from the run's metrics.jsonl (the wall time includes the
validations, as a user pays for them). Speedup of a GBML algorithm = the wall time at which it
first reaches its best validation accuracy / the wall time at which MTL first reaches that same
accuracy. Each run's results.json (test accuracy at 5w1s and 20w1s; whole-network methods with
``--test_episodes_whole`` episodes) is copied to <results_dir>/omniglot/<algorithm>.json
(MTL's to omniglot/mtl_budget.json: omniglot/mtl.json is the full MTL run).
Writes <results_dir>/time_to_accuracy.{json,md,png}. Runs resume; a finished run (results.json
under the same config) is reused as it is, so algorithms can be added or rerun one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WHOLE_NETWORK = ("maml", "fomaml", "imaml", "minibatchprox")
# XLA:CPU's Eigen work on one thread (the pinning to one core by taskset does the rest). The
# recorded runs also passed "intra_op_parallelism_threads=1", which is no XLA flag (no leading
# --) and which XLA ignored without a word: it changed nothing and is gone.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def run_config(spec: dict):
    """The config of one run (also used by the worker)."""
    c = C.load_config(spec["algorithm"], spec.get("variant"))
    c.train.time_budget_s = float(spec["budget_s"])
    c.train.steps = max(int(c.train.steps), int(spec.get("min_steps", 0)))
    c.train.val_setting = spec["val_setting"]
    c.train.val_extra_settings = tuple(spec.get("extra_val_settings", ()))
    if spec.get("eval_every"):
        c.train.eval_every = int(spec["eval_every"])
    if not c.train.eval_every:
        c.train.eval_every = 100
    if spec.get("val_episodes"):
        c.train.val_episodes = int(spec["val_episodes"])
    c.eval.settings = ("5w1s", "20w1s")
    c.eval.episodes = int(spec["test_episodes"])
    c.eval.batch = min(int(c.eval.batch), c.eval.episodes)
    for k, v in spec.get("overrides", {}).items():
        sec, key = k.split(".")
        c[sec][key] = v
    return c


def _worker(spec: dict) -> None:
    from mtl_gbml.train import train_and_evaluate

    train_and_evaluate(run_config(spec), spec["workdir"])


def finished(spec: dict) -> bool:
    """A run that already holds results.json under the same config (it used its budget and was
    evaluated): it is reused, not retrained or re-evaluated."""
    wd = spec["workdir"]
    paths = [os.path.join(wd, f) for f in ("results.json", "config.json")]
    if not all(os.path.exists(p) for p in paths):
        return False
    return json.load(open(paths[1])) == json.loads(run_config(spec).to_json_best_effort())


def curve(workdir: str, key: str = "val_accuracy") -> list[dict]:
    """Validation accuracy against wall time from a run's metrics.jsonl (``key``: the logged
    field, ``val_accuracy`` for train.val_setting, ``val_accuracy_<setting>`` for the extras)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    pts = []
    for line in open(path):
        r = json.loads(line)
        if key in r:
            pts.append({"step": r["step"], "wall_s": r["wall_s"], "val_accuracy": r[key]})
    return pts


def time_to_best(pts: list[dict]) -> tuple[float, float] | None:
    """(best validation accuracy, wall time it was first reached)."""
    if not pts:
        return None
    best = max(p["val_accuracy"] for p in pts)
    return best, next(p["wall_s"] for p in pts if p["val_accuracy"] >= best)


def first_reach(pts: list[dict], acc: float) -> float | None:
    return next((p["wall_s"] for p in pts if p["val_accuracy"] >= acc), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithms", default=",".join(C.ALGORITHMS))
    ap.add_argument("--budget_s", type=float, required=True)
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (they share the CPU)")
    ap.add_argument("--val_settings", default="20w1s", help="one set of runs per setting")
    ap.add_argument(
        "--extra_val_settings",
        default="",
        help="also validated in the same runs (e.g. 5w1s): their own curves and speedups, at no "
        "extra training (validation time counts against the budget)",
    )
    ap.add_argument("--eval_every", type=int, default=0, help="0 = each config's own")
    ap.add_argument(
        "--eval_every_whole",
        type=int,
        default=0,
        help=f"validation every N steps for {WHOLE_NETWORK}, whose validation adapts the whole "
        "network per episode (0 = --eval_every)",
    )
    ap.add_argument("--val_episodes", type=int, default=0, help="0 = each config's own")
    ap.add_argument("--test_episodes", type=int, default=10000)
    ap.add_argument("--test_episodes_whole", type=int, default=500, help=f"for {WHOLE_NETWORK}")
    ap.add_argument(
        "--min_steps", type=int, default=100000, help="raise train.steps so the budget binds"
    )
    ap.add_argument("--workdir_root", default="/work/runs/tta")
    ap.add_argument("--results_dir", default=C.RESULTS)
    ap.add_argument(
        "--variant", default="", help="config variant for every algorithm (smoke tests: runlocal)"
    )
    ap.add_argument("--overrides", default="", help="k=v,... for every run (smoke tests)")
    ap.add_argument(
        "--pin_cpu",
        default="",
        help="run every worker on these CPU cores (taskset list, e.g. '1') with XLA's CPU "
        "backend single-threaded: each run gets one dedicated core, whatever else runs",
    )
    args = ap.parse_args()
    extra = {}
    for kv in filter(None, args.overrides.split(",")):
        k, v = kv.split("=")
        extra[k] = int(v) if v.lstrip("-").isdigit() else v
    algos = [a for a in args.algorithms.split(",") if a]
    settings = [s for s in args.val_settings.split(",") if s]
    extras = [s for s in args.extra_val_settings.split(",") if s and s not in settings]
    if extras and len(settings) > 1:
        ap.error("--extra_val_settings needs a single --val_settings (one set of runs)")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    busy_before = C.other_processes()
    os.makedirs(args.workdir_root, exist_ok=True)

    jobs = []
    for s in settings:
        for a in algos:
            workdir = os.path.join(args.workdir_root, f"{a}_{s}_{int(args.budget_s)}s")
            spec = {
                "algorithm": a,
                "variant": args.variant or None,
                "budget_s": args.budget_s,
                "min_steps": args.min_steps,
                "val_setting": s,
                "extra_val_settings": extras,
                "eval_every": (args.eval_every_whole or args.eval_every)
                if a in WHOLE_NETWORK
                else args.eval_every,
                "val_episodes": args.val_episodes,
                "test_episodes": args.test_episodes_whole
                if a in WHOLE_NETWORK
                else args.test_episodes,
                "overrides": extra,
                "workdir": workdir,
            }
            jobs.append(spec)

    running, done = [], []
    log_dir = os.path.join(args.workdir_root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    cores = [c for c in args.pin_cpu.split(",") if c]
    # several cores and several runs at a time: each run gets one core of its own
    per_run_core = len(cores) > 1 and args.parallel > 1
    if per_run_core and args.parallel > len(cores):
        ap.error(f"--parallel {args.parallel} needs as many cores in --pin_cpu ({args.pin_cpu})")
    queue = []
    for spec in jobs:
        if finished(spec):
            spec["returncode"], spec["process_s"], spec["reused"] = 0, 0.0, True
            done.append(spec)
            print(f"reusing the finished run {spec['workdir']}", flush=True)
        else:
            queue.append(spec)
    while queue or running:
        while queue and len(running) < max(1, args.parallel):
            spec = queue.pop(0)
            log = open(os.path.join(log_dir, os.path.basename(spec["workdir"]) + ".log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
            env = C.env()
            core = None
            if cores:
                if per_run_core:
                    core = next(c for c in cores if c not in {r[4] for r in running})
                cmd = ["taskset", "-c", core or args.pin_cpu, *cmd]
                env["XLA_FLAGS"] = (
                    env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA_FLAGS
                ).strip()
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=C.ROOT)
            running.append((p, spec, log, time.time(), core))
            where = f" on core {core}" if core else ""
            print(
                f"started {spec['algorithm']} ({spec['val_setting']}){where} pid {p.pid}",
                flush=True,
            )
        time.sleep(2)
        for item in list(running):
            p, spec, log, t0, _ = item
            if p.poll() is not None:
                log.close()
                running.remove(item)
                spec["returncode"], spec["process_s"] = p.returncode, time.time() - t0
                done.append(spec)
                print(f"finished {spec['algorithm']} rc={p.returncode}", flush=True)
    done.sort(key=lambda j: jobs.index(j))  # the table in the order of --algorithms

    # curves, speedups, results copies
    out = {
        "budget_s": args.budget_s,
        "parallel": args.parallel,
        "started_utc": started,
        "cpu": C.cpu_model(),
        "pin_cpu": args.pin_cpu or None,
        "settings": {},
        "other_processes_before": busy_before,
    }
    os.makedirs(os.path.join(args.results_dir, "omniglot"), exist_ok=True)
    curve_sets = [(s, s, "val_accuracy") for s in settings]  # (runs, validated setting, key)
    curve_sets += [(settings[0], e, f"val_accuracy_{e}") for e in extras]
    for s, vs, key in curve_sets:
        per = {}
        for spec in [j for j in done if j["val_setting"] == s]:
            a, wd = spec["algorithm"], spec["workdir"]
            pts = curve(wd, key)
            tb = time_to_best(pts)
            res_path = os.path.join(wd, "results.json")
            entry = {
                "workdir": wd,
                "returncode": spec["returncode"],
                "curve": pts,
                "best_val_accuracy": tb[0] if tb else None,
                "time_to_best_s": tb[1] if tb else None,
                "test_episodes": spec["test_episodes"],
            }
            if os.path.exists(res_path):
                res = json.load(open(res_path))
                entry["test"] = {k: v.get("accuracy") for k, v in res.get("eval", {}).items()}
                entry["train_steps"] = res.get("train", {}).get("steps")
                res["benchmark"] = {
                    "script": "benchmarks/time_to_accuracy.py",
                    "command": C.command_line(),
                    "budget_s": args.budget_s,
                    "parallel": args.parallel,
                    "val_setting": s,
                    "extra_val_settings": extras,
                    "pin_cpu": args.pin_cpu or None,
                    "test_episodes": spec["test_episodes"],
                    # made by an earlier invocation (same config), whose --parallel/--pin_cpu
                    # may have differed from this one's
                    "reused": bool(spec.get("reused")),
                }
                # one results file per algorithm: the first setting's run; mtl.json holds the
                # full MTL run (README), so MTL's budget run goes beside it
                if s == settings[0] and vs == s:
                    fname = "mtl_budget.json" if a == "mtl" else f"{a}.json"
                    with open(os.path.join(args.results_dir, "omniglot", fname), "w") as f:
                        json.dump(res, f, indent=2)
            per[a] = entry
        mtl = per.get("mtl", {}).get("curve", [])
        for a, e in per.items():
            if a == "mtl" or e["best_val_accuracy"] is None:
                continue
            t_mtl = first_reach(mtl, e["best_val_accuracy"]) if mtl else None
            e["mtl_time_to_same_s"] = t_mtl
            if not mtl:
                e["speedup_vs_mtl"] = "no MTL run"
            elif t_mtl is None:
                e["speedup_vs_mtl"] = "MTL never reached it"
            else:
                e["speedup_vs_mtl"] = e["time_to_best_s"] / max(t_mtl, 1e-9)
        out["settings"][vs] = per
    out["other_processes_after"] = C.other_processes()
    name = "time_to_accuracy"
    C.write_json(name, out) if args.results_dir == C.RESULTS else json.dump(
        out, open(os.path.join(args.results_dir, f"{name}.json"), "w"), indent=2
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(out["settings"])  # validated settings: the run sets' own, then the extras
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.5), squeeze=False)
    for ax, s in zip(axes[0], shown, strict=True):
        for a, e in out["settings"][s].items():
            if e["curve"]:
                xs = [p["wall_s"] / 60 for p in e["curve"]]
                ax.plot(xs, [p["val_accuracy"] for p in e["curve"]], marker=".", label=a)
        ax.set_xlabel("wall time (min)")
        ax.set_ylabel(f"validation accuracy, {s} (%)")
        ax.set_title(f"Omniglot {s}, budget {args.budget_s / 60:.0f} min each")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(args.results_dir, f"{name}.png")
    fig.savefig(png, dpi=110)

    md = [
        f"`{C.command_line()}`",
        "",
        f"# Time to accuracy on Omniglot ({started} UTC)",
        "",
        f"CPU: {C.cpu_model()}.",
        "",
        f"Every algorithm: its shipped config (configs/omniglot/<algorithm>.py, 20-way 1-shot "
        f"training tasks), the same wall-clock budget of {args.budget_s:.0f} s "
        f"(`train.time_budget_s`), {args.parallel} run(s) at a time on this machine"
        + (
            (
                f", each on one CPU core of its own (cores {args.pin_cpu})"
                if per_run_core
                else f", each pinned to CPU core(s) {args.pin_cpu}"
            )
            + f" with XLA's CPU backend single-threaded (`{SINGLE_THREAD_XLA_FLAGS}`)"
            if args.pin_cpu
            else ""
        )
        + ". Validation "
        + (
            f"every {args.eval_every} steps"
            if args.eval_every
            else "at each config's `train.eval_every`"
        )
        + (
            f" ({', '.join(WHOLE_NETWORK)}: every {args.eval_every_whole} steps, their validation "
            "adapts the whole network in every episode)"
            if args.eval_every_whole
            else ""
        )
        + ", and once more when the budget runs out. Wall time "
        "includes compilation (the first step) and the periodic validations. Speedup = the GBML algorithm's time to first reach "
        "its best validation accuracy / MTL's time to first reach that accuracy.",
        "",
        f"![time to accuracy]({name}.png)",
        "",
    ]
    for s in shown:
        md += [
            f"## Validation {s}"
            + (f" (the same runs, validated on {s} too)" if s in extras else ""),
            "",
            "| algorithm | steps | best val (%) | reached at (s) | MTL reached it at (s) | speedup "
            "vs MTL | test 5w1s (%) | test 20w1s (%) | test episodes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for a, e in out["settings"][s].items():
            t = e.get("test", {})
            sp = e.get("speedup_vs_mtl", "-")
            sp = f"{sp:.2f}x" if isinstance(sp, float) else sp
            f2 = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "-"
            f0 = lambda x: f"{x:.0f}" if isinstance(x, (int, float)) else "-"
            md.append(
                f"| {a} | {e.get('train_steps', '-')} | {f2(e['best_val_accuracy'])} | "
                f"{f0(e['time_to_best_s'])} | {f0(e.get('mtl_time_to_same_s'))} | {sp} | "
                f"{f2(t.get('5way1shot'))} | {f2(t.get('20way1shot'))} | {e['test_episodes']} |"
            )
        md.append("")
    md += [
        "Other processes using CPU (ps, >=10%) at the start: "
        + ("; ".join(busy_before) or "none")
        + "; at the end: "
        + ("; ".join(out["other_processes_after"]) or "none")
        + "."
    ]
    with open(os.path.join(args.results_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.path.insert(0, C.ROOT)
        _worker(json.loads(sys.argv[2]))
    else:
        main()
