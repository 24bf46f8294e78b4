"""The cached-feature evaluator: its episodes are the sampler's, and chunking the vmap over episodes
changes no episode's result."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from mtl_gbml import algorithms, linear_heads, models
from mtl_gbml.algorithms.base import Algorithm, l2_normalize
from mtl_gbml.data.sampler import make_pool, sample_task, to_float
from mtl_gbml.evaluation import (
    cached_episode_accuracy,
    episode_chunk,
    episode_features,
    episode_grams,
    evaluate,
    fit_chunk_size,
    map_chunks,
    summarize,
    uses_gram,
)


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
    # the fit's chunks: 512 KiB of Gram matrices, preconditioners and iterates, at most 256
    # episodes, in multiples of 16 (the float32 lanes of AVX-512)
    assert [fit_chunk_size(w, s) for w, s in [(5, 1), (5, 5), (20, 1)]] == [256, 48, 32]
    assert fit_chunk_size(20, 5) == 3  # fewer than 16: as computed
    assert fit_chunk_size(100, 100) == 1  # never zero


@pytest.mark.parametrize("per_class", [12, 40])  # classes padded to 12 or to 40 images
def test_episode_grams_are_the_products_of_the_episode_features(per_class):
    """The Gram matrices are those of the features ``episode_features`` gathers (which the test
    above ties to the sampler), multiplied here in float64 numpy; classes of unequal size."""
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.normal(size=(30, per_class, 8)).astype(np.float32))
    counts = jnp.asarray(rng.integers(7, per_class + 1, size=30), jnp.int32)
    for seed in range(5):
        k = jax.random.PRNGKey(seed)
        gs, gq = episode_grams(k, feats, counts, 4, 2, 5)
        sf, qf = (np.asarray(x, np.float64) for x in episode_features(k, feats, counts, 4, 2, 5))
        np.testing.assert_allclose(np.asarray(gs), sf @ sf.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gq), qf @ sf.T, rtol=1e-5, atol=1e-5)


def test_mtl_gram_path_gives_the_episodes_of_the_feature_path():
    """MTL's evaluator (normalise the split once, fit from Gram matrices) against the same
    algorithm's ``predict_from_features`` on gathered raw features, episode by episode."""
    config = load_config("configs/omniglot/mtl.py", "runlocal")
    mtl = algorithms.build("mtl", models.build(config.model), config, 10)
    features_only = Algorithm(
        "mtl", None, None, None, True, predict_from_features=mtl.predict_from_features
    )
    rng = np.random.default_rng(2)
    means = rng.normal(size=(40, 1, 24))
    feats = jnp.asarray((means + 0.8 * rng.normal(size=(40, 12, 24))).astype(np.float32) + 0.5)
    counts = jnp.full((40,), 12, jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(4), 60)
    for ways, shots in [(5, 1), (3, 4)]:
        assert uses_gram(mtl, 24, ways, shots) and not uses_gram(features_only, 24, ways, shots)
        gram, direct = (
            np.asarray(cached_episode_accuracy(a, None, feats, counts, ways, shots, 6)(keys))
            for a in (mtl, features_only)
        )
        np.testing.assert_array_equal(gram, direct)
        assert 1.5 / ways < gram.mean() < 1.0


def test_map_chunks_is_the_whole_batch_in_pieces():
    """``map_chunks`` hands ``fn`` whole chunks (remainder included) and concatenates in order."""
    xs = (jnp.arange(23.0), jnp.arange(46.0).reshape(23, 2))
    seen = []

    def fn(x):
        seen.append(x[0].shape[0])  # trace-time chunk sizes
        return x[0] * 10 + x[1].sum(-1)

    expect = np.asarray(fn(xs))
    for size in (1, 5, 23, 40):
        seen.clear()
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda a, s=size: map_chunks(fn, a, s))(xs)), expect
        )
        full = 23 - 23 % min(size, 23)
        assert seen == ([min(size, 23)] if full else []) + ([23 - full] if full < 23 else [])


