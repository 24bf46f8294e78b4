"""MetaOptNet's dual solver: the tolerance stop (``algo.solver_tol``, at most ``solver_steps``)
against the fixed 300 steps it replaced, side by side in one run.

python benchmarks/metaoptnet_solver.py [--tasks 16] [--scales 1,3] [--settings 20w1s,20w5s,5w5s]
    [--step_repeats 2] [--max_steps 5] [--step_overrides ""] [--name metaoptnet_solver]

1. The solver alone, on the support Gram matrices of Omniglot training episodes through the
   MetaOptNet config's Conv4 at initialisation (features also multiplied by each ``--scales``
   factor: features grow in training and the steps the dual needs grow with their scale): steps
   taken, the relative error of the dual against a float64 solve run to rounding level, and the
   time of the vmapped float32 solve over ``--tasks`` episodes.
2. The real training step (``make_train_step``, the step_cost workload: omniglot-20w1s, 16 tasks)
   with each solver setting, in fresh processes run alternately (``--step_repeats`` each).

Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

OLD = {"algo.solver_steps": 300, "algo.solver_tol": 0.0}


def _solvers(new: dict) -> list[tuple[str, int, float]]:
    """(label, solver_steps, solver_tol): the old fixed-step solver and the new default."""
    return [
        ("fixed", OLD["algo.solver_steps"], OLD["algo.solver_tol"]),
        ("tol", new["solver_steps"], new["solver_tol"]),
    ]


def _features(setting: str, tasks: int, run=None):
    """(support features [T, n, D], one-hot labels [T, n, N]) of ``tasks`` episodes: training
    episodes through the MetaOptNet config's Conv4 at initialisation (training mode, as the
    training step sees them), or test episodes through a trained ``run``'s backbone (as the
    evaluator sees them)."""
    import jax

    from mtl_gbml import algorithms, models
    from mtl_gbml.algorithms import frozen
    from mtl_gbml.data import datasets
    from mtl_gbml.data.sampler import prepare_tasks, sample_tasks
    from mtl_gbml.evaluation import parse_setting

    ways, shots = parse_setting(setting)
    config = C.load_config("metaoptnet") if run is None else run.config
    pool = datasets.load_pool(config.data, "train" if run is None else "test")
    key = jax.random.PRNGKey(0)
    t = prepare_tasks(sample_tasks(pool, key, ways, shots, 1, tasks), key, "none", 0)
    if run is None:
        model = models.build(config.model)
        algorithm = algorithms.build("metaoptnet", model, config, pool.num_classes)
        params, state = algorithm.init(key, t)
        support_f, _, _ = frozen.task_features(model, params["backbone"], state, t, key)
    else:
        embed = lambda x: run.algorithm.embed(run.params, run.state, x)
        support_f = jax.vmap(embed)(t.support_x)
    return support_f, jax.nn.one_hot(t.support_y, ways)


def _cpu_timed(fn, *args, reps: int = 5) -> float:
    """Least CPU time per core (s) of ``reps`` calls after compilation."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        c = time.process_time()
        jax.block_until_ready(fn(*args))
        best = min(best, (time.process_time() - c) / C.CORES)
    return best


def solver_rows(
    settings: list[str], scales: list[float], tasks: int, new: dict, run=None
) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtl_gbml.algorithms import metaoptnet

    c, ridge = new["c"], new["dual_ridge"]
    rows = []
    for setting in settings:
        f, y = _features(setting, tasks, run)
        for scale in scales:
            kernel = scale**2 * jnp.einsum("tnd,tmd->tnm", f, f)
            with jax.experimental.enable_x64():
                k64, y64 = (jnp.asarray(np.asarray(v), jnp.float64) for v in (kernel, y))
                ref_solve = jax.vmap(lambda k, t: metaoptnet.solve(k, t, c, ridge, 200_000, 1e-14))
                ref, _, ref_taken = jax.jit(ref_solve)(k64, y64)
                ref = np.asarray(ref)
            lmax = np.asarray(jnp.linalg.eigvalsh(kernel)[:, -1])
            row = {
                "setting": setting,
                "feature_scale": scale,
                "condition_median": float(np.median((lmax + ridge) / ridge)),
                "reference_steps_max": int(np.max(ref_taken)),
            }
            for label, steps, tol in _solvers(new):
                one = lambda k, t, steps=steps, tol=tol: metaoptnet.solve(
                    k, t, c, ridge, steps, tol
                )
                fn = jax.jit(jax.vmap(one))
                a, _, taken = fn(kernel, y)
                err = np.linalg.norm(np.asarray(a) - ref, axis=(1, 2)) / np.linalg.norm(
                    ref, axis=(1, 2)
                )
                row[label] = {
                    "steps_median": float(np.median(taken)),
                    "steps_max": int(np.max(taken)),
                    "rel_error_median": float(np.median(err)),
                    "rel_error_max": float(np.max(err)),
                    "solve_cpu_ms": 1e3 * _cpu_timed(fn, kernel, y),
                }
            row["time_ratio"] = row["tol"]["solve_cpu_ms"] / row["fixed"]["solve_cpu_ms"]
            print(setting, scale, row, flush=True)
            rows.append(row)
    return rows


