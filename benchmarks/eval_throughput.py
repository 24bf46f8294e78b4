"""Evaluation throughput: the frozen-backbone evaluator (cached features, vmapped logistic
regression) against the official recipe (scikit-learn ``LogisticRegression(C=3, lbfgs,
max_iter=1000)`` fitted per episode in a Python loop), on the same cached features and episodes.

python benchmarks/eval_throughput.py [--run /work/runs/mtl_cosine576] [--setting 5w1s]
    [--episodes 10000] [--sklearn_episodes 500]

Features: the trained MTL run's backbone if ``--run`` holds checkpoints (loaded with
``mtl_gbml.run_loading.load_run``), else a randomly initialised Conv4 (the markdown says which).
Writes benchmarks/results/eval_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="/work/runs/mtl_cosine576")
    ap.add_argument("--setting", default="5w1s")
    ap.add_argument("--episodes", type=int, default=10000, help="for the vmapped evaluator")
    ap.add_argument("--sklearn_episodes", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    os.environ.setdefault("MTL_GBML_DATA_DIR", "/work/shared/data")
    os.environ.setdefault("TFDS_DATA_DIR", "/tmp/tfds")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from mtl_gbml import algorithms, models
    from mtl_gbml.algorithms.base import l2_normalize
    from mtl_gbml.data import datasets
    from mtl_gbml.data.sampler import prepare_tasks, sample_indices, sample_tasks
    from mtl_gbml.evaluation import embed_pool, parse_setting

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    busy_before = C.other_processes()
    ways, shots = parse_setting(args.setting)
    if os.path.isdir(os.path.join(args.run, "checkpoints")):
        from mtl_gbml.run_loading import load_run

        run = load_run(args.run)
        config, algorithm, params, state = run.config, run.algorithm, run.params, run.state
        source = f"trained MTL run {args.run} ({run.which}, checkpoint step {run.step})"
    else:
        config = C.load_config("mtl")
        pool = datasets.load_pool(config.data, "train")
        algorithm = algorithms.build("mtl", models.build(config.model), config, pool.num_classes)
        k = jax.random.PRNGKey(0)
        ex = prepare_tasks(sample_tasks(pool, k, 5, 1, 1, 1), k, "none", 0)
        params, state = algorithm.init(k, ex)
        source = f"randomly initialised Conv4 ({args.run} has no checkpoints)"
    c_reg, steps = float(config.eval.logreg_c), int(config.eval.logreg_steps)
    pool = datasets.load_pool(config.data, args.split)
    t = time.perf_counter()
    feats = jax.block_until_ready(embed_pool(algorithm.embed, params, state, pool))
    embed_s = time.perf_counter() - t
    counts = pool.class_counts
    q = args.queries
    sy = jnp.repeat(jnp.arange(ways), shots)
    qy = jnp.repeat(jnp.arange(ways), q)

    def gather(rng):
        classes, pos = sample_indices(rng, counts, feats.shape[1], ways, shots + q)
        f = feats[classes[:, None], pos]
        return f[:, :shots].reshape(ways * shots, -1), f[:, shots:].reshape(ways * q, -1)

    def one(rng):  # the evaluator's episode: sample, fit the head, predict (evaluation.py)
        sf, qf = gather(rng)
        logits = algorithm.predict_from_features(params, sf, sy, qf, ways)
        return (logits.argmax(-1) == qy).mean()

    batch_fn = jax.jit(jax.vmap(one))
    key = jax.random.PRNGKey(1)

    # same episodes for both: the first sklearn_episodes keys
    keys = jax.random.split(key, args.episodes)
    n_sk = args.sklearn_episodes
    jax.block_until_ready(batch_fn(keys[: args.batch]))  # compile
    t, c = time.perf_counter(), time.process_time()
    accs = [
        np.asarray(batch_fn(keys[i : i + args.batch])) for i in range(0, args.episodes, args.batch)
    ]
    jax_s, jax_cpu = time.perf_counter() - t, time.process_time() - c
    accs = np.concatenate(accs)
    sfs, qfs = jax.jit(jax.vmap(gather))(keys[:n_sk])
    sfs, qfs = np.asarray(l2_normalize(sfs)), np.asarray(l2_normalize(qfs))
    ys, yq = np.asarray(sy), np.asarray(qy)
    sk = []
    t, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in range(n_sk):
            clf = LogisticRegression(C=c_reg, solver="lbfgs", max_iter=1000)
            clf.fit(sfs[e], ys)
            sk.append((clf.predict(qfs[e]) == yq).mean())
    sk_s, sk_cpu = time.perf_counter() - t, time.process_time() - c
    sk = np.asarray(sk)
    eps, sk_eps = args.episodes / jax_s, n_sk / sk_s
    ci = lambda a: 1.96 * 100 * a.std(ddof=1) / np.sqrt(len(a))
    busy_after = C.other_processes()
    cpu_eps, cpu_sk_eps = args.episodes / jax_cpu, n_sk / sk_cpu
    out = {
        "episodes_per_s": eps,
        "episodes_per_cpu_s": cpu_eps,
        "sklearn_episodes_per_cpu_s": cpu_sk_eps,
        "speedup_cpu": cpu_eps / cpu_sk_eps,
        "speedup_note": "speedup: wall-clock episodes/s ratio; speedup_cpu: ratio of episodes per "
        "CPU-second (all threads), robust to other processes sharing the CPU",
        "sklearn_episodes_per_s": sk_eps,
        "speedup": eps / sk_eps,
        "accuracy": 100 * float(accs[:n_sk].mean()),
        "sklearn_accuracy": 100 * float(sk.mean()),
        "accuracy_all_episodes": 100 * float(accs.mean()),
        "accuracy_all_episodes_ci95": float(ci(accs)),
        "accuracy_difference_same_episodes": 100 * float(accs[:n_sk].mean() - sk.mean()),
        "episodes_disagreeing_in_accuracy": int(np.sum(np.abs(accs[:n_sk] - sk) > 1e-6)),
        "setting": args.setting,
        "queries": q,
        "episodes": args.episodes,
        "sklearn_episodes": n_sk,
        "batch": args.batch,
        "logreg": {"C": c_reg, "steps": steps, "sklearn": "lbfgs, max_iter=1000, tol=1e-4"},
        "features": source,
        "feature_dim": int(feats.shape[-1]),
        "embed_split_s": embed_s,
        "started_utc": started,
        "other_processes_before": busy_before,
        "other_processes_after": busy_after,
    }
    C.write_json("eval_throughput", out)
    md = [
        f"`{C.command_line()}`",
        "",
        f"# Evaluation throughput ({started} UTC)",
        "",
        f"Features: {source}; {feats.shape[-1]}-d, {args.split} split embedded once in "
        f"{embed_s:.1f} s. Setting {args.setting}, {q} queries per class. Both learners fit the "
        f"official recipe's head on L2-normalised features: L2-regularised multinomial logistic "
        f"regression with C={c_reg:g}.",
        "",
        "| learner | episodes | episodes/s (wall) | episodes per CPU-second | accuracy on the "
        "shared episodes (%) |",
        "|---|---|---|---|---|",
        f"| vmapped JAX evaluator (`evaluation.py` path: sample + fit {steps} accelerated "
        f"gradient steps + predict, batches of {args.batch}) | {args.episodes} | {eps:.0f} | "
        f"{cpu_eps:.0f} | "
        f"{out['accuracy']:.2f} |",
        f"| scikit-learn `LogisticRegression(C={c_reg:g}, lbfgs, max_iter=1000)`, Python loop "
        f"(fit + predict only; features gathered beforehand) | {n_sk} | {sk_eps:.1f} | "
        f"{cpu_sk_eps:.1f} | "
        f"{out['sklearn_accuracy']:.2f} |",
        "",
        f"**Speedup: {out['speedup']:.0f}x** by wall time, {out['speedup_cpu']:.0f}x per "
        f"CPU-second; accuracy difference on the same {n_sk} episodes: "
        f"{out['accuracy_difference_same_episodes']:+.2f} points "
        f"({out['episodes_disagreeing_in_accuracy']} episodes differ at all). JAX evaluator over "
        f"all {args.episodes} episodes: {out['accuracy_all_episodes']:.2f} +- "
        f"{out['accuracy_all_episodes_ci95']:.2f}%.",
        "",
        "Other processes using CPU (ps, >=10%) before: "
        + ("; ".join(busy_before) or "none")
        + ". After: "
        + ("; ".join(busy_after) or "none")
        + ".",
    ]
    C.write_md("eval_throughput", md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