def test_summarize_is_the_mean_and_the_normal_95_percent_interval():
    # 100, 0, 100, 0, 100: mean 60, sample variance (3 * 40^2 + 2 * 60^2) / 4 = 3000
    s = summarize(np.array([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert s["accuracy"] == pytest.approx(60.0) and s["episodes"] == 5
    assert s["ci95"] == pytest.approx(1.96 * math.sqrt(3000) / math.sqrt(5))
    assert math.isnan(summarize(np.array([0.5]))["ci95"])


def _id_pool():
    """8 classes of 6-9 images whose one pixel is the image's id (0..58), and the id -> class."""
    counts = [6, 9, 7, 8, 6, 9, 6, 7]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1)
    return make_pool(images, labels), jnp.asarray(labels)


def _embed(params, state, x):  # the image id, as a 1-d feature
    return x.reshape(x.shape[0], -1)


def _nearest_head(params, support_f, support_y, query_f, ways):
    """Each class's logit: minus the id distance to its nearest support image, ties to the lower
    id, in small integers (exact whatever the rounding of a fused or vmapped program)."""
    q, sup = (jnp.round(f[:, 0] * 255) for f in (query_f, support_f))
    d = -(2 * jnp.abs(q[:, None] - sup[None, :]) + (sup[None, :] > q[:, None]))  # [Q, S]
    mine = jax.nn.one_hot(support_y, ways).T.astype(bool)  # [ways, S]
    return jnp.where(mine[None], d[:, None, :], -jnp.inf).max(-1)


def test_evaluate_is_its_episodes_one_at_a_time():
    """evaluate(): episode e of setting (ways, shots) is drawn by sample_task from
    fold_in(fold_in(fold_in(rng, ways), shots), e) and fitted on its own; batches (the last one
    partial) only group them. Checked against that loop, so a batch that reused another's
    episodes, a wrong batch size or a summary of other episodes would show; and the accuracies
    do not move with the batch size or the order of the settings."""
    pool, _ = _id_pool()
    algo = Algorithm("stub", None, None, None, True, _embed, _nearest_head)
    rng, settings, episodes, queries = jax.random.PRNGKey(5), [(4, 1), (3, 2)], 7, 2
    kw = dict(episodes=episodes, queries=queries, rng=rng, bn_mode="inductive")
    got = evaluate(algo, None, None, pool, settings, batch=3, **kw)
    head = jax.jit(_nearest_head, static_argnums=4)
    for ways, shots in settings:
        accs = []
        for e in range(episodes):
            k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, ways), shots), e)
            t = sample_task(pool, k, ways, shots, queries)
            sf, qf = (_embed(None, None, to_float(x)) for x in (t.support_x, t.query_x))
            logits = head(None, sf, t.support_y, qf, ways)
            accs.append(float(jnp.mean(logits.argmax(-1) == t.query_y)))
        assert len(set(accs)) > 1  # the episodes differ, so a repeated batch would show
        want = summarize(np.array(accs))
        assert got[f"{ways}way{shots}shot"] == pytest.approx(want, rel=1e-6)
    for batch in (1, 5, 500):
        assert evaluate(algo, None, None, pool, settings[::-1], batch=batch, **kw) == got


def test_a_transductive_frozen_backbone_is_evaluated_episode_by_episode():
    """Cached features are inductive ones (running statistics); under bn_mode='transductive' a
    frozen-backbone algorithm must be evaluated by its adapt_and_predict on each episode. Here
    adapt_and_predict is right on every query (it reads the classes from the image ids) and the
    cached-feature head never is better than chance."""
    pool, label_of = _id_pool()

    def ids(x):
        return jnp.round(x.reshape(x.shape[0]) * 255).astype(jnp.int32)

    def adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng=None):
        same = label_of[ids(query_x)][:, None] == label_of[ids(support_x)][None, :]
        return same.astype(jnp.float32) @ jax.nn.one_hot(support_y, ways)

    def blind_head(params, support_f, support_y, query_f, ways):
        return jnp.zeros((query_f.shape[0], ways))

    algo = Algorithm("stub", None, None, adapt_and_predict, True, _embed, blind_head)
    kw = dict(episodes=6, queries=2, batch=4, rng=jax.random.PRNGKey(0))
    assert evaluate(algo, None, None, pool, [(4, 1)], bn_mode="transductive", **kw)["4way1shot"][
        "accuracy"
    ] == pytest.approx(100.0)
    assert evaluate(algo, None, None, pool, [(4, 1)], bn_mode="inductive", **kw)["4way1shot"][
        "accuracy"
    ] == pytest.approx(25.0)


