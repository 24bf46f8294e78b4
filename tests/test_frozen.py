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
