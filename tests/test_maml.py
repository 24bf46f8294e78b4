"""MAML: second-order meta-gradient against central finite differences (float64, tiny smooth model
with BatchNorm); the vmapped meta-loss against a Python loop over tasks; remat changes nothing;
the runlocal config trains and evaluates."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptation_reference import check_adapt_and_predict

from mtl_gbml import base_config
from mtl_gbml.algorithms import maml
from mtl_gbml.data.sampler import Tasks


class TinyNet(nn.Module):
    """Smooth (tanh) MLP with BatchNorm and the backbone signature of mtl_gbml.models."""

    width: int = 5

    @nn.compact
    def __call__(self, x, *, train, use_batch_stats):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.width)(x)
        x = nn.BatchNorm(use_running_average=not use_batch_stats, momentum=0.9)(x)
        return jnp.tanh(nn.Dense(self.width)(jnp.tanh(x)))


def random_tasks(key, t=2, ways=3, shots=2, queries=2, hw=3):
    ks = jax.random.split(key, 2)
    sx = jax.random.normal(ks[0], (t, ways * shots, hw, hw, 1))
    qx = jax.random.normal(ks[1], (t, ways * queries, hw, hw, 1))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (t, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (t, 1))
    return Tasks(sx, sy, qx, qy, jnp.tile(jnp.arange(ways), (t, 1)))


def make(algorithm="maml", ways=3, **algo):
    config = base_config.get_config(algorithm)
    config.data.ways = ways
    for k, v in algo.items():
        config.algo[k] = v
    return maml.build(TinyNet(), config, 10) if algorithm == "maml" else None, config


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_second_order_gradient_matches_central_differences():
    with jax.experimental.enable_x64():
        algo, _ = make(inner_steps=3, inner_lr=0.5, head_init="learned")
        tasks = jax.tree.map(
            lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
            random_tasks(jax.random.PRNGKey(0)),
        )
        params, state = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), algo.init(jax.random.PRNGKey(1), tasks)
        )  # flax creates float32 parameters even with x64 on
        params = jax.tree.map(lambda p: p + 0.3 * jnp.ones_like(p), params)  # non-zero head
        key = jax.random.PRNGKey(2)
        loss = lambda p: algo.meta_loss(p, state, tasks, key)[0]
        grad = flat(jax.grad(loss)(params))
        leaves, treedef = jax.tree.flatten(params)
        x0 = flat(params)
        sizes = [leaf.size for leaf in leaves]

        def unflat(x):
            out, i = [], 0
            for leaf, n in zip(leaves, sizes, strict=True):
                out.append(jnp.asarray(x[i : i + n]).reshape(leaf.shape))
                i += n
            return jax.tree.unflatten(treedef, out)

        f = jax.jit(lambda x: loss(unflat(x)))
        eps = 1e-6
        idx = np.random.default_rng(0).choice(len(x0), size=25, replace=False)
        fd = []
        for i in idx:
            e = np.zeros_like(x0)
            e[i] = eps
            fd.append((f(x0 + e) - f(x0 - e)) / (2 * eps))
        np.testing.assert_allclose(grad[idx], np.array(fd), rtol=1e-5, atol=1e-9)
        # the second-order terms matter: the first-order gradient is measurably different
        fo, _ = make("maml", inner_steps=3, inner_lr=0.5, head_init="learned")
        fo_algo = maml.build(TinyNet(), _, 10, first_order=True)
        fo_grad = flat(jax.grad(lambda p: fo_algo.meta_loss(p, state, tasks, key)[0])(params))
        assert np.max(np.abs(fo_grad - grad)) > 1e-4 * np.max(np.abs(grad))


def test_map_tasks_keeps_task_order_in_groups():
    from mtl_gbml.algorithms.whole_network import map_tasks

    xs = (jnp.arange(12.0).reshape(6, 2), jnp.arange(6))
    fn = lambda x: (x[0].sum() * 10 + x[1], {"sq": x[0] ** 2})
    ref = jax.vmap(fn)(xs)
    for group in (1, 2, 3, 6):
        out = map_tasks(fn, xs, group)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tasks_vmapped", [0, 1])
def test_vmapped_meta_loss_matches_python_loop_over_tasks(tasks_vmapped):
    algo, _ = make(inner_steps=2, inner_lr=0.3, tasks_vmapped=tasks_vmapped)
    tasks = random_tasks(jax.random.PRNGKey(3), t=3)
    params, state = algo.init(jax.random.PRNGKey(4), tasks)
    f = jax.value_and_grad(algo.meta_loss, has_aux=True)
    (loss, (new_state, m)), grads = f(params, state, tasks, jax.random.PRNGKey(5))
    per = [
        f(params, state, jax.tree.map(lambda a, i=i: a[i : i + 1], tasks), jax.random.PRNGKey(5))
        for i in range(3)
    ]
    np.testing.assert_allclose(loss, np.mean([p[0][0] for p in per]), rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean([p[0][1][1]["accuracy"] for p in per]))
    loop = jax.tree.map(lambda *g: sum(g) / 3, *[p[1] for p in per])
    np.testing.assert_allclose(flat(grads), flat(loop), rtol=1e-4, atol=1e-7)
    loop_state = jax.tree.map(lambda *s: sum(s) / 3, *[p[0][1][0] for p in per])
    np.testing.assert_allclose(flat(new_state), flat(loop_state), rtol=1e-5, atol=1e-7)
    assert not np.allclose(flat(new_state), flat(state))


def test_meta_loss_is_the_unrolled_inner_loop_written_out():
    """The meta-loss and its second-order gradient against a Python loop written here: per task,
    inner_steps plain gradient steps of inner_lr on the support cross-entropy (batch statistics),
    then the query cross-entropy, averaged over tasks, differentiated through by jax.grad.
    test_inner_lr differs from inner_lr, so training with the test-time rate would show."""
    from mtl_gbml import models

    steps, lr = 2, 0.3
    algo, _ = make(inner_steps=steps, inner_lr=lr, test_inner_lr=0.05, head_init="learned")
    tasks = random_tasks(jax.random.PRNGKey(8), t=3)
    params, state = algo.init(jax.random.PRNGKey(9), tasks)
    params["head"] = jax.tree.map(lambda h: h + 0.2, params["head"])  # rows that matter

    def ce(fast, x, y):
        f = models.forward(TinyNet(), fast["backbone"], state, x, train=True)[0]
        logits = f @ fast["head"]["w"].T + fast["head"]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def reference(p):
        losses = []
        for t in range(3):
            fast = {"backbone": p["backbone"], "head": p["head"]}
            for _ in range(steps):
                g = jax.grad(ce)(fast, tasks.support_x[t], tasks.support_y[t])
                fast = jax.tree.map(lambda a, b: a - lr * b, fast, g)
            losses.append(ce(fast, tasks.query_x[t], tasks.query_y[t]))
        return sum(losses) / 3

    key = jax.random.PRNGKey(0)
    loss, grads = jax.value_and_grad(lambda p: algo.meta_loss(p, state, tasks, key)[0])(params)
    want, want_grads = jax.value_and_grad(reference)(params)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(flat(grads), flat(want_grads), rtol=1e-4, atol=1e-6)


def test_remat_gives_the_same_gradient_and_test_time_adapts():
    tasks = random_tasks(jax.random.PRNGKey(6))
    a1, _ = make(inner_steps=3, remat=False)
    a2, _ = make(inner_steps=3, remat=True)
    params, state = a1.init(jax.random.PRNGKey(7), tasks)
    g1 = jax.grad(lambda p: a1.meta_loss(p, state, tasks, jax.random.PRNGKey(0))[0])(params)
    g2 = jax.grad(lambda p: a2.meta_loss(p, state, tasks, jax.random.PRNGKey(0))[0])(params)
    np.testing.assert_allclose(flat(g1), flat(g2), rtol=1e-5, atol=1e-7)
    # zero head: any number of ways at test; adaptation moves the logits away from uniform
    logits = a1.adapt_and_predict(
        params,
        state,
        tasks.support_x[0],
        tasks.support_y[0],
        tasks.query_x[0],
        3,
        jax.random.PRNGKey(0),
    )
    assert logits.shape == (6, 3) and float(jnp.std(logits)) > 0


def run_runlocal(algorithm: str, tmp_path):
    """Train and evaluate configs/omniglot/<algorithm>.py:runlocal end to end."""
    if not os.environ.get("MTL_GBML_DATA_DIR"):
        pytest.fail("MTL_GBML_DATA_DIR must name the data directory (omniglot/, splits/)")
    from mtl_gbml.train import train_and_evaluate

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "omniglot", f"{algorithm}.py")
    spec = importlib.util.spec_from_file_location(f"cfg_{algorithm}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("runlocal")
    results = train_and_evaluate(config, str(tmp_path))
    assert results["algorithm"] == algorithm
    assert results["train"]["steps"] == config.train.steps
    for setting in config.eval.settings:
        ways = int(setting.split("w")[0])
        acc = results["eval"][f"{ways}way1shot"]["accuracy"]
        assert 0.0 <= acc <= 100.0 and np.isfinite(acc)
    return results


def test_runlocal_trains_and_evaluates(tmp_path):
    run_runlocal("maml", tmp_path)


def test_test_time_adaptation_is_a_plain_loop_of_gradient_steps():
    """adapt_and_predict with test_inner_steps/test_inner_lr (not the training ones), for a
    zero and a meta-learned head and both BatchNorm modes, against a Python loop over
    models.forward (tests/adaptation_reference.py)."""
    check_adapt_and_predict("maml", whole=True)
