"""The jitted train step's bookkeeping, on a toy algorithm whose loss and gradient turn non-finite
at known steps: the first bad step of each kind, the sums and counts behind the logged means, what
``train.nonfinite='skip'`` keeps, and that every step samples its own tasks (``fold_in(key,
step)``), each checked against values worked out by hand or in a Python loop."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtl_gbml import parallel, train
from mtl_gbml.data.sampler import make_pool, sample_tasks

WAYS, SHOTS, QUERIES, TASKS = 3, 1, 2, 2
STEPS = 6


def _config(nonfinite: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = dict(
        ways=WAYS, shots=SHOTS, queries=QUERIES, tasks_per_step=TASKS, augment="none", shift=0
    )
    c.train = dict(nonfinite=nonfinite)
    return c


def _pool():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    return make_pool(rng.integers(0, 255, (40, 4, 4, 1), dtype=np.uint8), labels)


def _toy(bad_grad: bool):
    """loss = w + sqrt(w) (the square root without gradient): w falls by 1 a step under SGD(1)
    from 2.5, so the loss is NaN from step 4 (w = -0.5; steps counted from 1, as logs and
    checkpoints count them) while the gradient stays 1. With ``bad_grad``, + v + 0 * sqrt(|v|):
    v falls 2, 1, 0, so step 3's gradient is NaN (0 * inf) while its loss is finite. The
    'accuracy' is a fingerprint of the step's tasks."""

    def meta_loss(params, model_state, tasks, key):
        w = params["w"]
        loss = w + jnp.sqrt(jax.lax.stop_gradient(w))
        if bad_grad:
            v = params["v"]
            loss = loss + v + 0.0 * jnp.sqrt(jnp.abs(v))
        fingerprint = jnp.mean(tasks.class_ids.astype(jnp.float32) * jnp.arange(1.0, WAYS + 1))
        return loss, ({"accepted": model_state["accepted"] + 1}, {"accuracy": fingerprint})

    return types.SimpleNamespace(meta_loss=meta_loss)


def _run(bad_grad: bool, nonfinite: str):
    pool, key = _pool(), jax.random.PRNGKey(7)
    params = {"w": np.float32(2.5)}
    if bad_grad:
        params["v"] = np.float32(2.0)
    mesh = parallel.make_mesh()
    step = train.make_train_step(_toy(bad_grad), optax.sgd(1.0), _config(nonfinite), mesh)
    opt_state = optax.sgd(1.0).init(params)
    ts = train.initial_state(params, {"accepted": np.int32(0)}, opt_state)
    ts = jax.device_put(ts, parallel.replicated(mesh))
    for _ in range(STEPS):
        ts = step(ts, pool, key)
    return jax.tree.map(np.asarray, ts), pool, key


def _fingerprints(pool, key) -> list[float]:
    """Each step's task fingerprint, sampling as the step documents: fold_in(key, step), split
    in three, the first for the tasks."""
    sample = jax.jit(sample_tasks, static_argnums=(2, 3, 4, 5))
    out = []
    for s in range(STEPS):
        k_sample = jax.random.split(jax.random.fold_in(key, s), 3)[0]
        ids = np.asarray(sample(pool, k_sample, WAYS, SHOTS, QUERIES, TASKS).class_ids)
        out.append(float(np.mean(ids * np.arange(1.0, WAYS + 1))))
    return out


def _loss(w: float) -> float:
    return w + np.sqrt(w)


def test_a_non_finite_loss_is_recorded_at_its_step_and_left_out_of_the_sums():
    ts, pool, key = _run(bad_grad=False, nonfinite="raise")
    assert int(ts.step) == STEPS
    assert int(ts.bad_loss_step) == 4 and int(ts.bad_grad_step) == -1
    assert int(ts.count) == 3 and int(ts.skipped) == STEPS - 3
    np.testing.assert_allclose(ts.loss_sum, _loss(2.5) + _loss(1.5) + _loss(0.5), rtol=1e-6)
    fp = _fingerprints(pool, key)
    assert len(set(fp)) == STEPS  # every step sampled other tasks
    np.testing.assert_allclose(ts.acc_sum, sum(fp[:3]), rtol=1e-6)
    # 'raise' applies every update (train.py stops at the next check): w kept falling
    np.testing.assert_allclose(ts.params["w"], 2.5 - STEPS, rtol=1e-6)
    assert int(ts.model_state["accepted"]) == STEPS


def test_a_non_finite_gradient_is_recorded_at_its_step():
    ts, _, _ = _run(bad_grad=True, nonfinite="raise")
    # step 3: gradient NaN, loss finite; step 4: the NaN parameters make the loss NaN
    assert int(ts.bad_grad_step) == 3 and int(ts.bad_loss_step) == 4
    assert int(ts.count) == 2 and int(ts.skipped) == STEPS - 2
    np.testing.assert_allclose(ts.loss_sum, _loss(2.5) + 2.0 + _loss(1.5) + 1.0, rtol=1e-6)


@pytest.mark.parametrize("bad_grad", [False, True])
def test_skip_keeps_the_state_of_the_last_good_step(bad_grad):
    ts, pool, key = _run(bad_grad=bad_grad, nonfinite="skip")
    good = 2 if bad_grad else 3
    # the first bad step's update is dropped, so every later step meets the same parameters
    assert int(ts.count) == good and int(ts.skipped) == STEPS - good
    np.testing.assert_allclose(ts.params["w"], 2.5 - good, rtol=1e-6)
    if bad_grad:
        assert float(ts.params["v"]) == 0.0
        assert int(ts.bad_grad_step) == 3 and int(ts.bad_loss_step) == -1
    else:
        assert int(ts.bad_loss_step) == 4 and int(ts.bad_grad_step) == -1
    assert int(ts.model_state["accepted"]) == good
    np.testing.assert_allclose(ts.acc_sum, sum(_fingerprints(pool, key)[:good]), rtol=1e-6)
