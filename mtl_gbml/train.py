"""Train and evaluate one config: ``python -m mtl_gbml.train --config configs/omniglot/mtl.py --workdir DIR``.

Sampling, augmentation, the algorithm's meta-loss and the optax update run in one jitted step that
compiles once; the host only syncs every ``train.log_every`` steps. Rerunning with the same workdir
resumes from the last checkpoint and gives the same result as an uninterrupted run.

The same code runs on one device, many devices and many hosts (``mtl_gbml/parallel.py``): tasks are
split over a 'data' mesh axis, the global task batch is the same whatever the device or process
count, process 0 writes the logs and results, and every process takes part in checkpointing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtl_gbml import algorithms, models, optim, parallel, xla_cache
from mtl_gbml.base_config import LEGACY_VALUES
from mtl_gbml.checkpointing import Checkpointer
from mtl_gbml.config_validation import ConfigError, validate
from mtl_gbml.data import datasets
from mtl_gbml.data.errors import DataError
from mtl_gbml.data.sampler import prepare_tasks, sample_tasks
from mtl_gbml.evaluation import evaluate, parse_setting, setting_key
from mtl_gbml.reporting import MetricsWriter, atomic_write, params_digest, write_results
from mtl_gbml.run_loading import run_keys


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    best_params: Any
    best_model_state: Any
    best_val: jax.Array
    best_step: jax.Array
    wall_s: jax.Array
    loss_sum: jax.Array
    acc_sum: jax.Array
    count: jax.Array
    skipped: jax.Array
    bad_loss_step: jax.Array  # first step with a non-finite loss (1 = the first step), -1 if none
    bad_grad_step: jax.Array  # first step with a non-finite gradient, -1 if none


class NonFiniteError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the message names the step and the quantity."""


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def make_mesh() -> Mesh:
    return parallel.make_mesh()


