"""The cached-feature evaluator: its episodes are the sampler's, and chunking the vmap over episodes
changes no episode's result."""

import jax
import jax.numpy as jnp
import numpy as np

from mtl_gbml import linear_heads
from mtl_gbml.algorithms.base import Algorithm, l2_normalize
from mtl_gbml.data.sampler import make_pool, sample_task
from mtl_gbml.evaluation import cached_episode_accuracy, episode_chunk, episode_features


def _logreg_head(params, support_f, support_y, query_f, ways):
    """MTL's test-time head (mtl.py): L2-normalised features, logistic regression."""
    support_f, query_f = l2_normalize(support_f), l2_normalize(query_f)
    w, b = linear_heads.logistic_regression(support_f, support_y, ways, 3.0, 100)
    return query_f @ w.T + b


_HEAD = Algorithm("stub", None, None, None, True, predict_from_features=_logreg_head)


def test_episode_features_are_the_sampled_task():
    """Same rng: the cached features gathered are those of the images sample_task draws."""
    counts = [6, 9, 7, 8, 6, 9, 6, 7]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)  # pixel = image id
    pool = make_pool(images, labels)
    table = np.asarray(pool.class_table)
    feats = jnp.asarray(table[..., None].astype(np.float32))  # feature of (class, pos) = image id
    for seed in range(10):
        rng = jax.random.PRNGKey(seed)
        sf, qf = episode_features(rng, feats, pool.class_counts, 4, 2, 3)
        task = sample_task(pool, rng, 4, 2, 3)
        np.testing.assert_array_equal(np.asarray(sf[:, 0]), np.asarray(task.support_x).ravel())
        np.testing.assert_array_equal(np.asarray(qf[:, 0]), np.asarray(task.query_x).ravel())


def test_chunks_change_no_episode():
    """Chunking the vmap (a lax.map over vmapped chunks) changes no episode's accuracy, and the
    fitted heads only at float32 rounding: XLA:CPU vectorises a loop differently for different
    batch sizes, as it already did for a plain vmap over fewer episodes (the last partial batch)."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(40, 1, 16))
    feats = jnp.asarray((means + 0.7 * rng.normal(size=(40, 12, 16))).astype(np.float32))
    counts = jnp.full((40,), 12, jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(3), 45)
    accs = [
        np.asarray(cached_episode_accuracy(_HEAD, None, feats, counts, 5, 1, 6, chunk)(keys))
        for chunk in (45, 1, 7, None)  # 45: one vmap; 7 leaves a remainder of 3
    ]
    for a in accs[1:]:
        np.testing.assert_array_equal(a, accs[0])
    assert 0.5 < accs[0].mean() < 1.0  # a real fit, above chance (0.2)

    def fit(k):
        sf, _ = episode_features(k, feats, counts, 5, 1, 6)
        return linear_heads.logistic_regression(l2_normalize(sf), jnp.arange(5), 5, 3.0, 100)

    whole = jax.jit(jax.vmap(fit))(keys)
    chunked = jax.jit(lambda ks: jax.lax.map(fit, ks, batch_size=7))(keys)
    for x, y in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)


def test_episode_chunk_keeps_the_gathered_features_small():
    assert episode_chunk(576, 5, 1, 15) == 22  # 5w1s on 576-d features: ~4 MiB a chunk
    assert episode_chunk(576, 20, 5, 15) == 4
    assert episode_chunk(10**6, 20, 5, 15) == 1  # never zero
