"""Evaluate a trained run: ``python -m mtl_gbml.evaluate --workdir DIR [--ways 5 --shots 1 ...]``.

Writes ``eval_<split>.json`` in the workdir and prints the table.
"""

from __future__ import annotations

import json
import os

import jax

from mtl_gbml.data import datasets
from mtl_gbml.evaluation import evaluate, parse_setting
from mtl_gbml.reporting import atomic_write
from mtl_gbml.run_loading import load_run, run_keys


def evaluate_workdir(
    workdir: str,
    settings: list[tuple[int, int]] | None = None,
    episodes: int | None = None,
    split: str | None = None,
    seed: int | None = None,
    queries: int | None = None,
) -> dict:
    """Evaluate the run in ``workdir``. With ``seed`` None, the episodes are the run's own test
    episodes (its config.seed's test key), so the run's settings, episodes and split give
    results.json's accuracies again; another seed draws other episodes."""
    run = load_run(workdir)
    c = run.config
    rng = run_keys(c.seed)[3] if seed is None else jax.random.PRNGKey(seed)
    split = split or c.eval.split
    settings = settings or [parse_setting(s) for s in c.eval.settings]
    pool = datasets.load_pool(c.data, split)
    res = evaluate(
        run.algorithm,
        run.params,
        run.state,
        pool,
        settings,
        episodes=c.eval.episodes if episodes is None else episodes,
        queries=c.eval.queries if queries is None else queries,
        batch=c.eval.batch,
        rng=rng,
        bn_mode=c.model.bn_mode,
        progress=True,
    )
    out = {
        "workdir": workdir,
        "split": split,
        "params": run.which,
        "step": run.step,
        "bn_mode": c.model.bn_mode,
        "eval": res,
    }
    atomic_write(os.path.join(workdir, f"eval_{split}.json"), json.dumps(out, indent=2))
    return out


def main(argv=None) -> None:
    from absl import app, flags, logging

    flags.DEFINE_string("workdir", None, "run directory written by mtl_gbml.train")
    flags.DEFINE_multi_integer("ways", None, "ways (repeat with --shots to give several settings)")
    flags.DEFINE_multi_integer("shots", None, "shots, one per --ways")
    flags.DEFINE_integer(
        "episodes", None, "episodes per setting (default: the run's eval.episodes)"
    )
    flags.DEFINE_integer(
        "queries", None, "queries per class of each episode (default: the run's eval.queries)"
    )
    flags.DEFINE_string("split", None, "split (default: the run's eval.split)")
    flags.DEFINE_integer(
        "seed",
        None,
        "episode sampling seed (default: the run's own test episodes, as in results.json)",
    )
    flags.mark_flag_as_required("workdir")
    F = flags.FLAGS

    def run(_):
        logging.set_verbosity(logging.WARNING)
        settings = None
        if F.ways or F.shots:
            if not F.ways or not F.shots or len(F.ways) != len(F.shots):
                raise app.UsageError("give --ways and --shots the same number of times")
            settings = list(zip(F.ways, F.shots, strict=True))
        try:
            out = evaluate_workdir(F.workdir, settings, F.episodes, F.split, F.seed, F.queries)
        except ValueError as e:  # a setting the split or the run cannot evaluate: say which
            raise app.UsageError(str(e)) from e
        print(
            f"{F.workdir} ({out['params']} parameters, BatchNorm {out['bn_mode']}), split {out['split']}"
        )
        print("| setting | accuracy % | 95% CI | episodes |\n|---|---|---|---|")
        for k, v in out["eval"].items():
            print(f"| {k} | {v['accuracy']:.2f} | ±{v['ci95']:.2f} | {v['episodes']} |")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