def initial_state(params: Any, model_state: Any, opt_state: Any) -> TrainState:
    """The state before the first step: the best-so-far slots hold copies of the parameters and
    model state (own buffers: the step donates its state), the bookkeeping is zero or -1 (none)."""
    return TrainState(
        step=_scalar(0, jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        best_params=_copy(params),
        best_model_state=_copy(model_state),
        best_val=_scalar(-1.0),
        best_step=_scalar(-1, jnp.int32),
        wall_s=_scalar(0.0),
        loss_sum=_scalar(0.0),
        acc_sum=_scalar(0.0),
        count=_scalar(0, jnp.int32),
        skipped=_scalar(0, jnp.int32),
        bad_loss_step=_scalar(-1, jnp.int32),
        bad_grad_step=_scalar(-1, jnp.int32),
    )


def make_train_step(
    algorithm, tx, config: ml_collections.ConfigDict, mesh: Mesh, state_shardings=None
):
    """The jitted step; ``state_shardings`` (a tree like the state, see
    :func:`parallel.state_shardings`) fixes where the new state lives (replicated by default)."""
    d = config.data
    task_sharding = NamedSharding(mesh, PartitionSpec("data"))
    skip = config.train.nonfinite == "skip"

    def step(ts: TrainState, pool, base_key: jax.Array) -> TrainState:
        rng = jax.random.fold_in(base_key, ts.step)  # no rng in the state: resume is exact
        k_sample, k_aug, k_loss = jax.random.split(rng, 3)
        tasks = sample_tasks(pool, k_sample, d.ways, d.shots, d.queries, d.tasks_per_step)
        tasks = jax.lax.with_sharding_constraint(tasks, task_sharding)
        tasks = prepare_tasks(tasks, k_aug, d.augment, d.shift)
        (loss, (model_state, metrics)), grads = jax.value_and_grad(
            algorithm.meta_loss, has_aux=True
        )(ts.params, ts.model_state, tasks, k_loss)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = jax.tree.map(jnp.add, ts.params, updates)
        loss_ok, grad_ok = jnp.isfinite(loss), _all_finite(grads)
        ok = loss_ok & grad_ok
        if skip:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            params = keep(params, ts.params)
            opt_state = keep(opt_state, ts.opt_state)
            model_state = keep(model_state, ts.model_state)
        # the step's number as logs and checkpoints count it: steps completed once it is done
        first = lambda cur, good: jnp.where((cur < 0) & ~good, ts.step + 1, cur)
        return ts.replace(
            step=ts.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            loss_sum=ts.loss_sum + jnp.where(ok, loss, 0.0),
            acc_sum=ts.acc_sum + jnp.where(ok, metrics["accuracy"], 0.0),
            count=ts.count + ok.astype(jnp.int32),
            skipped=ts.skipped + (~ok).astype(jnp.int32),
            bad_loss_step=first(ts.bad_loss_step, loss_ok),
            bad_grad_step=first(ts.bad_grad_step, grad_ok),
        )

    out = state_shardings if state_shardings is not None else parallel.replicated(mesh)
    return jax.jit(step, out_shardings=out, donate_argnums=0)


# where the data lives, how many checkpoints are kept, how long the run may take in all
_UNCHECKED_KEYS = ("data.data_dir", "data.tfds_dir", "checkpoint.keep", "train.time_budget_s")
_UNCHECKED_SECTIONS = ("eval", "parallel")  # neither changes the trained parameters, except:
# validation (train.eval_every > 0) reads these, and its accuracies pick the best parameters
_VALIDATION_KEYS = (
    "eval.queries",
    "eval.logreg_c",
    "eval.logreg_steps",
    "eval.logreg_tol",
)
_ABSENT = object()


def _flatten(tree: dict) -> dict[str, Any]:
    """``{"a.b": value}``; an empty section stays a key of its own."""
    return traverse_util.flatten_dict(tree, keep_empty_nodes=True, sep=".")


def config_differences(old: dict, new: dict) -> list[str]:
    """The dotted keys where a saved config (``old``, as in a run's config.json) and ``new`` would
    train differently, each with both values; keys missing from ``old`` count at their
    ``LEGACY_VALUES`` entry, and are a difference where they have none."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(old_flat) | set(new_flat)):
        validated = key in _VALIDATION_KEYS and any(
            f.get("train.eval_every") for f in (old_flat, new_flat)
        )
        if key in _UNCHECKED_KEYS or (key.split(".")[0] in _UNCHECKED_SECTIONS and not validated):
            continue
        was = old_flat.get(key, LEGACY_VALUES.get(key, _ABSENT))
        now = new_flat.get(key, _ABSENT)
        if was is _ABSENT:
            diffs.append(
                f"{key}: not in the saved config (added since; its old value unknown), now {now!r}"
            )
        elif now is _ABSENT:
            diffs.append(f"{key}: {was!r} in the saved config, no longer a key")
        elif was != now:
            note = "" if key in old_flat else " (the code's value before the key existed)"
            diffs.append(f"{key}: {was!r}{note} -> {now!r}")
    return diffs


def improves(accuracy: float, best_val) -> bool:
    """Whether a validation accuracy beats the best so far, as the state stores it (float32): an
    accuracy equal to the best one, which float32 rounded down when it was stored, does not."""
    return bool(np.float32(accuracy) > np.float32(best_val))


def _check_config_matches(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved_any = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
    if os.path.exists(path) and saved_any:  # before the first checkpoint there is nothing to mix
        with open(path) as f:
            old = json.load(f)
        diffs = config_differences(old, new)
        if diffs:
            raise ConfigError(
                f"{workdir} holds a run with a different config; resuming would mix two runs. "
                "Differences: "
                + "; ".join(diffs)
                + ". Use a new --workdir, or pass the saved run's "
                "values (--config.<key>=<value>); for a key the saved config lacks, add it to "
                f"{path} with the value the run used."
            )
    parallel.sync("config_checked")  # every process has read the old file
    if parallel.is_primary():
        atomic_write(path, json.dumps(new, indent=2))


def _scalar(x, dtype=jnp.float32):
    """A host value as a replicated scalar of the state: the sharding the step's outputs have, so
    a state with bookkeeping values replaced between steps (metric sums reset at every log, the
    wall clock, the best validation) hits the step's compiled program. ``jnp.asarray`` here gave
    uncommitted arrays, and the step recompiled after the first log and the first validation
    (10 s each for a ResNet-12 on CPU). Across processes it is also what a jit input needs."""
    return parallel.scalar(parallel.host(x), dtype, parallel.make_mesh())


class _NoWriter:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _load_pool(data_config, split: str):
    """Process 0 first (it may prepare the TFDS data), then the others."""
    if not parallel.is_primary():
        parallel.sync(f"load_{split}")
    pool = datasets.load_pool(data_config, split)
    if parallel.is_primary():
        parallel.sync(f"load_{split}")
    return pool


def _check_train_pool(pool, data_config) -> None:
    """The loaded training split against the config, before anything compiles. Config validation
    knows the published sizes; a truncated or hand-made copy of a dataset holds what it holds, and
    the sampler would fill a short class's missing slots with another class's images."""
    d = data_config
    if d.ways > pool.num_classes:
        raise DataError(
            f"data.ways={d.ways} but the prepared {d.name}/{d.protocol} train split has "
            f"{pool.num_classes} classes (the published one has more): lower data.ways, or "
            "prepare the dataset again from complete files"
        )
    if d.shots + d.queries > pool.min_per_class:
        raise DataError(
            f"data.shots + data.queries = {d.shots + d.queries} but the smallest class of the "
            f"prepared {d.name}/{d.protocol} train split has {pool.min_per_class} images (the "
            "published one has more): lower data.queries, or prepare the dataset again from "
            "complete files"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint), evaluate, write results."""
    parallel.initialize(config.get("parallel"))  # before anything touches the devices
    validate(config)  # before anything loads or compiles
    xla_cache.guard()  # before anything compiles
    parallel.warm_up()  # several processes: gloo set up while they are together (parallel.py)
    os.makedirs(workdir, exist_ok=True)
    _check_config_matches(workdir, config)
    t_start = time.time()
    primary = parallel.is_primary()

    mesh = make_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    train_pool = _load_pool(config.data, "train")
    _check_train_pool(train_pool, config.data)
    train_pool = parallel.put(train_pool, replicated)
    model = models.build(config.model)
    algorithm = algorithms.build(config.algorithm, model, config, train_pool.num_classes)
    tx = optim.make(config.optimizer, config.train.steps)

    k_init, k_train, k_val, k_test = run_keys(config.seed)
    d = config.data
    example = prepare_tasks(
        sample_tasks(train_pool, k_init, d.ways, d.shots, d.queries, 1), k_init, "none", 0
    )
    params, model_state = algorithm.init(k_init, example)
    ts = initial_state(params, model_state, tx.init(params))
    shard_head = bool(config.get("parallel", {}).get("shard_head", False))
    if shard_head and config.algorithm != "mtl":
        raise ConfigError("parallel.shard_head applies to algorithm='mtl' (its head table) only")
    shardings = parallel.state_shardings(ts, mesh, shard_head)
    ts = parallel.put(ts, shardings)  # restore reads into these shardings
    ckpt = Checkpointer(workdir, config.checkpoint.keep)
    start = 0
    if ckpt.latest_step() is not None:
        ts = ckpt.restore(ts)
        start = int(parallel.host(ts.step))
        if primary:
            print(f"Resumed from checkpoint at step {start} in {ckpt.directory}")
    writer = MetricsWriter(workdir, start) if primary else _NoWriter()
    step_fn = make_train_step(algorithm, tx, config, mesh, shardings)

    val_pool = None
    val_ways, val_shots = parse_setting(
        config.train.val_setting or f"{config.data.ways}w{config.data.shots}s"
    )
    val_extra = list(config.train.get("val_extra_settings", ()))

    def validate_now(ts: TrainState) -> tuple[TrainState, float, dict[str, float]]:
        nonlocal val_pool
        if val_pool is None:  # evaluation runs on each process's first device, alike everywhere
            val_pool = parallel.local(_load_pool(config.data, config.train.val_split))
        res = evaluate(
            algorithm,
            parallel.local(ts.params),
            parallel.local(ts.model_state),
            val_pool,
            [(val_ways, val_shots)] + [parse_setting(e) for e in val_extra],
            episodes=config.train.val_episodes,
            queries=config.eval.queries,
            batch=config.eval.batch,
            rng=k_val,
            bn_mode=config.model.bn_mode,
        )
        acc = res[setting_key(val_ways, val_shots)]["accuracy"]
        extra = {
            f"val_accuracy_{e}": res[setting_key(*parse_setting(e))]["accuracy"] for e in val_extra
        }
        if improves(acc, parallel.host(ts.best_val)):
            ts = ts.replace(
                best_params=_copy(ts.params),
                best_model_state=_copy(ts.model_state),
                best_val=_scalar(acc),
                best_step=jnp.copy(ts.step),
            )
        return ts, acc, extra

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def check_finite(ts: TrainState) -> None:
        bl, bg = (int(v) for v in parallel.host((ts.bad_loss_step, ts.bad_grad_step)))
        if config.train.nonfinite == "raise" and (bl >= 0 or bg >= 0):
            which = "loss" if bl >= 0 and (bg < 0 or bl <= bg) else "gradient"
            at = bl if which == "loss" else bg
            raise NonFiniteError(
                f"non-finite {which} at step {at} (optimizer.lr={config.optimizer.lr}). The last "
                f"good checkpoint in {ckpt.directory} is kept. Lower the learning rate, clip "
                "gradients (optimizer.grad_clip) or set train.nonfinite='skip'."
            )

    from tqdm import tqdm

    total = config.train.steps
    bar = tqdm(
        total=total,
        initial=start,
        desc=f"train {config.algorithm}",
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
        disable=not primary,
    )
    wall0 = float(parallel.host(ts.wall_s))
    if config.train.time_budget_s > 0 and wall0 >= config.train.time_budget_s:
        total = start  # the budget was used up before the last stop: evaluate only
    seg_start, seg_step, t_loop = time.time(), start, time.time()
    if jax.process_count() > 1 and start < total:
        # compile ahead of time (the first call reuses this executable), then wait for every
        # process: the step's collectives set gloo up and gloo allows the processes only 30 s
        # apart (see parallel.py); compiling is inside the loop's clock, as with one process
        step_fn.lower(ts, train_pool, k_train).compile()
        parallel.sync("train_step_compiled")
    try:
        for step in range(start, total):
            ts = step_fn(ts, train_pool, k_train)
            s = step + 1
            log_now = s % config.train.log_every == 0 or s == total
            eval_now = config.train.eval_every and (s % config.train.eval_every == 0 or s == total)
            budget = config.train.time_budget_s
            out_of_time = budget > 0 and wall0 + (time.time() - t_loop) >= budget
            # A signal acts at the step where it is read here: checkpoint, then exit. One that
            # comes later (while this step logs or validates) waits for the next step, so the
            # exit always follows a save, and every process sees the same one.
            signum = stop["signal"]
            if jax.process_count() > 1:  # process 0's clock and signals decide for all
                agreed = parallel.agree([out_of_time, signum or 0])
                out_of_time, signum = bool(agreed[0]), int(agreed[1]) or None
            if out_of_time:  # the step that crosses the budget is the last one
                total = s
                log_now = True
                eval_now = bool(config.train.eval_every)
            log_now = log_now or bool(eval_now)  # every metrics line carries the training metrics
            ckpt_now = s % config.checkpoint.every == 0 or s == total or bool(signum)
            if log_now or eval_now or ckpt_now:
                check_finite(ts)
                now = time.time()
                wall = float(parallel.agree(wall0 + (now - t_loop)))
                ts = ts.replace(wall_s=_scalar(wall))
            if log_now:
                count, loss_sum, acc_sum, skipped = parallel.host(
                    (ts.count, ts.loss_sum, ts.acc_sum, ts.skipped)
                )
                # 0 when train.nonfinite='skip' skipped every step since the last log
                cnt = int(count)
                rec = {
                    "step": s,
                    "loss": float(loss_sum) / cnt if cnt else None,
                    "accuracy": float(acc_sum) / cnt if cnt else None,
                    "steps_per_sec": (s - seg_step) / max(now - seg_start, 1e-9),
                    "wall_s": wall,
                    "skipped": int(skipped),
                }
                ts = ts.replace(
                    loss_sum=_scalar(0.0), acc_sum=_scalar(0.0), count=_scalar(0, jnp.int32)
                )
                seg_start, seg_step = now, s
            if eval_now:
                ts, acc, extra = validate_now(ts)
                rec.update(val_accuracy=acc, **extra)
            if log_now:
                writer.write(rec)
                fmt = lambda v: "skipped" if v is None else f"{v:.3f}"
                bar.set_postfix(
                    loss=fmt(rec["loss"]),
                    acc=fmt(rec["accuracy"]),
                    **({"val": f"{rec['val_accuracy']:.2f}"} if "val_accuracy" in rec else {}),
                )
            bar.update(1)
            if ckpt_now:
                ckpt.save(s, ts)
            if out_of_time:
                print(f"Time budget train.time_budget_s={budget} reached at step {s}.")
                break
            if signum:
                bar.close()
                print(
                    f"Received signal {signum}: saved checkpoint at step {s}; rerun with the "
                    "same --workdir to resume."
                )
                raise SystemExit(0)
    finally:
        bar.close()
        writer.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)

    # evaluation
    step_h, best_step, best_val, wall_s, skipped = (
        parallel.host(v) for v in (ts.step, ts.best_step, ts.best_val, ts.wall_s, ts.skipped)
    )
    use_best = config.eval.use_best and int(best_step) >= 0
    eval_params = parallel.local(ts.best_params if use_best else ts.params)
    eval_state = parallel.local(ts.best_model_state if use_best else ts.model_state)
    test_pool = parallel.local(_load_pool(config.data, config.eval.split))
    settings = [parse_setting(s) for s in config.eval.settings]
    res = evaluate(
        algorithm,
        eval_params,
        eval_state,
        test_pool,
        settings,
        episodes=config.eval.episodes,
        queries=config.eval.queries,
        batch=config.eval.batch,
        rng=k_test,
        bn_mode=config.model.bn_mode,
        progress=primary,
    )
    for v in res.values():
        v["split"] = config.eval.split
    results = {
        "algorithm": config.algorithm,
        "dataset": f"{config.data.name}/{config.data.protocol}",
        "backbone": config.model.name,
        "bn_mode": config.model.bn_mode,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "train": {
            "steps": int(step_h),
            "planned_steps": config.train.steps,
            "wall_s": float(wall_s),
            "params_digest": params_digest(parallel.host(ts.params)),
            "skipped_steps": int(skipped),
            "evaluated_params": f"best validation (step {int(best_step)}, {float(best_val):.2f}%)"
            if use_best
            else "final",
        },
        "eval": res,
        "total_wall_s": time.time() - t_start,
    }
    if primary:
        write_results(workdir, results)
    ckpt.close()
    return results


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file(
        "config", None, "config file (path[:variant])", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run directory (resumes if it holds a checkpoint)")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        from absl import logging

        from mtl_gbml.reporting import results_markdown

        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO

        results = train_and_evaluate(flags_.config, flags_.workdir)
        if jax.process_index() == 0:
            print(results_markdown(results))

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