def run_accuracy(run, settings: list[str], episodes: int, new: dict) -> dict:
    """Test accuracy of a trained run with each solver setting, on the same episodes (same key),
    and the wall time of each evaluation."""
    import jax

    from mtl_gbml import algorithms, models
    from mtl_gbml.data import datasets
    from mtl_gbml.evaluation import evaluate, parse_setting

    config = run.config
    pool = datasets.load_pool(config.data, "test")
    out = {}
    for label, steps, tol in _solvers(new):
        c = config.copy_and_resolve_references()
        c.unlock()
        c.algo.solver_steps, c.algo.solver_tol = steps, tol
        algorithm = algorithms.build("metaoptnet", models.build(c.model), c, 1)  # no base head
        t = time.perf_counter()
        r = evaluate(
            algorithm,
            run.params,
            run.state,
            pool,
            [parse_setting(x) for x in settings],
            episodes=episodes,
            queries=config.eval.queries,
            batch=config.eval.batch,
            rng=jax.random.PRNGKey(0),
            bn_mode=config.model.bn_mode,
        )
        out[label] = {"eval": r, "eval_wall_s": time.perf_counter() - t}
        print(label, out[label], flush=True)
    return out


def _table(rows: list[dict]) -> list[str]:
    out = [
        "| setting | feature scale | condition (median) | old: steps | old: error (median / max)"
        " | new: steps (median / max) | new: error (median / max) | solve time new / old |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t = r["fixed"], r["tol"]
        out.append(
            f"| {r['setting']} | {r['feature_scale']:g} | {r['condition_median']:,.0f} | "
            f"{o['steps_max']} | {o['rel_error_median']:.1e} / {o['rel_error_max']:.1e} | "
            f"{t['steps_median']:.0f} / {t['steps_max']} | "
            f"{t['rel_error_median']:.1e} / {t['rel_error_max']:.1e} | {r['time_ratio']:.2f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--scales", default="1,3")
    ap.add_argument("--settings", default="20w1s,20w5s,5w5s")
    ap.add_argument("--step_overrides", default="", help="k=v,... for both step runs (smoke)")
    ap.add_argument("--max_steps", type=int, default=5)
    ap.add_argument("--step_repeats", type=int, default=2, help="fresh processes per setting")
    ap.add_argument("--name", default="metaoptnet_solver")
    ap.add_argument(
        "--run",
        default="",
        help="a trained MetaOptNet workdir: also its test features and accuracy",
    )
    ap.add_argument("--run_settings", default="20w5s,20w1s")
    ap.add_argument("--run_episodes", type=int, default=2000)
    args = ap.parse_args()
    import numpy as np

    from mtl_gbml.algorithms import metaoptnet

    new = metaoptnet.default_config().to_dict()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    extra = {}
    for kv in filter(None, args.step_overrides.split(",")):
        k, v = kv.split("=")
        extra[k] = int(v) if v.lstrip("-").isdigit() else v
    runs: dict[str, list[dict]] = {"fixed": [], "tol": []}
    for _ in range(args.step_repeats):  # alternated: fixed, tol, fixed, tol, ...
        for label, over in (("fixed", OLD), ("tol", {})):
            spec = {
                "algorithm": "metaoptnet",
                "overrides": {**extra, **over},
                "max_steps": args.max_steps,
                "min_steps": 3,
                "budget_s": 120,
            }
            r = C.run_worker(spec)
            print(label, {k: r.get(k) for k in ("step_cpu_ms", "error")}, flush=True)
            runs[label].append(r)
    steps = {}
    for label, rs in runs.items():
        ms = [r["step_cpu_ms"] for r in rs if "step_cpu_ms" in r]
        steps[label] = {"runs": rs}
        if len(ms) == len(rs):
            steps[label]["step_cpu_ms"] = float(np.median(ms))
            steps[label]["step_cpu_ms_runs"] = ms
        else:
            steps[label]["error"] = next(r["error"] for r in rs if "error" in r)
    rows = solver_rows(
        args.settings.split(","), [float(s) for s in args.scales.split(",")], args.tasks, new
    )
    trained, accuracy = [], {}
    if args.run:
        from mtl_gbml.run_loading import load_run

        run = load_run(args.run, use_best=False)
        trained = solver_rows(args.settings.split(","), [1.0], args.tasks, new, run)
        accuracy = run_accuracy(run, args.run_settings.split(","), args.run_episodes, new)
        accuracy["run"] = {"workdir": args.run, "step": run.step}
    ok = all("step_cpu_ms" in r for r in steps.values())
    out = {
        "command": C.command_line(),
        "cpu": C.cpu_model(),
        "started_utc": started,
        "old": OLD,
        "new": {k: new[k] for k in ("solver_steps", "solver_tol")},
        "solver": rows,
        "solver_trained": trained,
        "accuracy_trained": accuracy,
        "train_step": steps,
        "train_step_ratio": steps["tol"]["step_cpu_ms"] / steps["fixed"]["step_cpu_ms"]
        if ok
        else None,
    }
    C.write_json(args.name, out)
    n = out["new"]
    lines = [
        "# MetaOptNet's dual solver: tolerance stop against fixed steps",
        "",
        f"`{out['command']}` (started {started} UTC). Old: {OLD['algo.solver_steps']} steps. "
        f"New (the default): stop when the projected-gradient step is at most "
        f"{n['solver_tol']:g} of the iterate, at most {n['solver_steps']} steps. Features: "
        f"Conv4 at initialisation on Omniglot training episodes ({args.tasks} per setting), "
        "times a scale; error: relative Frobenius error of the dual against a float64 solve.",
        "",
    ]
    lines += _table(rows)
    lines += [
        "",
        f"Training step (the step_cost workload, omniglot-20w1s: 16 tasks, Conv4 at "
        f"initialisation), CPU time per core: median over {args.step_repeats} fresh processes "
        "per setting, run alternately, of each one's median step:",
        "",
    ]
    for label, r in steps.items():
        lines.append(
            f"- {label}: "
            + (
                f"{r['step_cpu_ms']:.0f} ms (runs: "
                + ", ".join(f"{m:.0f}" for m in r["step_cpu_ms_runs"])
                + ")"
                if "step_cpu_ms" in r
                else f"error {r['error']}"
            )
        )
    if ok:
        lines.append(f"- ratio new / old: {out['train_step_ratio']:.2f}")
    if args.run:
        info = accuracy["run"]
        lines += [
            "",
            f"A trained run (`{info['workdir']}`, step {info['step']}): test episodes "
            f"({args.tasks} per setting) through its backbone.",
            "",
            *_table(trained),
            "",
            f"Its test accuracy with each solver, on the same {args.run_episodes} episodes per "
            "setting (the same key), and the wall time of each whole evaluation:",
            "",
            "| solver | " + " | ".join(args.run_settings.split(",")) + " | evaluation (s) |",
            "|---" * (len(args.run_settings.split(",")) + 2) + "|",
        ]
        for label in ("fixed", "tol"):
            e = accuracy[label]["eval"]
            cells = [f"{v['accuracy']:.3f} ± {v['ci95']:.2f}" for v in e.values()]
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {accuracy[label]['eval_wall_s']:.0f} |"
            )
    C.write_md(args.name, lines)


if __name__ == "__main__":
    main()
