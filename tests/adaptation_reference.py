"""Test-time adaptation written out independently, for the GBML algorithms' tests.

``check_adapt_and_predict`` builds an algorithm on a tiny BatchNorm network, with test-time inner
steps and learning rate that differ from the training ones, and compares its
``adapt_and_predict`` with :func:`reference_logits`: a Python loop of gradient steps on the
support cross-entropy (plus ``lam/2 ||fast - start||^2`` for the proximal methods), from the
meta-parameters, then the query logits under the configured BatchNorm mode. Nothing of
``whole_network`` or the algorithm is used by the reference; only ``models.forward``.
"""

from __future__ import annotations

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_gbml import base_config, models

TRAIN = {"inner_steps": 2, "inner_lr": 0.05}
TEST = {"test_inner_steps": 4, "test_inner_lr": 0.3}


class BatchNormNet(nn.Module):
    """tanh MLP with BatchNorm, the backbone signature of mtl_gbml.models."""

    @nn.compact
    def __call__(self, x, *, train, use_batch_stats):
        x = nn.Dense(6)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not use_batch_stats, momentum=0.9)(x)
        return jnp.tanh(nn.Dense(5)(jnp.tanh(x)))


def _cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def reference_logits(
    model, params, state, sx, sy, qx, ways, *, steps, lr, lam, whole, bn_mode, learned,
    merged=False,
):  # fmt: skip
    """Query logits after ``steps`` plain gradient steps on the support set.

    ``whole``: the backbone is adapted too and the support forward uses batch statistics (written
    as the training forward, which for the models given here, with no dropout, is the test-time
    one: batch statistics, nothing dropped); otherwise the features are fixed, computed under
    ``bn_mode``. ``merged`` with transductive BatchNorm: support and query go through the network
    as one batch, in the inner loop (the loss on the support rows) and for the query logits."""
    joint = merged and bn_mode == "transductive"
    ns, both = sx.shape[0], jnp.concatenate([sx, qx])
    backbone = params["backbone"]
    feats = lambda bb, x, train: models.forward(
        model, bb, state, x, train=train, bn_mode=bn_mode, rng=jax.random.PRNGKey(0)
    )[0]
    dim = feats(backbone, sx, False).shape[-1]
    if learned:
        head = {"w": params["head"]["w"][:ways], "b": params["head"]["b"][:ways]}
    else:
        head = {"w": jnp.zeros((ways, dim)), "b": jnp.zeros((ways,))}
    fast = {"backbone": backbone, "head": head} if whole else {"head": head}
    start = fast
    fixed_support = None if whole else feats(backbone, sx, False)

    def support_loss(f):
        if joint:
            fs = feats(f["backbone"] if whole else backbone, both, True)[:ns]
        else:
            fs = feats(f["backbone"], sx, True) if whole else fixed_support
        return _cross_entropy(fs @ f["head"]["w"].T + f["head"]["b"], sy)

    for _ in range(steps):
        g = jax.grad(support_loss)(fast)
        if lam:
            g = jax.tree.map(lambda gi, f, s: gi + lam * (f - s), g, fast, start)
        fast = jax.tree.map(lambda f, gi: f - lr * gi, fast, g)
    if joint:
        fq = feats(fast["backbone"] if whole else backbone, both, False)[ns:]
    else:
        fq = feats(fast["backbone"] if whole else backbone, qx, False)
    return fq @ fast["head"]["w"].T + fast["head"]["b"]


def check_adapt_and_predict(
    algorithm: str, *, whole: bool, lam: float = 0.0, merged: bool = False
) -> None:
    """For both head starts and both BatchNorm modes: ``adapt_and_predict`` equals the reference
    with the test-time settings, and differs from it with the training settings, with no
    proximal term (when ``lam``), under the other BatchNorm mode, and transductively with the other
    batching of support and query (``merged``; so each setting is seen)."""
    build = importlib.import_module(f"mtl_gbml.algorithms.{algorithm}").build
    rng = np.random.default_rng(0)
    train_ways, ways = 5, 3
    sx = jnp.asarray(rng.normal(size=(ways * 2, 4, 4, 1)), jnp.float32)
    qx = jnp.asarray(0.5 + 2.0 * rng.normal(size=(ways * 3, 4, 4, 1)), jnp.float32)
    sy = jnp.repeat(jnp.arange(ways), 2)
    for learned in (False, True):
        results = {}
        for bn_mode in ("inductive", "transductive"):
            config = base_config.get_config(algorithm)
            config.data.ways = train_ways
            config.model.bn_mode = bn_mode
            config.algo.head_init = "learned" if learned else "zeros"
            for k, v in {**TRAIN, **TEST}.items():
                config.algo[k] = v
            if lam:
                config.algo.lam = lam
            algo = build(BatchNormNet(), config, 10)
            params, state = models.init(BatchNormNet(), jax.random.PRNGKey(1), sx)
            params = {"backbone": params}
            if learned:  # distinct rows: a wrong slice of the meta-learned head shows
                w = rng.normal(size=(train_ways, 5))
                params["head"] = {"w": jnp.asarray(w, jnp.float32), "b": jnp.arange(5.0) / 5}
            state = jax.tree.map(lambda s: s + 0.3, state)  # running statistics != batch's
            got = np.asarray(algo.adapt_and_predict(params, state, sx, sy, qx, ways))
            reference = functools.partial(
                reference_logits,
                BatchNormNet(),
                params,
                state,
                sx,
                sy,
                qx,
                ways,
                whole=whole,
                bn_mode=bn_mode,
                learned=learned,
                merged=merged,
            )

            def ref(steps, lr, lam_, reference=reference):
                return np.asarray(reference(steps=steps, lr=lr, lam=lam_))

            want = ref(TEST["test_inner_steps"], TEST["test_inner_lr"], lam)
            where = f"{algorithm}, head {'learned' if learned else 'zeros'}, {bn_mode}"
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=where)
            assert not np.allclose(got, ref(TRAIN["inner_steps"], TRAIN["inner_lr"], lam)), where
            if lam:
                assert not np.allclose(got, ref(TEST["test_inner_steps"], TEST["test_inner_lr"], 0))
            if bn_mode == "transductive":
                other = reference(
                    steps=TEST["test_inner_steps"], lr=TEST["test_inner_lr"], lam=lam,
                    merged=not merged,
                )  # fmt: skip
                assert not np.allclose(got, np.asarray(other)), where
            results[bn_mode] = got
        assert not np.allclose(results["inductive"], results["transductive"])
