"""End to end through the CLI pieces: run contract, one compilation, exact resume, API, errors."""

import collections
import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_config, subprocess_env

from mtl_gbml import train
from mtl_gbml.config_validation import ConfigError, validate

CONFIG = "configs/omniglot/mtl.py"


class _Compiles(logging.Handler):
    """Counts XLA compilations per jitted function name (``jax.log_compiles`` messages)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.counts = collections.Counter()

    def emit(self, record):
        m = re.match(r"Compiling (\w+) ", record.getMessage())
        if m:
            self.counts[m.group(1)] += 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = load_config(CONFIG, "runlocal")
    counter, log = _Compiles(), logging.getLogger("jax")
    log.addHandler(counter)
    try:
        with jax.log_compiles(True):
            results = train.train_and_evaluate(config, workdir)
    finally:
        log.removeHandler(counter)
    results["_compiles"] = counter.counts
    return workdir, results


def test_run_leaves_the_contract_files(finished_run):
    workdir, results = finished_run
    for f in ("config.json", "checkpoints", "metrics.jsonl", "results.json", "results.md"):
        assert os.path.exists(os.path.join(workdir, f)), f
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["algorithm"] == "mtl" and saved["bn_mode"] == "inductive"
    assert saved["devices"] == jax.device_count() and saved["processes"] == 1
    assert saved["train"]["steps"] == 4 and len(saved["train"]["params_digest"]) == 64
    for k in ("5way1shot", "20way1shot"):
        e = saved["eval"][k]
        assert 0 <= e["accuracy"] <= 100 and e["ci95"] > 0 and e["episodes"] == 40
        assert e["split"] == "test"
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4]
    assert {"loss", "accuracy", "steps_per_sec", "wall_s", "val_accuracy"} <= set(lines[0])
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_rerun_resumes_and_changes_nothing(finished_run):
    workdir, results = finished_run
    again = train.train_and_evaluate(load_config(CONFIG, "runlocal"), workdir)
    assert again["train"]["params_digest"] == results["train"]["params_digest"]
    assert again["eval"] == results["eval"]


def _metrics(workdir) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def per_step_run(tmp_path_factory, data_dir):
    """The runlocal run again, logged after every step and validated on 3w1s too: each step's
    own loss and accuracy, and what the extra validation setting changes (nothing else)."""
    workdir = str(tmp_path_factory.mktemp("per_step"))
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    config.train.val_extra_settings = ("3w1s",)
    config.train.log_every = 1
    return workdir, train.train_and_evaluate(config, workdir)


def test_logged_loss_and_accuracy_are_means_over_the_steps_since_the_last_log(
    finished_run, per_step_run
):
    """runlocal logs every 2 steps: each logged loss and accuracy is the mean of the two steps'
    own values, which the run logged after every step reports one by one."""
    base, each = _metrics(finished_run[0]), _metrics(per_step_run[0])
    assert [x["step"] for x in each] == [1, 2, 3, 4]
    for key in ("loss", "accuracy"):
        means = [(each[i][key] + each[i + 1][key]) / 2 for i in (0, 2)]
        assert [x[key] for x in base] == pytest.approx(means, rel=1e-6), key
        assert len({x[key] for x in each}) == 4, key  # four different steps, not one repeated


def test_extra_validation_settings_are_logged_and_change_nothing_else(finished_run, per_step_run):
    """train.val_extra_settings adds val_accuracy_<setting> beside val_accuracy; the primary
    validation episodes, the chosen parameters and the test results equal a run without them
    (that run also logs every step, which changes nothing it is compared on either)."""
    workdir, results = finished_run
    base = _metrics(workdir)
    lines = [x for x in _metrics(per_step_run[0]) if "val_accuracy" in x]
    extra = per_step_run[1]
    assert [x["step"] for x in lines] == [2, 4]
    assert [x["val_accuracy"] for x in lines] == [x["val_accuracy"] for x in base]
    assert all(0 <= x["val_accuracy_3w1s"] <= 100 for x in lines)
    assert not any("val_accuracy_3w1s" in x for x in base)
    assert extra["train"]["params_digest"] == results["train"]["params_digest"]
    assert extra["eval"] == results["eval"]
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    config.train.val_extra_settings = ("3w",)
    with pytest.raises(ConfigError, match="3w"):
        validate(config)


def test_resume_with_a_different_config_is_refused(finished_run):
    workdir, _ = finished_run
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    config.optimizer.lr = 0.5
    with pytest.raises(ConfigError, match="optimizer.lr"):
        train.train_and_evaluate(config, workdir)


def _saved(config) -> dict:
    return json.loads(config.to_json_best_effort())


def test_config_differences_compare_keys_missing_from_a_saved_config_at_their_old_values():
    """A run saved before iMAML's CG damping keys existed ran undamped: resuming it with the
    damped defaults is a difference, resuming with both at 0 is not. A missing key with no
    recorded old value is a difference; parallel keys never are, nor eval keys that validation
    does not read."""
    config = load_config("configs/omniglot/imaml.py")
    old = _saved(config)
    del old["algo"]["cg_damping"], old["algo"]["lam_damping"]
    diffs = train.config_differences(old, _saved(config))
    assert [d.split(":")[0] for d in diffs] == ["algo.cg_damping", "algo.lam_damping"]
    assert "0.0 (the code's value before the key existed) -> 1.0" in diffs[0]
    config.unlock()
    config.algo.cg_damping = config.algo.lam_damping = 0.0
    assert train.config_differences(old, _saved(config)) == []

    old = _saved(config)
    del old["train"]["val_extra_settings"]  # [] before the key: the default, no difference
    old["eval"]["episodes"] += 1
    old["parallel"]["shard_head"] = not old["parallel"]["shard_head"]
    assert train.config_differences(old, _saved(config)) == []
    del old["algo"]["cg_steps"]  # never optional: its old value is unknown
    assert train.config_differences(old, _saved(config)) == [
        f"algo.cg_steps: not in the saved config (added since; its old value unknown), now "
        f"{config.algo.cg_steps!r}"
    ]
    old = _saved(config)
    old["algo"]["retired_key"] = 3
    assert train.config_differences(old, _saved(config)) == [
        "algo.retired_key: 3 in the saved config, no longer a key"
    ]


@pytest.mark.parametrize("key", ["queries", "logreg_c", "logreg_steps", "logreg_tol"])
def test_eval_keys_that_validation_reads_are_compared_when_the_run_validates(key):
    """Validation picks the best parameters, which the test evaluation uses; it reads these eval
    keys (the queries, MTL's head), so resuming with another value mixes two selections. Without
    validation they change only the final evaluation; eval.batch changes no accuracy at all."""
    config = load_config(CONFIG, "runlocal")
    assert config.train.eval_every > 0
    old = _saved(config)
    old["eval"][key] = old["eval"][key] * 2
    diffs = train.config_differences(old, _saved(config))
    assert [d.split(":")[0] for d in diffs] == [f"eval.{key}"]
    old["eval"]["batch"] += 1
    assert train.config_differences(old, _saved(config)) == diffs
    config.unlock()
    config.train.eval_every = old["train"]["eval_every"] = 0
    assert train.config_differences(old, _saved(config)) == []


def test_keys_that_change_no_result_may_change_on_resume():
    """Where the data lives (a run moved to another machine), how many checkpoints are kept and
    the total time budget (a budget-stopped run given more time) change nothing trained."""
    config = load_config(CONFIG, "runlocal")
    old = _saved(config)
    old["data"]["data_dir"], old["data"]["tfds_dir"] = "/elsewhere/raw", "/elsewhere/tfds"
    old["checkpoint"]["keep"] += 2
    old["train"]["time_budget_s"] = 60.0
    assert train.config_differences(old, _saved(config)) == []


def test_a_workdir_without_a_checkpoint_takes_a_new_config(tmp_path):
    """A run stopped before its first checkpoint left config.json and nothing to resume: rerun
    with another config, it starts afresh with that config. Once a checkpoint exists, it refuses."""
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    train._check_config_matches(str(tmp_path), config)
    config.optimizer.lr *= 2
    train._check_config_matches(str(tmp_path), config)
    assert json.load(open(tmp_path / "config.json"))["optimizer"]["lr"] == config.optimizer.lr
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    config.optimizer.lr *= 2
    with pytest.raises(ConfigError, match="optimizer.lr"):
        train._check_config_matches(str(tmp_path), config)


def test_an_accuracy_equal_to_the_stored_best_is_not_an_improvement():
    """The best validation accuracy is kept in float32; 29.57 rounds down there, and the same
    accuracy measured again must not move the best step."""
    stored = np.float32(29.57)
    assert float(stored) < 29.57  # the case: float32 rounded it down
    assert not train.improves(29.57, stored)
    assert train.improves(29.58, stored) and not train.improves(29.56, stored)
    assert train.improves(0.0, np.float32(-1.0))  # the first validation always counts


def test_resume_of_a_run_saved_without_a_new_key_is_refused_and_names_it(tmp_path):
    config = load_config("configs/omniglot/imaml.py")
    old = _saved(config)
    del old["algo"]["lam_damping"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)  # a run with something to resume
    with pytest.raises(ConfigError, match=r"algo\.lam_damping: 0\.0 .* -> 10\.0"):
        train._check_config_matches(str(tmp_path), config)
    assert json.loads((tmp_path / "config.json").read_text()) == old  # the saved config is kept


def test_every_config_key_is_known_or_has_its_old_value():
    """A key added to an algorithm's config must come with ``train.LEGACY_VALUES``: the value the
    code used before it, so runs saved without it resume only under the same settings.
    ``tests/config_keys.json`` holds the keys as of 2026-12-03 (all entries checked in git
    history then); a key in neither fails here."""
    from mtl_gbml import algorithms, base_config

    known = json.load(open(ROOT / "tests" / "config_keys.json"))
    assert set(known) == set(algorithms.NAMES)
    for name in algorithms.NAMES:
        keys = set(train._flatten(_saved(base_config.get_config(name))))
        new = {
            k for k in keys - set(known[name]) if k.split(".")[0] not in train._UNCHECKED_SECTIONS
        }
        assert new <= set(train.LEGACY_VALUES), (
            f"{name}: config keys {sorted(new - set(train.LEGACY_VALUES))} are new; add each to "
            "train.LEGACY_VALUES with the value the code used before it"
        )


def test_a_run_compiles_each_program_once(finished_run):
    """4 steps with a log and a validation after steps 2 and 4, which replace bookkeeping scalars
    of the state: the step must not recompile for them (it did when they were uncommitted), nor
    the evaluator for new parameters (it did, when they were constants of a program built per
    validation). Embedding: the val and the test split; episodes: val 5w1s, test 5w1s and 20w1s."""
    compiles = finished_run[1]["_compiles"]
    assert compiles["step"] == 1
    assert compiles["_embed_classes"] == 2
    assert compiles["_cached_batch"] == 3


def test_time_budget_stops_after_the_crossing_step_and_a_rerun_only_evaluates(
    tmp_path, data_dir, capsys, per_step_run
):
    """train.time_budget_s (the time-to-accuracy benchmark's equal budget): the step that crosses
    it is the last, logged, validated and checkpointed. The first step's compilation alone
    crosses a budget of 1 us, so the run stops at step 1 of 4. Rerun with the budget spent, it
    restores step 1 and evaluates only: same parameters, same test accuracies. Its log covers one
    step of a 2-step logging interval: the mean over the steps taken, step 1's own values."""
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    config.train.time_budget_s = 1e-6
    config.eval.settings = ("5w1s",)
    first = train.train_and_evaluate(config, str(tmp_path))
    assert "Time budget train.time_budget_s=1e-06 reached at step 1." in capsys.readouterr().out
    assert (first["train"]["steps"], first["train"]["planned_steps"]) == (1, 4)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1] and "val_accuracy" in lines[0]
    step1 = _metrics(per_step_run[0])[0]
    assert (lines[0]["loss"], lines[0]["accuracy"]) == (step1["loss"], step1["accuracy"])
    assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["1"]
    again = train.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "Resumed from checkpoint at step 1" in out and "reached at step" not in out
    assert again["train"]["steps"] == 1
    assert again["train"]["params_digest"] == first["train"]["params_digest"]
    assert again["eval"] == first["eval"]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1]
    # step 1 is validated, so it is the best: the best-validation copy is that step's parameters
    # and BatchNorm statistics (a best state left at its initial copy would differ)
    from mtl_gbml.run_loading import load_run

    best, final = load_run(str(tmp_path)), load_run(str(tmp_path), use_best=False)
    assert best.which == "best validation (step 1)" and final.which == "final"
    for a, b in ((best.params, final.params), (best.state, final.state)):
        assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_train_step_compiles_once(data_dir):
    from mtl_gbml import algorithms, models, optim
    from mtl_gbml.data import datasets
    from mtl_gbml.data.sampler import prepare_tasks, sample_tasks

    config = load_config(CONFIG, "runlocal")
    pool = datasets.load_pool(config.data, "train")
    algo = algorithms.build("mtl", models.build(config.model), config, pool.num_classes)
    tx = optim.make(config.optimizer, 10)
    key = jax.random.PRNGKey(0)
    ex = prepare_tasks(sample_tasks(pool, key, 5, 1, 2, 1), key, "none", 0)
    params, state = algo.init(key, ex)
    ts = train.initial_state(params, state, tx.init(params))
    mesh = train.make_mesh()
    ts = jax.device_put(ts, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = train.make_train_step(algo, tx, config, mesh)
    for _ in range(3):
        ts = step(ts, pool, key)
    assert int(ts.step) == 3
    assert step._cache_size() == 1


def test_fewshot_learner_api_and_evaluate_cli(finished_run, data_dir):
    from mtl_gbml.api import FewShotLearner
    from mtl_gbml.evaluate import evaluate_workdir

    workdir, _ = finished_run
    learner = FewShotLearner.from_workdir(workdir)
    rng = np.random.default_rng(0)
    # raw-format images (any size, dark strokes on white): two very different "classes"
    blank = np.full((105, 105), 255, np.uint8)
    a, b = blank.copy(), blank.copy()
    a[20:85, 45:60] = 0  # a vertical bar
    b[45:60, 20:85] = 0  # a horizontal bar
    noisy = lambda im: np.clip(im.astype(int) + rng.integers(-20, 20, im.shape), 0, 255).astype(
        np.uint8
    )
    pred = learner.predict([a, b], ["bar|", "bar-"], [noisy(a), noisy(b), noisy(a)])
    assert list(pred) == ["bar|", "bar-", "bar|"]
    assert learner.logits([a, b], [3, 7], [a]).shape == (1, 2)
    with pytest.raises(ValueError, match="at least two classes"):
        learner.predict([a, b], ["bar|", "bar|"], [a])
    # by default the CLI evaluates the run's own test episodes: results.json again
    saved = json.load(open(os.path.join(workdir, "results.json")))["eval"]
    again = evaluate_workdir(workdir)["eval"]
    assert {k: v["accuracy"] for k, v in again.items()} == {
        k: v["accuracy"] for k, v in saved.items()
    }
    out = evaluate_workdir(workdir, settings=[(5, 1)], episodes=30, split="val", seed=0)
    assert out["eval"]["5way1shot"]["episodes"] == 30 and out["split"] == "val"
    # with a seed, the CLI's evaluation is evaluate() on the split it names, with PRNGKey(seed)
    from mtl_gbml.data import datasets
    from mtl_gbml.evaluation import evaluate
    from mtl_gbml.run_loading import load_run

    run = load_run(workdir)
    c = run.config
    direct = evaluate(
        run.algorithm, run.params, run.state, datasets.load_pool(c.data, "val"), [(5, 1)],
        episodes=30, queries=c.eval.queries, batch=c.eval.batch, rng=jax.random.PRNGKey(0),
        bn_mode=c.model.bn_mode,
    )  # fmt: skip
    assert out["eval"] == direct
    assert os.path.exists(os.path.join(workdir, "eval_val.json"))
    # --queries reaches the episodes; --episodes 0 is refused, not read as "the default"
    fewer = evaluate_workdir(workdir, [(5, 1)], episodes=30, split="val", seed=0, queries=2)
    assert fewer["eval"] == evaluate(
        run.algorithm, run.params, run.state, datasets.load_pool(c.data, "val"), [(5, 1)],
        episodes=30, queries=2, batch=c.eval.batch, rng=jax.random.PRNGKey(0),
        bn_mode=c.model.bn_mode,
    )  # fmt: skip
    assert fewer["eval"] != out["eval"]
    with pytest.raises(ValueError, match="episodes=0"):
        evaluate_workdir(workdir, [(5, 1)], episodes=0, split="val")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("data.ways", 5000, "data.ways=5000 but split 'train' has 4112 classes"),
        ("data.queries", 25, "lower data.queries"),
        ("algorithm", "mamll", "did you mean 'maml'"),
        ("model.name", "conv5", "model.name='conv5' is unknown"),
        ("train.steps", 0, "train.steps=0 must be positive"),
        ("optimizer.lr", -1.0, "optimizer.lr=-1.0 must be positive"),
        ("data.name", "omniglott", "did you mean 'omniglot'"),
        ("eval.settings", ("5w1s", "5way"), "'<ways>w<shots>s'"),
        ("model.bn_mode", "both", "model.bn_mode='both'"),
        ("eval.logreg_tol", -1e-5, "eval.logreg_tol=-1e-05 must be >= 0"),
        ("eval.logreg_steps", 0, "eval.logreg_steps=0 must be positive"),
        ("model.chunk_first", -2, "model.chunk_first=-2: use -1"),
        ("eval.settings", ("5000w1s",), "5000 ways but split 'test' has"),
        ("eval.queries", 20, r"1 shots \+ eval.queries=20 exceed the 20 images"),
        ("eval.queries", 0, "eval.queries > 0"),
        ("eval.split", "nope", "eval.split='nope'"),
        ("train.val_split", "nope", "train.val_split='nope' does not exist"),
        ("train.nonfinite", "ignore", "choose 'raise' or 'skip'"),
    ],
)
def test_bad_configs_fail_before_compiling(key, value, message):
    config = load_config(CONFIG, "runlocal")
    config.unlock()
    sec, k = key.split(".") if "." in key else (None, key)
    if sec:
        config[sec][k] = value
    else:
        config[k] = value
    with pytest.raises((ConfigError, ValueError), match=message):
        validate(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("solver_tol", -1e-6, r"algo.solver_tol=-1e-06 must be >= 0 \(0: always"),
        ("solver_steps", 0, "algo.solver_steps=0 must be >= 1"),
    ],
)
def test_bad_metaoptnet_solver_settings_fail_before_compiling(key, value, message):
    config = load_config("configs/omniglot/metaoptnet.py", "runlocal")
    validate(config)
    config.unlock()
    config.algo[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_tasks_vmapped_must_divide_the_tasks_of_a_step():
    config = load_config("configs/omniglot/maml.py", "runlocal")
    config.unlock()
    config.algo.tasks_vmapped = config.data.tasks_per_step + 1
    with pytest.raises(ConfigError, match="must be 0 .all tasks. or a divisor"):
        validate(config)
    config.algo.tasks_vmapped = config.data.tasks_per_step
    validate(config)


def test_unknown_override_key_is_refused_with_a_suggestion(tmp_path):
    env = subprocess_env(PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtl_gbml.train",
            f"--config={CONFIG}:runlocal",
            f"--workdir={tmp_path}",
            "--config.train.stesp=3",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert "stesp" in r.stderr and "steps" in r.stderr
    assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.parametrize(
    "keep_classes, keep_images, message",
    [
        (None, 2, r"data.shots \+ data.queries = 3 but the smallest class .* has 2 images"),
        (1, None, r"data.ways=5 but the prepared omniglot/vinyals train split has 4 classes"),
    ],
)
def test_a_truncated_train_split_fails_before_compiling(
    tmp_path, monkeypatch, data_dir, keep_classes, keep_images, message
):
    """Config validation knows the published split sizes; the split a run loads may be a
    truncated copy. Too few images in a class (the sampler would fill the missing slots with
    another class's images) or too few classes is a DataError before anything compiles."""
    from mtl_gbml.data import datasets
    from mtl_gbml.data.errors import DataError
    from mtl_gbml.data.sampler import make_pool

    config = load_config(CONFIG, "runlocal")
    x, y = datasets.load_arrays(config.data, "train")
    keep = np.zeros(len(y), bool)
    for c in np.unique(y)[:keep_classes]:
        keep[np.flatnonzero(y == c)[:keep_images]] = True
    truncated = make_pool(x[keep], y[keep], rotations=config.data.rotations)
    monkeypatch.setattr(datasets, "load_pool", lambda *a, **k: truncated)

    def no_compile(*args, **kwargs):
        raise AssertionError("the step was built before the data was checked")

    monkeypatch.setattr(train, "make_train_step", no_compile)
    with pytest.raises(DataError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