def test_the_adapted_path_draws_the_same_episode_keys_and_ignores_the_batch():
    """Episodes adapted one by one (whole-network algorithms, transductive BatchNorm): episode e's
    task is drawn from its key itself, as the cached path draws it, and the accuracies do not move
    with the batch."""
    pool, _ = _id_pool()
    head = jax.jit(_nearest_head, static_argnums=4)

    def adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng=None):
        return _nearest_head(None, _embed(None, None, support_x), support_y,
                             _embed(None, None, query_x), ways)  # fmt: skip

    algo = Algorithm("stub", None, None, adapt_and_predict, False, _embed, _nearest_head)
    rng, ways, shots, queries, episodes = jax.random.PRNGKey(8), 4, 1, 2, 7
    kw = dict(episodes=episodes, queries=queries, rng=rng, bn_mode="transductive")
    got = evaluate(algo, None, None, pool, [(ways, shots)], batch=3, **kw)
    accs = []
    for e in range(episodes):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, ways), shots), e)
        t = sample_task(pool, k, ways, shots, queries)
        sf, qf = (_embed(None, None, to_float(x)) for x in (t.support_x, t.query_x))
        accs.append(float(jnp.mean(head(None, sf, t.support_y, qf, ways).argmax(-1) == t.query_y)))
    assert len(set(accs)) > 1
    assert got["4way1shot"] == pytest.approx(summarize(np.array(accs)), rel=1e-6)
    assert evaluate(algo, None, None, pool, [(ways, shots)], batch=5, **kw) == got


def test_both_paths_score_the_same_episodes():
    """A frozen backbone without BatchNorm has the same features in either mode, so the cached
    path (inductive) and the per-episode path (transductive) must give equal accuracies: they
    draw the same task from each episode's key (the per-episode path drew from a split key)."""
    pool, _ = _id_pool()

    def adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng=None):
        return _nearest_head(None, _embed(None, None, support_x), support_y,
                             _embed(None, None, query_x), ways)  # fmt: skip

    algo = Algorithm("stub", None, None, adapt_and_predict, True, _embed, _nearest_head)
    kw = dict(episodes=40, queries=2, batch=16, rng=jax.random.PRNGKey(3))
    ind = evaluate(algo, None, None, pool, [(4, 1)], bn_mode="inductive", **kw)["4way1shot"]
    tra = evaluate(algo, None, None, pool, [(4, 1)], bn_mode="transductive", **kw)["4way1shot"]
    assert 0.0 < ind["accuracy"] < 100.0 and ind["ci95"] > 0
    assert tra == pytest.approx(ind, rel=1e-6)


def test_a_split_is_embedded_whole_classes_at_a_time_within_an_image_budget():
    """embed_pool: every (class, image) embedded as by itself; calls of at most ``images`` images
    (whole classes, at least one), no class padding beyond the last call's."""
    from mtl_gbml.evaluation import embed_pool

    per_class = 7
    imgs = np.random.default_rng(0).integers(0, 255, (5 * per_class, 3, 3, 1), np.uint8)
    pool = make_pool(imgs, np.repeat(np.arange(5), per_class))
    shapes = []

    def embed(params, state, x):
        shapes.append(x.shape[0])  # at trace time: one entry per compiled call shape
        return x.reshape(x.shape[0], -1) * 2.0

    for images, calls in ((14, 2 * per_class), (100, 5 * per_class), (3, per_class)):
        shapes.clear()
        got = np.asarray(embed_pool(embed, None, None, pool, images=images))
        assert shapes == [calls], (images, shapes)
        want = 2.0 * np.asarray(to_float(jnp.asarray(imgs))).reshape(5, per_class, -1)
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    "settings,kw,message",
    [
        ([(1, 1)], {}, "1-way 1-shot evaluation: use at least 2 ways"),
        ([(4, 0)], {}, "4-way 0-shot evaluation: use at least 2 ways .* and 1 shot"),
        ([(4, 1)], {"episodes": 0}, "episodes=0"),
        ([(4, 1)], {"queries": 0}, "queries=0"),
        ([(4, 1)], {"batch": -1}, "batch=-1"),
        ([(4, 5)], {}, r"5 shots \+ 2 queries exceed .* the evaluate CLI's --queries"),
    ],
)
def test_settings_that_cannot_be_evaluated_are_named(settings, kw, message):
    """1-way (trivially 100%), 0 shots, no episodes or queries: a ValueError naming them, where
    they gave 100.00 +- 0.00, a ZeroDivisionError or an empty concatenation."""
    pool, _ = _id_pool()
    algo = Algorithm("stub", None, None, None, True, _embed, _nearest_head)
    args = dict(episodes=4, queries=2, batch=4, rng=jax.random.PRNGKey(0), bn_mode="inductive")
    with pytest.raises(ValueError, match=message):
        evaluate(algo, None, None, pool, settings, **{**args, **kw})
