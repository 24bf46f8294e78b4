"""The frozen-backbone algorithms' shared test-time path (mtl_gbml.algorithms.frozen)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptation_reference import BatchNormNet

from mtl_gbml import algorithms, base_config, models
from mtl_gbml.data.sampler import Tasks


@pytest.mark.parametrize(
    "name, merged", [("protonet", True), ("r2d2", True), ("metaoptnet", True), ("anil", False)]
)
def test_a_transductive_episode_is_batched_as_training_batched_a_task(name, merged):
    """Transductive BatchNorm at test: support and query form one batch for the algorithms that
    train on them as one batch, two batches for ANIL (MAML's inner loop and query pass). The
    reference is the training forward (batch statistics) on those batches; the other batching
    gives other logits, so the check can fail."""
    ways = 3
    config = base_config.get_config(name)
    config.data.ways, config.model.bn_mode = ways, "transductive"
    algo = algorithms.build(name, BatchNormNet(), config, 10)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    sx = jax.random.normal(k1, (2 * ways, 4, 4, 1))
    qx = 1.0 + 2.0 * jax.random.normal(k2, (5 * ways, 4, 4, 1))  # statistics unlike the support's
    sy, qy = jnp.repeat(jnp.arange(ways), 2), jnp.repeat(jnp.arange(ways), 5)
    tasks = Tasks(sx[None], sy[None], qx[None], qy[None], jnp.arange(ways)[None])
    params, state = algo.init(jax.random.PRNGKey(1), tasks)
    state = jax.tree.map(lambda s: s + 0.3, state)  # running statistics != any batch's
    got = np.asarray(algo.adapt_and_predict(params, state, sx, sy, qx, ways))

    def train_features(x):
        f, _ = models.forward(
            BatchNormNet(), params["backbone"], state, x, train=True, rng=jax.random.PRNGKey(2)
        )
        return f

    one = train_features(jnp.concatenate([sx, qx]))
    batchings = {
        True: (one[: len(sx)], one[len(sx) :]),
        False: (train_features(sx), train_features(qx)),
    }
    logits = {
        m: np.asarray(algo.predict_from_features(params, sf, sy, qf, ways))
        for m, (sf, qf) in batchings.items()
    }
    np.testing.assert_allclose(got, logits[merged], rtol=1e-4, atol=1e-5)
    assert np.abs(got - logits[not merged]).max() > 1e-2


def test_smoothed_cross_entropy_is_metaoptnets():
    """MetaOptNet's train.py targets: 1 - eps on the label, eps / (ways - 1) on the others
    (written out in numpy); eps = 0 is the plain cross-entropy."""
    from mtl_gbml.algorithms.base import cross_entropy
    from mtl_gbml.algorithms.frozen import smoothed_cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)) * 3
    labels = rng.integers(0, 5, 7)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    for eps in (0.0, 0.1, 0.5):
        want = np.mean(
            [
                -sum(((1 - eps) if k == labels[i] else eps / 4) * logp[i, k] for k in range(5))
                for i in range(7)
            ]
        )
        got = smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps)
        assert float(got) == pytest.approx(want, rel=1e-5)
    plain = cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert float(smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.0)) == float(
        plain
    )


@pytest.mark.parametrize("name", ["protonet", "r2d2", "metaoptnet"])
def test_label_smoothing_is_the_training_loss(name):
    """algo.label_smoothing changes the meta-loss to the smoothed one, task by task: a Python loop
    over the tasks with the numpy-written targets on the head's query logits."""
    ways, eps = 3, 0.2
    config = base_config.get_config(name)
    config.data.ways, config.algo.label_smoothing = ways, eps
    algo = algorithms.build(name, BatchNormNet(), config, 10)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    sx = jax.random.normal(k1, (2, 2 * ways, 4, 4, 1))
    qx = jax.random.normal(k2, (2, 4 * ways, 4, 4, 1))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), 2), (2, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), 4), (2, 1))
    tasks = Tasks(sx, sy, qx, qy, jnp.tile(jnp.arange(ways), (2, 1)))
    params, state = algo.init(jax.random.PRNGKey(1), tasks)
    loss, _ = algo.meta_loss(params, state, tasks, jax.random.PRNGKey(2))
    want = []
    for t in range(2):
        f, _ = models.forward(
            BatchNormNet(),
            params["backbone"],
            state,
            jnp.concatenate([sx[t], qx[t]]),
            train=True,
            rng=jax.random.PRNGKey(3),
        )
        z = np.asarray(
            algo.predict_from_features(params, f[: 2 * ways], sy[t], f[2 * ways :], ways)
        )
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        target = np.where(np.eye(ways)[np.asarray(qy[t])] == 1, 1 - eps, eps / (ways - 1))
        want.append(-(target * logp).sum(1).mean())
    assert float(loss) == pytest.approx(np.mean(want), rel=1e-4)
    config.algo.label_smoothing = 0.0
    plain, _ = algorithms.build(name, BatchNormNet(), config, 10).meta_loss(
        params, state, tasks, jax.random.PRNGKey(2)
    )
    assert abs(float(plain) - float(loss)) > 1e-3


def test_metaoptnets_protonet_head():
    """scale_by_dim and learn_scale: -||q - c||^2 / D times exp(log_scale), from numpy; the scale
    starts at init_scale and gets a gradient."""
    from mtl_gbml.algorithms import protonet

    ways, dim = 3, 5
    config = base_config.get_config("protonet")
    config.data.ways = ways
    config.algo.scale_by_dim, config.algo.learn_scale, config.algo.init_scale = True, True, 2.0
    algo = protonet.build(BatchNormNet(), config, 10)
    rng = np.random.default_rng(0)
    sf, qf = rng.normal(size=(2 * ways, dim)), rng.normal(size=(4, dim))
    sy = np.repeat(np.arange(ways), 2)
    protos = np.stack([sf[sy == k].mean(0) for k in range(ways)])
    want = -2.0 * ((qf[:, None, :] - protos[None]) ** 2).sum(-1) / dim
    x = jnp.zeros((1, 2 * ways, 4, 4, 1))
    y = jnp.asarray(sy)[None]
    params, _ = algo.init(jax.random.PRNGKey(0), Tasks(x, y, x, y, jnp.arange(ways)[None]))
    assert float(jnp.exp(params["protonet"]["log_scale"])) == pytest.approx(2.0)
    got = algo.predict_from_features(
        params, jnp.asarray(sf), jnp.asarray(sy), jnp.asarray(qf), ways
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    grad = jax.grad(
        lambda p: algo.predict_from_features(
            p, jnp.asarray(sf), jnp.asarray(sy), jnp.asarray(qf), ways
        )[0, 0]
    )(params)
    assert abs(float(grad["protonet"]["log_scale"])) > 0
