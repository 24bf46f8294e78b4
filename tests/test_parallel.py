"""Data parallelism over tasks: 8 fake CPU devices, 2 processes (gloo) and 1 device train alike.

Every run is a ``python -m mtl_gbml.train`` subprocess (the device count is fixed when jax starts):
the final parameters are read back from the checkpoints with ``load_run`` and the logged losses
from metrics.jsonl, then compared with the 1-device run of the same config and global task batch.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, subprocess_env

CONFIG = "configs/omniglot/mtl.py:runlocal"
# 8 tasks split over 1, 2, 4 or 8 devices; no validation, and the final evaluation at 5w1s only
# (the tests compare training; runlocal's second setting, 20w1s, cost ~5 s of each run).
# Plain SGD with a small rate, not Adam: Adam's first updates are about lr * g / |g| elementwise,
# so a gradient that is pure rounding noise (the conv biases before BatchNorm have gradient 0 in
# exact arithmetic) moves by up to lr whatever the reduction order. Measured (1 vs 8 devices,
# this config): step-1 losses equal, parameters within 4e-5 after one step and 1e-4 after three,
# losses within 3e-5 relative.
COMMON = (
    "--config.data.tasks_per_step=8",
    "--config.optimizer.name=sgd",
    "--config.optimizer.lr=0.01",
    "--config.optimizer.momentum=0.0",
    "--config.train.steps=3",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.checkpoint.every=3",
    "--config.eval.episodes=20",
    "--config.eval.settings=('5w1s',)",
)


def _env(devices: int) -> dict:
    env = subprocess_env(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cmd(workdir, *overrides) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mtl_gbml.train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _train(workdir, devices: int, *overrides) -> None:
    r = subprocess.run(
        _cmd(workdir, *COMMON, *overrides),
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def _final(workdir):
    from mtl_gbml.run_loading import load_run

    run = load_run(str(workdir), use_best=False)
    # no validation ran (eval_every=0): the default, best-validation parameters, falls back to these
    default = load_run(str(workdir))
    assert default.which == "final" and default.step == run.step
    assert all(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), default.params, run.params)
        )
    )
    losses = [json.loads(x)["loss"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    results = json.load(open(os.path.join(workdir, "results.json")))
    return run, losses, results


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def _assert_same_training(ref, other):
    run_a, loss_a, res_a = ref
    run_b, loss_b, res_b = other
    assert run_a.step == run_b.step == 3
    assert jax.tree.structure(run_a.params) == jax.tree.structure(run_b.params)
    diff = _max_diff(run_a.params, run_b.params)
    state_diff = _max_diff(run_a.state, run_b.state)
    print(f"max |param diff| {diff:.3g}, max |BatchNorm state diff| {state_diff:.3g}")
    assert diff < 5e-4 and state_diff < 5e-4
    np.testing.assert_allclose(loss_a[0], loss_b[0], rtol=1e-6)  # same batch, same parameters
    np.testing.assert_allclose(loss_a, loss_b, rtol=2e-4)
    assert len(loss_a) == 3
    return res_b


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("one_device")
    _train(workdir, 1)
    out = _final(workdir)
    assert out[2]["devices"] == 1 and out[2]["processes"] == 1
    return out


def test_eight_devices_match_one(one_device, tmp_path):
    _train(tmp_path, 8)
    res = _assert_same_training(one_device, _final(tmp_path))
    assert res["devices"] == 8 and res["processes"] == 1


def test_sharded_head_on_eight_devices_matches_one(one_device, tmp_path):
    _train(tmp_path, 8, "--config.parallel.shard_head=True")
    _assert_same_training(one_device, _final(tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(one_device, tmp_path):
    """2 processes x 2 devices on 127.0.0.1 (CPU collectives through gloo).

    Once (session 1) the 2-process run logged a different step-1 loss (1.8151 against 2.0743) and
    was marked xfail; it has not recurred since: it passed in every run of sessions 2 and 3
    (parameters within 5e-8 after 3 steps), so it is a plain test again and fails if it recurs.
    """
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path,
                *COMMON,
                f"--config.parallel.coordinator=127.0.0.1:{port}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={i}",
            ),
            cwd=ROOT,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # on a failure, both processes' output: the one that failed first may not be process 0 (a
    # CI run once aborted process 0 at XLA's shutdown barrier, with process 1's error unshown)
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(
        f"--- process {i} (exit {c}) ---\n{out[-3000:]}"
        for i, (c, out) in enumerate(zip(codes, outs, strict=True))
    )
    res = _assert_same_training(one_device, _final(tmp_path))
    assert res["devices"] == 4 and res["processes"] == 2
    # only process 0 reports
    assert "| 5way1shot |" in outs[0] and "| 5way1shot |" not in outs[1]


def test_cli_on_four_devices_records_them(tmp_path, data_dir):
    """The issue's command, unchanged: runlocal on 4 fake devices writes devices=4."""
    r = subprocess.run(
        _cmd(tmp_path),
        cwd=ROOT,
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.load(open(tmp_path / "results.json"))
    assert res["devices"] == 4 and res["processes"] == 1


def test_state_shardings_split_only_the_head():
    from jax.sharding import PartitionSpec

    from mtl_gbml import parallel

    mesh = parallel.make_mesh()
    tree = {"params": {"head": np.zeros((8, 3)), "conv": np.zeros((3, 3))}, "step": np.zeros(())}
    sh = parallel.state_shardings(tree, mesh, shard_head=True)
    assert sh["params"]["head"].spec == PartitionSpec("data", None)
    assert sh["params"]["conv"].spec == PartitionSpec() and sh["step"].spec == PartitionSpec()
    sh = parallel.state_shardings(tree, mesh, shard_head=False)
    assert sh["params"]["head"].spec == PartitionSpec()


def test_a_head_that_does_not_split_evenly_stays_replicated_and_says_so(capsys):
    """Sharding decisions over 3 devices (one CPU device listed three times: the shardings are
    only built, never used): 9 head rows split, 7 stay replicated with a message naming the
    counts; 1-d head leaves and 2-d leaves outside a head are replicated whatever their size."""
    from jax.sharding import Mesh, PartitionSpec

    from mtl_gbml import parallel

    mesh = Mesh(np.array([jax.devices()[0]] * 3), (parallel.AXIS,))
    tree = {
        "params": {"head": np.zeros((7, 4)), "conv": np.zeros((9, 4))},
        "mu": {"head": np.zeros((9, 4)), "bias": {"head": np.zeros((9,))}},
    }
    sh = parallel.state_shardings(tree, mesh, shard_head=True)
    assert sh["mu"]["head"].spec == PartitionSpec("data", None)
    assert sh["params"]["head"].spec == PartitionSpec()
    assert sh["params"]["conv"].spec == PartitionSpec()
    assert sh["mu"]["bias"]["head"].spec == PartitionSpec()
    out = capsys.readouterr().out
    assert "7 head rows do not split evenly over 3 devices" in out
