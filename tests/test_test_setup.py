"""The suite's own set-up (tests/conftest.py): the pytest processes compile at XLA:CPU's LLVM
optimisation level 0, the processes they start do not, and both levels compute the same numbers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TEST_XLA_FLAG, subprocess_env

# A Conv4 forward and backward (the MTL step's shape of work, at a small size): loss and the
# gradient's sum of squares per parameter, printed as JSON.
_SCRIPT = """
import json, os, jax, jax.numpy as jnp
from mtl_gbml import models
from mtl_gbml.base_config import get_config
c = get_config("mtl").model
c.width = 16
model = models.build(c)
x = jax.random.normal(jax.random.PRNGKey(0), (24, 28, 28, 1))
params, state = models.init(model, jax.random.PRNGKey(1), x)
def loss(p):
    f, _ = models.forward(model, p, state, x, train=True)
    return jnp.mean(jnp.tanh(f) ** 2)
value, grads = jax.jit(jax.value_and_grad(loss))(params)
print(json.dumps({
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "loss": float(value),
    "grads": [float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads)],
}))
"""


def _run(env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_started_processes_compile_at_the_default_level_and_agree_with_level_0():
    if os.environ.get("MTL_GBML_TEST_FULL_OPT") == "1":
        pytest.skip("MTL_GBML_TEST_FULL_OPT=1: the suite runs at XLA's default level")
    assert TEST_XLA_FLAG in os.environ.get("XLA_FLAGS", "")
    default = _run(subprocess_env(PYTHONPATH=str(ROOT)))
    assert TEST_XLA_FLAG not in default["xla_flags"]
    level0 = _run(dict(os.environ, PYTHONPATH=str(ROOT)))
    assert TEST_XLA_FLAG in level0["xla_flags"]
    # same numbers to float32 rounding (a sum may be ordered differently); the convolutions'
    # biases, which BatchNorm cancels, have gradients of rounding size (1e-15) at both levels
    np.testing.assert_allclose(level0["loss"], default["loss"], rtol=1e-5)
    np.testing.assert_allclose(level0["grads"], default["grads"], rtol=1e-4, atol=1e-10)
    assert sum(g > 1e-5 for g in default["grads"]) >= 10


def test_subprocess_env_keeps_other_flags_and_adds_what_it_is_given(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=3 {TEST_XLA_FLAG}")
    monkeypatch.setenv("_MTL_GBML_TEST_ADDED_XLA_FLAG", "1")
    env = subprocess_env(FOO="bar")
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    assert env["FOO"] == "bar" and "_MTL_GBML_TEST_ADDED_XLA_FLAG" not in env
    monkeypatch.setenv("XLA_FLAGS", TEST_XLA_FLAG)
    assert "XLA_FLAGS" not in subprocess_env()
    # a level the caller chose (no marker) is theirs: left as it is
    monkeypatch.delenv("_MTL_GBML_TEST_ADDED_XLA_FLAG")
    assert subprocess_env()["XLA_FLAGS"] == TEST_XLA_FLAG
