"""Evaluation throughput: the frozen-backbone evaluator (cached features, vmapped logistic
regression) against the official recipe (scikit-learn ``LogisticRegression(C=3, lbfgs,
max_iter=1000)`` fitted per episode in a Python loop), on the same cached features and episodes.

python benchmarks/eval_throughput.py [--run /work/runs/mtl_quick] [--setting 5w1s]
    [--episodes 10000] [--sklearn_episodes 500] [--chunk N] [--cpus 0] [--name eval_throughput]

Features: the trained MTL run's backbone if ``--run`` holds checkpoints (loaded with
``mtl_gbml.run_loading.load_run``; ``python -m mtl_gbml.train --config configs/omniglot/mtl.py:quick
--workdir /work/runs/mtl_quick`` makes one in minutes), else a randomly initialised Conv4 (the
markdown says which). The evaluator timed is ``evaluation.cached_episode_accuracy`` itself; a
profile times its pieces (sample, Gram matrices, fit) separately and the whole episode before and
after the Gram path (and the tolerance-stopped fit alone). Writes
benchmarks/results/<name>.{json,md} (default eval_throughput).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def _timed(fn: Any, *args: Any, reps: int = 5) -> tuple[float, float]:
    """(CPU s, wall s) of one call after compilation: the least of ``reps`` calls of each."""
    import jax

    jax.block_until_ready(fn(*args))
    cpu, wall = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(cpu), min(wall)


def profile(
    algorithm: Any,
    params: Any,
    feats: Any,
    counts: Any,
    ways: int,
    shots: int,
    q: int,
    batch: int,
    c_reg: float,
    steps: int,
    tol: float,
    chunk: int,
) -> tuple[list[dict], dict]:
    """Per-episode cost of each piece of the cached-feature evaluator (each piece its own jitted
    program over one batch, inputs and outputs materialised), then whole episodes: the evaluator
    before this change (features path, 300 fixed steps), with the tolerance only, and now. Also
    the fit's steps taken on these episodes."""
    import jax
    import jax.numpy as jnp

    from mtl_gbml import linear_heads
    from mtl_gbml.algorithms.base import Algorithm, l2_normalize
    from mtl_gbml.data.sampler import sample_indices, smallest_k
    from mtl_gbml.evaluation import (
        cached_episode_accuracy,
        episode_grams,
        fit_chunk_size,
        map_chunks,
    )

    n_cls, m, d = feats.shape
    sy, qy = jnp.repeat(jnp.arange(ways), shots), jnp.repeat(jnp.arange(ways), q)
    keys = jax.random.split(jax.random.PRNGKey(2), batch)
    table = l2_normalize(feats)

    def keyed_draw(select):  # the sampler before session 9: one uniform key per class
        def draw_(rng):
            k_cls, k_img = jax.random.split(rng)
            classes = select(jax.random.uniform(k_cls, (n_cls,)), ways)
            u = jax.random.uniform(k_img, (ways, m))
            u = jnp.where(jnp.arange(m)[None, :] < counts[classes][:, None], u, 2.0)
            return classes, select(u, shots + q)

        return draw_

    draw_sorted = keyed_draw(lambda u, k: jnp.argsort(u, axis=-1)[..., :k])  # before session 3
    draw_top_k = keyed_draw(smallest_k)  # sessions 3-8: the same draw by a partial selection

    draw = lambda rng: sample_indices(rng, counts, m, ways, shots + q)

    def gather_rows(c, p):
        f = feats[c[:, None], p]
        return f[:, :shots].reshape(ways * shots, d), f[:, shots:].reshape(ways * q, d)

    def chunked(f):
        return jax.jit(lambda k: jax.lax.map(f, k, batch_size=chunk))

    grams = lambda k: episode_grams(k, table, counts, ways, shots, q)

    fit_chunk = fit_chunk_size(ways, shots)

    def fit_gram(steps_, tol_, vmapped=False):
        """The batch's episodes handed to the fit in chunks of ``fit_chunk`` (episodes innermost,
        as the evaluator does), or ``vmapped``: a vmap of the one-episode fit over the batch."""

        def fit(gs, gq):
            a, b = linear_heads.logistic_regression_dual(gs, sy, ways, c_reg, steps_, tol_)
            return ((gq @ a + b[..., None, :]).argmax(-1) == qy).mean(-1)

        if vmapped:
            return jax.jit(jax.vmap(fit))
        return jax.jit(lambda gs, gq: map_chunks(lambda g: fit(*g), (gs, gq), fit_chunk))

    def floor(c, p):  # read the episode's drawn rows once, nothing else
        return feats[c[:, None], p].sum((0, 1))

    def features_head(steps_, tol_):  # mtl.py's predict_from_features, written out here
        def predict_from_features(params, sf, sy, qf, ways):
            sf, qf = l2_normalize(sf), l2_normalize(qf)
            w, b = linear_heads.logistic_regression(sf, sy, ways, c_reg, steps_, tol_)
            return qf @ w.T + b

        return Algorithm("head", None, None, None, True, None, predict_from_features)

    vj = lambda f: jax.jit(jax.vmap(f))
    cls, pos = vj(draw)(keys)
    gs, gq = chunked(grams)(keys)
    evaluator = lambda a: cached_episode_accuracy(a, params, feats, counts, ways, shots, q, chunk)
    rows = [
        ("sample: full argsorts (before session 3)", vj(draw_sorted), (keys,)),
        ("sample: `lax.top_k` over every class's key (sessions 3-8)", vj(draw_top_k), (keys,)),
        (
            "sample: Floyd's draw of the classes (`sampler.distinct_integers`, now)",
            vj(draw),
            (keys,),
        ),
        ("gather rows `feats[classes[:, None], pos]` + split", vj(gather_rows), (cls, pos)),
        (
            "memory floor: read the drawn rows once (gather fused into a sum)",
            chunked(lambda a: floor(*a)),
            ((cls, pos),),
        ),
        (
            f"`episode_grams`: sample + drawn rows + one product, chunks of {chunk}",
            chunked(grams),
            (keys,),
        ),
        (
            f"fit from Gram matrices + predict, {steps} steps at most, tol {tol:g}, "
            "a vmap of the one-episode fit (today's code; the old one: findings)",
            fit_gram(steps, tol, vmapped=True),
            (gs, gq),
        ),
        (
            f"fit from Gram matrices + predict, {steps} steps at most, tol {tol:g}, "
            f"in chunks of {fit_chunk} episodes, episodes innermost (the evaluator's)",
            fit_gram(steps, tol),
            (gs, gq),
        ),
        ("fit from Gram matrices + predict, 300 fixed steps", fit_gram(300, 0.0), (gs, gq)),
        (
            f"whole episode, features path, 300 fixed steps, chunks of {chunk} (before)",
            evaluator(features_head(300, 0.0)),
            (keys,),
        ),
        (
            f"whole episode, features path, tol {tol:g}, chunks of {chunk}",
            evaluator(features_head(steps, tol)),
            (keys,),
        ),
        (
            "whole episode, Gram path: `cached_episode_accuracy` with MTL (now)",
            evaluator(algorithm),
            (keys,),
        ),
    ]
    out = []
    for name, fn, args in rows:
        cpu, wall = _timed(fn, *args)
        out.append({"piece": name, "cpu_ms": 1e3 * cpu / batch, "wall_ms": 1e3 * wall / batch})
    taken = jax.jit(
        lambda g: linear_heads.logistic_regression_dual(g, sy, ways, c_reg, steps, tol, True)[2]
    )(gs)
    taken = jnp.asarray(taken)
    fit_steps = {
        "median": float(jnp.median(taken)),
        "max": int(taken.max()),
        "note": "per episode; a vmapped chunk runs until its slowest episode stops",
    }
    return out, fit_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="/work/runs/mtl_quick")
    ap.add_argument("--setting", default="5w1s")
    ap.add_argument("--episodes", type=int, default=10000, help="for the vmapped evaluator")
    ap.add_argument("--sklearn_episodes", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--split", default="test")
    ap.add_argument("--chunk", type=int, default=0, help="episodes per vmapped chunk; 0: default")
    ap.add_argument(
        "--cpus",
        default="",
        help="comma-separated CPUs to pin this process (both learners) to, e.g. 0; default: all",
    )
    ap.add_argument(
        "--name",
        default="eval_throughput",
        help="results file name (other settings: e.g. eval_throughput_20w1s)",
    )
    args = ap.parse_args()
    if args.cpus:  # before JAX starts its threads
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    os.environ.setdefault("MTL_GBML_DATA_DIR", "/work/shared/data")
    os.environ.setdefault("TFDS_DATA_DIR", "/tmp/tfds")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from mtl_gbml import algorithms, models
    from mtl_gbml.algorithms.base import l2_normalize
    from mtl_gbml.data import datasets
    from mtl_gbml.data.sampler import prepare_tasks, sample_tasks
    from mtl_gbml.evaluation import (
        cached_episode_accuracy,
        embed_pool,
        episode_chunk,
        episode_features,
        fit_chunk_size,
        parse_setting,
    )

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
    tol = float(config.eval.logreg_tol)
    pool = datasets.load_pool(config.data, args.split)
    t = time.perf_counter()
    feats = jax.block_until_ready(embed_pool(algorithm.embed, params, state, pool))
    embed_s = time.perf_counter() - t
    counts = pool.class_counts
    q = args.queries
    sy = jnp.repeat(jnp.arange(ways), shots)
    qy = jnp.repeat(jnp.arange(ways), q)
    chunk = args.chunk or episode_chunk(feats.shape[-1], ways, shots, q)
    fit_chunk = fit_chunk_size(ways, shots)
    # the evaluator's episodes (evaluation.py): sample, fit the head, predict
    batch_fn = cached_episode_accuracy(algorithm, params, feats, counts, ways, shots, q, chunk)
    key = jax.random.PRNGKey(1)

    # same episodes for both: the first sklearn_episodes keys
    keys = jax.random.split(key, args.episodes)
    n_sk = args.sklearn_episodes
    jax.block_until_ready(batch_fn(keys[: args.batch]))  # compile
    if args.episodes % args.batch:  # the last, smaller batch is another shape: compile it too
        jax.block_until_ready(batch_fn(keys[: args.episodes % args.batch]))
    gather = lambda k: episode_features(k, feats, counts, ways, shots, q)
    sfs, qfs = jax.jit(jax.vmap(gather))(keys[:n_sk])
    sfs, qfs = np.asarray(l2_normalize(sfs)), np.asarray(l2_normalize(qfs))
    ys, yq = np.asarray(sy), np.asarray(qy)

    def sklearn_episode(e: int) -> tuple[float, int]:
        clf = LogisticRegression(C=c_reg, solver="lbfgs", max_iter=1000)
        clf.fit(sfs[e], ys)
        return float((clf.predict(qfs[e]) == yq).mean()), int(np.max(clf.n_iter_))

    # Interleaved, so that both learners see the same machine: each round times one batch of the
    # JAX evaluator, then an equal share of the scikit-learn episodes (this shared CPU's speed
    # drifts by tens of percent between runs minutes apart; a ratio of two back-to-back blocks
    # drifts with it).
    batch_starts = list(range(0, args.episodes, args.batch))
    sk_bounds = np.linspace(0, n_sk, len(batch_starts) + 1).round().astype(int)
    accs, sk, sk_iters = [], [], []
    jax_s = jax_cpu = warm_s = warm_cpu = sk_s = sk_cpu = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r, i in enumerate(batch_starts):
            t, c = time.perf_counter(), time.process_time()
            accs.append(np.asarray(batch_fn(keys[i : i + args.batch])))
            jax_s, jax_cpu = jax_s + time.perf_counter() - t, jax_cpu + time.process_time() - c
            # the same batch again at once: what a long evaluation, batch after batch, sees (the
            # call above starts from caches that scikit-learn's episodes have just filled)
            t, c = time.perf_counter(), time.process_time()
            again = np.asarray(batch_fn(keys[i : i + args.batch]))
            warm_s, warm_cpu = warm_s + time.perf_counter() - t, warm_cpu + time.process_time() - c
            if not np.array_equal(again, accs[-1]):
                raise RuntimeError(
                    f"round {r}: the same keys gave other accuracies the second time"
                )
            t, c = time.perf_counter(), time.process_time()
            for e in range(sk_bounds[r], sk_bounds[r + 1]):
                a, it = sklearn_episode(e)
                sk.append(a)
                sk_iters.append(it)
            sk_s, sk_cpu = sk_s + time.perf_counter() - t, sk_cpu + time.process_time() - c
    accs = np.concatenate(accs)
    sk = np.asarray(sk)
    pieces, fit_steps = profile(
        algorithm, params, feats, counts, ways, shots, q, args.batch, c_reg, steps, tol, chunk
    )
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
        "episodes_per_s_back_to_back": args.episodes / warm_s,
        "episodes_per_cpu_s_back_to_back": args.episodes / warm_cpu,
        "speedup_back_to_back": args.episodes / warm_s / sk_eps,
        "back_to_back_note": "each JAX batch timed a second time right after the first, on the "
        "same keys (same episodes and accuracies): the evaluator without scikit-learn's episodes "
        "between its batches; speedup_back_to_back against the same scikit-learn timing",
        "accuracy": 100 * float(accs[:n_sk].mean()),
        "sklearn_accuracy": 100 * float(sk.mean()),
        "sklearn_lbfgs_iterations": {
            "median": float(np.median(sk_iters)),
            "mean": float(np.mean(sk_iters)),
            "max": int(np.max(sk_iters)),
        },
        "accuracy_all_episodes": 100 * float(accs.mean()),
        "accuracy_all_episodes_ci95": float(ci(accs)),
        "accuracy_difference_same_episodes": 100 * float(accs[:n_sk].mean() - sk.mean()),
        "episodes_disagreeing_in_accuracy": int(np.sum(np.abs(accs[:n_sk] - sk) > 1e-6)),
        "setting": args.setting,
        "queries": q,
        "episodes": args.episodes,
        "sklearn_episodes": n_sk,
        "batch": args.batch,
        "chunk": chunk,
        "fit_chunk": fit_chunk,
        "profile_per_episode": pieces,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "load_average_after": C.loadavg(),
        "logreg": {
            "C": c_reg,
            "max_steps": steps,
            "tol": tol,
            "steps_taken": fit_steps,
            "sklearn": "lbfgs, max_iter=1000, tol=1e-4",
        },
        "features": source,
        "feature_dim": int(feats.shape[-1]),
        "embed_split_s": embed_s,
        "started_utc": started,
        "cpu": C.cpu_model(),
        "other_processes_before": busy_before,
        "other_processes_after": busy_after,
    }
    C.write_json(args.name, out)
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
        f"| vmapped JAX evaluator (`evaluation.cached_episode_accuracy`: split L2-normalised "
        f"once; per episode sample + Gram matrices, in vmapped chunks of {chunk}; then the fit "
        f"from the Gram matrices, {fit_chunk} episodes at a time with the episode axis innermost, "
        f"by accelerated descent with Boehning-preconditioned steps to tol {tol:g} (median "
        f"{fit_steps['median']:g} steps, max {fit_steps['max']}) + predict; batches of "
        f"{args.batch} keys) | {args.episodes} | {eps:.0f} | "
        f"{cpu_eps:.0f} | "
        f"{out['accuracy']:.2f} |",
        f"| scikit-learn `LogisticRegression(C={c_reg:g}, lbfgs, max_iter=1000)`, Python loop "
        f"(fit + predict only; features gathered beforehand) | {n_sk} | {sk_eps:.1f} | "
        f"{cpu_sk_eps:.1f} | "
        f"{out['sklearn_accuracy']:.2f} |",
        "",
        f"**Speedup: {out['speedup']:.0f}x** by wall time (the two timed in {len(batch_starts)} "
        f"interleaved rounds of {args.batch} JAX episodes and ~{n_sk // len(batch_starts)} "
        f"scikit-learn episodes), {out['speedup_cpu']:.0f}x per "
        f"CPU-second. Each JAX batch timed again right after, on the same keys (what a long "
        f"evaluation sees, batch after batch; the first call starts from the caches "
        f"scikit-learn's episodes left): {out['episodes_per_s_back_to_back']:.0f} episodes/s, "
        f"**{out['speedup_back_to_back']:.0f}x**. Accuracy difference on the same {n_sk} episodes: "
        f"{out['accuracy_difference_same_episodes']:+.2f} points "
        f"({out['episodes_disagreeing_in_accuracy']} episodes differ at all). JAX evaluator over "
        f"all {args.episodes} episodes: {out['accuracy_all_episodes']:.2f} +- "
        f"{out['accuracy_all_episodes_ci95']:.2f}%. scikit-learn's lbfgs took "
        f"{out['sklearn_lbfgs_iterations']['median']:g} iterations per episode (median; mean "
        f"{out['sklearn_lbfgs_iterations']['mean']:.1f}, max {out['sklearn_lbfgs_iterations']['max']}"
        "): its cost, so the ratio, depends on the features.",
        "",
        f"Both learners ran on CPU(s) {out['cpu_affinity']} of {os.cpu_count()} "
        + (
            "(pinned by --cpus)"
            if args.cpus
            else "(not pinned: XLA's and numpy's thread pools may use every core)"
        )
        + ". Other processes using "
        "CPU (ps, >=10%) before: "
        + ("; ".join(busy_before) or "none")
        + ". After: "
        + ("; ".join(busy_after) or "none")
        + f". Load average after: {out['load_average_after']}.",
        "",
        f"## Where an episode's time goes ({args.setting}, batches of {args.batch})",
        "",
        "Each piece its own jitted program vmapped over one batch, inputs and outputs "
        "materialised (so the pieces pay memory traffic that the fused whole episode partly "
        "avoids); least of 5 calls, per episode.",
        "",
        "| piece | CPU (ms/episode) | wall (ms/episode) |",
        "|---|---|---|",
    ]
    md += [f"| {r['piece']} | {r['cpu_ms']:.4f} | {r['wall_ms']:.4f} |" for r in pieces]
    C.write_md(args.name, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
