"""Faults provoked for real: SIGKILL mid-run, a torn checkpoint write, SIGTERM, NaN/Inf, seeds."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, load_config, subprocess_env

from mtl_gbml import train

CONFIG = "configs/omniglot/mtl.py"
OVERRIDES = [
    "--config.train.steps=120",
    "--config.checkpoint.every=5",
    "--config.train.eval_every=20",
    "--config.train.log_every=40",  # checkpoints at 25-35 fall inside a logging interval
    "--config.eval.settings=('5w1s',)",  # runlocal's 20w1s too would add ~5 s to each of 5 runs
]


def _cli(workdir, *overrides):
    env = subprocess_env(PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "mtl_gbml.train",
        f"--config={CONFIG}:runlocal",
        f"--workdir={workdir}",
        *OVERRIDES,
        *overrides,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _finish(proc) -> str:
    out, _ = proc.communicate(timeout=900)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


# Interrupted once a checkpoint after the first validation (step 20) exists: the resumed run must
# bring back the best-validation parameters, accuracy and step from the checkpoint, not only the
# weights. The reference run's best validation is step 20's, so a resume that lost it evaluates
# other parameters (checked: resetting best_val after the restore fails on evaluated_params).
# Logged every 40 steps and at every validation (every 20), the checkpoints resumed from (25-35,
# then 20+ steps later) hold part-summed losses: a resume that lost them logs another mean loss
# (checked: zeroing loss_sum fails on loss).
AFTER_STEP = 25


def _interrupt(workdir, sig, after_step=AFTER_STEP):
    """Start a run and send ``sig`` once a checkpoint at ``after_step`` or later exists."""
    proc = _cli(workdir)
    ckpt = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("reference")
    _finish(_cli(workdir))
    best = json.load(open(workdir / "results.json"))["train"]["evaluated_params"]
    assert best.startswith("best validation (step 20,"), (
        f"{best}: the interrupted runs resume after step 20 and test its restore only if step 20's "
        "validation stays the best; move AFTER_STEP past the reference run's best step"
    )
    return workdir


def test_every_metrics_line_carries_the_training_metrics(reference):
    """DESIGN's contract: each line has step, loss, accuracy, steps_per_sec and wall_s. A
    validation at a step that is not a logging step (every 20 here, logging every 40) logs then
    too, instead of writing a line with the validation accuracy alone."""
    lines = [json.loads(x) for x in open(reference / "metrics.jsonl")]
    assert [m["step"] for m in lines] == list(range(20, 121, 20))
    for m in lines:
        assert {"step", "loss", "accuracy", "steps_per_sec", "wall_s", "val_accuracy"} <= set(m)
        assert np.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1


def _same_run(a, b):
    ra, rb = (json.load(open(d / "results.json")) for d in (a, b))
    for key in ("params_digest", "evaluated_params", "steps", "skipped_steps"):
        assert ra["train"][key] == rb["train"][key], key
    assert ra["eval"] == rb["eval"]
    ma, mb = ([json.loads(x) for x in open(d / "metrics.jsonl")] for d in (a, b))
    for key in ("step", "loss", "val_accuracy"):
        assert [m.get(key) for m in ma] == [m.get(key) for m in mb], key


def _latest_checkpoint(workdir) -> int:
    return max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def test_sigterm_then_sigkill_and_a_torn_checkpoint_write_then_resume_matches(reference, tmp_path):
    """One run stopped twice, as a preempted job is. SIGTERM: it saves a checkpoint and exits
    cleanly. Resumed, it is SIGKILLed at an arbitrary later step (again inside a logging interval,
    after two more validations), and what a kill in the middle of orbax's write leaves is put on
    top (a temporary directory, never renamed, its files truncated). The last rerun ignores the
    torn write, resumes from the last complete checkpoint and ends exactly like the uninterrupted
    run: both resumes restored the parameters, the best validation and the part-summed logs."""
    code, out = _interrupt(tmp_path, signal.SIGTERM)
    assert code == 0, out[-3000:]
    assert "saved checkpoint at step" in out
    assert not (tmp_path / "results.json").exists()
    first = _latest_checkpoint(tmp_path)
    assert first >= AFTER_STEP

    code, out = _interrupt(tmp_path, signal.SIGKILL, after_step=first + 20)
    assert code == -signal.SIGKILL, "the resumed run finished before it could be killed"
    assert f"Resumed from checkpoint at step {first}" in out
    assert not (tmp_path / "results.json").exists()
    latest = _latest_checkpoint(tmp_path)
    assert latest >= first + 20
    ckpt = tmp_path / "checkpoints"
    torn = ckpt / f"{latest + 5}.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpt / str(latest), torn)
    for root, _, files in os.walk(torn):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0" * 3)  # truncated
    out = _finish(_cli(tmp_path))
    assert f"Resumed from checkpoint at step {latest}" in out
    _same_run(reference, tmp_path)


def test_a_signal_while_a_step_logs_is_acted_on_at_the_next_step_with_a_checkpoint(
    tmp_path, data_dir, monkeypatch, capsys
):
    """A SIGTERM that comes after a step's checkpoint decision (here while step 2 is logged;
    logging more often than checkpointing) is acted on at the next step: it saves a checkpoint,
    then exits saying so. It used to exit at once, announcing a checkpoint it never wrote."""
    from mtl_gbml import reporting

    config = load_config(CONFIG, "runlocal")
    config.unlock()
    config.train.steps, config.train.log_every, config.train.eval_every = 6, 1, 0
    config.checkpoint.every = 100
    config.eval.settings = ("5w1s",)

    class SignalWhileLoggingStep2(reporting.MetricsWriter):
        def write(self, record):
            super().write(record)
            if record["step"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "MetricsWriter", SignalWhileLoggingStep2)
    with pytest.raises(SystemExit) as stopped:
        train.train_and_evaluate(config, str(tmp_path))
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "Received signal 15: saved checkpoint at step 3;" in out, out
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert saved == [3]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def _absurd_lr_config(nonfinite):
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    config.optimizer.name, config.optimizer.lr = "sgd", 1e30
    config.train.steps, config.train.log_every, config.checkpoint.every = 6, 3, 3
    config.train.nonfinite = nonfinite
    config.eval.settings = ("5w1s",)
    return config


def test_nonfinite_loss_stops_with_step_and_quantity(tmp_path, data_dir):
    config = _absurd_lr_config("raise")
    config.checkpoint.every = 1
    with pytest.raises(train.NonFiniteError, match=r"non-finite (loss|gradient) at step \d+") as e:
        train.train_and_evaluate(config, str(tmp_path))
    # the step is counted as checkpoints and logs count them: the one before it is the last good
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert bad >= 1 and max(saved, default=0) == bad - 1, (bad, saved)
    # every checkpoint left behind holds finite parameters (none is written after a bad step)
    from mtl_gbml.run_loading import load_run

    if any(d.isdigit() for d in os.listdir(tmp_path / "checkpoints")):
        run = load_run(str(tmp_path), use_best=False)
        import jax

        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(run.params))


def test_nonfinite_steps_can_be_skipped(tmp_path, data_dir):
    results = train.train_and_evaluate(_absurd_lr_config("skip"), str(tmp_path))
    assert results["train"]["skipped_steps"] > 0
    # skipped steps add nothing to the logged means (a NaN added to the sum would show); an
    # interval whose every step was skipped logs no loss (null), not 0
    logs = [m for m in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in m]
    counted = [m for m in logs if m["loss"] is not None]
    assert counted and all(np.isfinite(m["loss"]) for m in counted)
    skipped_all = [m for m in logs if m["loss"] is None]
    assert skipped_all and all(m["accuracy"] is None for m in skipped_all)
    assert np.isfinite(results["eval"]["5way1shot"]["accuracy"])


def test_seeds_fix_episodes_and_accuracy(reference):
    """The same seed gives the same episodes and accuracy, another seed others (on the reference
    run's trained backbone; evaluate_workdir adds only eval_val.json, which _same_run ignores)."""
    from mtl_gbml.evaluate import evaluate_workdir

    run = str(reference)
    a = evaluate_workdir(run, [(5, 1)], episodes=40, split="val", seed=0)["eval"]
    b = evaluate_workdir(run, [(5, 1)], episodes=40, split="val", seed=0)["eval"]
    c = evaluate_workdir(run, [(5, 1)], episodes=40, split="val", seed=1)["eval"]
    assert a == b
    assert a["5way1shot"]["accuracy"] != c["5way1shot"]["accuracy"]


def test_the_test_accuracies_are_those_of_the_best_validation_parameters(reference):
    """results.json's test accuracies, recomputed in this process from the checkpoint with the
    run's own test key, are those of the best-validation parameters (step 20), not the final ones
    (step 120), which give others."""
    import jax

    from mtl_gbml.data import datasets
    from mtl_gbml.evaluation import evaluate, parse_setting
    from mtl_gbml.run_loading import load_run

    saved = json.load(open(reference / "results.json"))["eval"]
    best, final = load_run(str(reference)), load_run(str(reference), use_best=False)
    assert best.which == "best validation (step 20)" and final.step == 120
    c = best.config
    k_test = jax.random.split(jax.random.PRNGKey(c.seed), 4)[
        3
    ]  # train.py's (init, train, val, test)
    pool = datasets.load_pool(c.data, c.eval.split)

    def accuracies(run):
        res = evaluate(
            run.algorithm,
            run.params,
            run.state,
            pool,
            [parse_setting(s) for s in c.eval.settings],
            episodes=c.eval.episodes,
            queries=c.eval.queries,
            batch=c.eval.batch,
            rng=k_test,
            bn_mode=c.model.bn_mode,
        )
        return {k: v["accuracy"] for k, v in res.items()}

    assert accuracies(best) == {k: v["accuracy"] for k, v in saved.items()}
    assert accuracies(final) != accuracies(best)
