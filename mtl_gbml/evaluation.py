"""Few-shot evaluation: mean accuracy and 95% confidence interval over many episodes.

Two paths, chosen per algorithm and BatchNorm mode (never mixed silently):
- cached features (frozen-backbone algorithms with inductive BatchNorm): embed every image of the
  split once, then sample episodes over the cached features and fit each episode's head, vmapped
  over a batch of episodes; 10,000 episodes take seconds.
- per episode (whole-network adaptation, or transductive BatchNorm): sample image episodes and
  vmap the algorithm's ``adapt_and_predict`` over a batch of them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_gbml.algorithms.base import Algorithm
from mtl_gbml.data.sampler import ImagePool, rotate_quarters, sample_indices, sample_task, to_float

_SETTING = re.compile(r"^(\d+)w(\d+)s$")


def parse_setting(s: str) -> tuple[int, int]:
    """'20w1s' -> (20, 1)."""
    m = _SETTING.match(s)
    if not m:
        raise ValueError(
            f"evaluation setting {s!r} is not of the form '<ways>w<shots>s', e.g. '5w1s'"
        )
    return int(m.group(1)), int(m.group(2))


def setting_key(ways: int, shots: int) -> str:
    return f"{ways}way{shots}shot"


def summarize(per_episode: np.ndarray) -> dict[str, float]:
    """Mean and 95% CI half-width (normal approximation), in percent."""
    acc = 100.0 * np.asarray(per_episode, np.float64)
    ci = 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else float("nan")
    return {"accuracy": float(acc.mean()), "ci95": float(ci), "episodes": int(len(acc))}


@functools.partial(jax.jit, static_argnums=0)
def _embed_classes(embed_fn, params, state, pool: ImagePool, table_rows, rots):
    imgs = pool.images[table_rows]  # [c, M, H, W, C]
    imgs = jax.vmap(rotate_quarters)(imgs, rots)
    c, m = table_rows.shape
    f = embed_fn(params, state, to_float(imgs.reshape((c * m,) + imgs.shape[2:])))
    return f.reshape(c, m, -1)


EMBED_IMAGES = 1280  # images per backbone call when embedding a split (Omniglot: 64 classes)


def embed_pool(
    embed_fn, params: Any, state: Any, pool: ImagePool, images: int = EMBED_IMAGES
) -> jax.Array:
    """Features [num_classes, max_per_class, D] of every (class, image) of the pool.

    Whole classes at a time, as many as fit in ``images`` images (at least one): Omniglot's 20
    images a class go 64 classes a call, mini-ImageNet's 600 two. (It was 64 classes a call
    whatever their size: 38,400 images of 84x84 through ResNet-12 at once on mini-ImageNet, ~194
    GiB of temporaries.) The program takes the parameters and the pool as arguments
    (``embed_fn`` is static): one compilation per run, not one per validation."""
    n = pool.num_classes
    table, rots = np.asarray(pool.class_table), np.asarray(pool.class_rot)
    chunk = max(1, min(n, images // table.shape[1]))
    pad = (-n) % chunk
    table = np.concatenate([table, np.repeat(table[:1], pad, 0)])
    rots = np.concatenate([rots, np.repeat(rots[:1], pad, 0)])
    out = [
        _embed_classes(embed_fn, params, state, pool, table[i : i + chunk], rots[i : i + chunk])
        for i in range(0, len(table), chunk)
    ]
    return jnp.concatenate(out)[:n]


def episode_features(
    rng: jax.Array, feats: jax.Array, class_counts: jax.Array, ways: int, shots: int, queries: int
) -> tuple[jax.Array, jax.Array]:
    """One episode over cached features [C, M, D]: support [N*K, D] and query [N*Q, D] features,
    class-major (labels ``repeat(arange(N), K)`` and ``repeat(arange(N), Q)``); the same draw as
    ``sampler.sample_task`` makes from the same rng."""
    f = _episode_rows(rng, feats, class_counts, ways, shots + queries)
    return f[:, :shots].reshape(ways * shots, -1), f[:, shots:].reshape(ways * queries, -1)


def _episode_rows(
    rng: jax.Array, feats: jax.Array, class_counts: jax.Array, ways: int, per_class: int
) -> jax.Array:
    """The drawn rows [N, K+Q, D] of cached features [C, M, D], support first in each class."""
    classes, pos = sample_indices(rng, class_counts, feats.shape[1], ways, per_class)
    return feats[classes[:, None], pos]


def episode_grams(
    rng: jax.Array, feats: jax.Array, class_counts: jax.Array, ways: int, shots: int, queries: int
) -> tuple[jax.Array, jax.Array]:
    """Inner products of one episode over cached features [C, M, D]: support Gram [N*K, N*K] and
    query-support [N*Q, N*K], for the episode ``episode_features`` draws from the same rng.

    The drawn rows are gathered and all of them multiplied by the support features in one
    product, from which both matrices are picked. In a scratch probe on the features of
    eval_throughput.md (ms of CPU an episode, with the draw) this took 0.040/0.15/0.061 at
    5w1s/20w1s/5w5s, against 0.047/0.18/0.070 for gathering the N whole class blocks [N, M, D]
    and multiplying those (the evaluator before), and the same products to the bit."""
    f = _episode_rows(rng, feats, class_counts, ways, shots + queries)
    sf = f[:, :shots].reshape(ways * shots, -1)
    products = (f.reshape(ways * (shots + queries), -1) @ sf.T).reshape(ways, shots + queries, -1)
    gs = products[:, :shots].reshape(ways * shots, ways * shots)
    return gs, products[:, shots:].reshape(ways * queries, ways * shots)


CHUNK_BYTES = 4 << 20  # gathered features per vmapped chunk: about one core's L2 cache
# The fit's working set per chunk of episodes (support Gram matrices, their preconditioners and
# the iterates), which its iterations stream at every step. Chunks are whole multiples of 16
# episodes, the float32 lanes of an AVX-512 register, since the episode axis is the vectorised
# one: in a scratch sweep on the features of eval_throughput.md, 20w1s fitted in 0.12 ms an
# episode in chunks of 32 or 48 against 0.20 in chunks of 18, and 5w1s in 0.0038 (256) against
# 0.0045 (291 or 500). 512 KiB and at most 256 episodes give 256/48/32 episodes at
# 5w1s/5w5s/20w1s, each within noise of the best of 8-576; 20w5s (a vmap of one-episode fits,
# n > 32) gets 3 a chunk
FIT_CHUNK_BYTES = 512 << 10
FIT_CHUNK_MAX = 256
SIMD_LANES = 16


def episode_chunk(feature_dim: int, ways: int, shots: int, queries: int) -> int:
    """Episodes per vmapped chunk of the cached-feature evaluator: as many as keep a chunk's
    gathered features within ``CHUNK_BYTES``. One vmap over a whole batch of 500 5w1s episodes
    materialises ~90 MB per intermediate (gathered, normalised, ...), which streams through memory
    at every step; chunks that stay in cache made the 5w1s episode 1.8x cheaper on CPU
    (benchmarks/results/eval_throughput.md)."""
    per_episode = ways * (shots + queries) * feature_dim * 4
    return max(1, CHUNK_BYTES // per_episode)


def fit_chunk_size(ways: int, shots: int) -> int:
    """Episodes handed to ``predict_from_gram`` at once: ``FIT_CHUNK_BYTES`` of the fit's working
    set, two [n, n] matrices (the support Gram matrix and its preconditioner) and ~8 [n, ways]
    iterates per episode (the query products are used once, after the fit), at most
    ``FIT_CHUNK_MAX``, rounded down to a multiple of ``SIMD_LANES`` when there are that many."""
    n = ways * shots
    size = min(FIT_CHUNK_MAX, FIT_CHUNK_BYTES // ((2 * n * n + 8 * n * ways) * 4))
    return max(1, size - size % SIMD_LANES if size >= SIMD_LANES else size)


def uses_gram(algorithm: Algorithm, feature_dim: int, ways: int, shots: int) -> bool:
    """Whether the cached-feature evaluator hands the head Gram matrices: the algorithm has
    ``predict_from_gram`` and the support set is no larger than the feature dimension (beyond it
    an [n, n] Gram costs more than the features)."""
    return algorithm.predict_from_gram is not None and ways * shots <= feature_dim


def map_chunks(fn: Callable[[Any], jax.Array], xs: Any, size: int) -> jax.Array:
    """``fn`` over consecutive chunks of ``size`` along the leading axis of the pytree ``xs``,
    concatenated: ``fn`` takes and returns a whole chunk (leading axis = the chunk), unlike
    ``lax.map(batch_size=...)``, which vmaps a per-element function. A ``lax.map`` over the full
    chunks, then ``fn`` once on the remainder."""
    total = jax.tree.leaves(xs)[0].shape[0]
    size = max(1, min(size, total))
    full = total - total % size
    parts = []
    if full:
        split = jax.tree.map(lambda x: x[:full].reshape((-1, size) + x.shape[1:]), xs)
        out = jax.lax.map(fn, split)
        parts.append(out.reshape((full,) + out.shape[2:]))
    if full < total:
        parts.append(fn(jax.tree.map(lambda x: x[full:], xs)))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def cached_episode_accuracy(
    algorithm: Algorithm,
    params: Any,
    feats: jax.Array,
    class_counts: jax.Array,
    ways: int,
    shots: int,
    queries: int,
    chunk: int | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """Jitted ``keys [B, ...] -> accuracy [B]``, one episode per key: sample over the cached
    features, fit the head, predict.

    Heads with ``predict_from_gram`` (``uses_gram``), in two stages: the algorithm's
    ``feature_transform`` is applied to the cached split once; a ``lax.map`` over vmapped chunks
    of ``chunk`` episodes (default ``episode_chunk``) gathers and multiplies each episode's features
    into its Gram matrices (5w1s: 400 floats against 46,000 gathered); then ``map_chunks`` hands
    ``predict_from_gram`` chunks of ``fit_chunk_size`` episodes (5w1s: 256) with their episode
    axis, so the fit's iterations run over many episodes at once, vectorised.
    Other heads: each chunk gathers the episode features and calls ``predict_from_features``.
    Per episode the same computation whatever the chunk, equal up to float32 rounding (XLA
    vectorises for the batch size it sees, as it does for a smaller last batch).

    One compiled program per (algorithm, setting, shapes): parameters and features are its
    arguments, so validating every few steps does not recompile."""
    if chunk is None:
        chunk = episode_chunk(feats.shape[-1], ways, shots, queries)
    gram = uses_gram(algorithm, feats.shape[-1], ways, shots)
    if gram and algorithm.feature_transform is not None:
        feats = algorithm.feature_transform(feats)
    return functools.partial(
        _cached_batch, algorithm, ways, shots, queries, chunk, gram, params, feats, class_counts
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _cached_batch(algorithm, ways, shots, queries, chunk, gram, params, feats, class_counts, keys):
    sy = jnp.repeat(jnp.arange(ways), shots)
    qy = jnp.repeat(jnp.arange(ways), queries)
    if gram:
        fit_chunk = fit_chunk_size(ways, shots)
        grams = lambda rng: episode_grams(rng, feats, class_counts, ways, shots, queries)

        def fit_predict(g):  # a chunk of episodes at once: the head vectorises across them
            logits = algorithm.predict_from_gram(params, g[0], g[1], sy, ways)
            return (logits.argmax(-1) == qy).mean(-1)

        g = jax.lax.map(grams, keys, batch_size=chunk)
        return map_chunks(fit_predict, g, fit_chunk)

    def one(rng):
        sf, qf = episode_features(rng, feats, class_counts, ways, shots, queries)
        logits = algorithm.predict_from_features(params, sf, sy, qf, ways)
        return (logits.argmax(-1) == qy).mean()

    return jax.lax.map(one, keys, batch_size=chunk)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _adapted_batch(algorithm, ways, shots, queries, params, state, pool, keys):
    """Accuracy of each episode ``keys[e]``: its task drawn from the key itself, as the cached
    path draws it (so every algorithm, and either BatchNorm mode, is scored on the same episodes
    of a seed), the adaptation given ``fold_in(key, 1)``."""

    def one(k):
        k_adapt = jax.random.fold_in(k, 1)
        t = sample_task(pool, k, ways, shots, queries)
        logits = algorithm.adapt_and_predict(
            params, state, to_float(t.support_x), t.support_y, to_float(t.query_x), ways, k_adapt
        )
        return (logits.argmax(-1) == t.query_y).mean()

    return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnums=(3, 4))
def episode_keys(rng: jax.Array, ways: int, shots: int, start, size: int) -> jax.Array:
    """The keys of episodes ``start .. start + size - 1`` of setting (ways, shots):
    ``fold_in(fold_in(fold_in(rng, ways), shots), e)`` for episode e. An episode is the same
    whatever the batch it is evaluated in and whatever other settings are evaluated with it, so
    ``eval.batch`` (a memory knob) and the order of ``eval.settings`` change no accuracy."""
    key = jax.random.fold_in(jax.random.fold_in(rng, ways), shots)
    return jax.vmap(lambda e: jax.random.fold_in(key, e))(start + jnp.arange(size))


def evaluate(
    algorithm: Algorithm,
    params: Any,
    state: Any,
    pool: ImagePool,
    settings: list[tuple[int, int]],
    *,
    episodes: int,
    queries: int,
    batch: int,
    rng: jax.Array,
    bn_mode: str,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """{'<N>way<K>shot': {'accuracy', 'ci95', 'episodes'}} for each (ways, shots) setting."""
    for name, value in (("episodes", episodes), ("queries", queries), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name}={value}: evaluate at least 1 (the per-episode {name})")
    for ways, shots in settings:
        if ways < 2 or shots < 1:
            raise ValueError(
                f"{ways}-way {shots}-shot evaluation: use at least 2 ways (1-way accuracy is 100% "
                "whatever the learner) and 1 shot"
            )
    cached = algorithm.frozen_backbone and bn_mode == "inductive"
    feats = embed_pool(algorithm.embed, params, state, pool) if cached else None
    out = {}
    for ways, shots in settings:
        if ways > pool.num_classes:
            raise ValueError(f"{ways}-way evaluation but the split has {pool.num_classes} classes")
        if shots + queries > pool.min_per_class:
            raise ValueError(
                f"{shots} shots + {queries} queries exceed the {pool.min_per_class} images of the "
                "smallest class of the split; lower the shots or the queries per class "
                "(eval.queries; the evaluate CLI's --queries)"
            )
        accs = []
        starts = range(0, episodes, batch)
        if cached:
            fn = cached_episode_accuracy(
                algorithm, params, feats, pool.class_counts, ways, shots, queries
            )
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"eval {ways}w{shots}s", leave=False)
        for start in starts:
            keys = episode_keys(rng, ways, shots, start, min(batch, episodes - start))
            if cached:
                accs.append(np.asarray(fn(keys)))
            else:
                acc = _adapted_batch(algorithm, ways, shots, queries, params, state, pool, keys)
                accs.append(np.asarray(acc))
        out[setting_key(ways, shots)] = summarize(np.concatenate(accs))
    return out
