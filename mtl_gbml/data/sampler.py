"""Device-resident image pool and the jitted episode sampler (fixed shapes, deterministic in rng).

Classes are columns of a table of image indices; a class may be a rotation (by ``class_rot`` quarter
turns) of stored images, so Omniglot's rotated classes cost no memory. A task's labels are
0..N-1 in sampling order and ``class_ids`` keeps the global class ids (split-local), so the
label -> class mapping is a bijection by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ImagePool(NamedTuple):
    images: jax.Array  # uint8 [num_images, H, W, C]
    class_table: jax.Array  # int32 [num_classes, max_per_class]: indices into images (padded)
    class_counts: jax.Array  # int32 [num_classes]: valid entries per row of class_table
    class_rot: jax.Array  # int32 [num_classes]: quarter turns applied to the class's images

    @property
    def num_classes(self) -> int:
        return int(self.class_table.shape[0])

    @property
    def min_per_class(self) -> int:
        return int(np.min(np.asarray(self.class_counts)))


class Tasks(NamedTuple):
    support_x: jax.Array  # [T, N*K, H, W, C]
    support_y: jax.Array  # [T, N*K] in 0..N-1, class-major
    query_x: jax.Array  # [T, N*Q, H, W, C]
    query_y: jax.Array  # [T, N*Q]
    class_ids: jax.Array  # [T, N] global class ids, in label order


def make_pool(
    images: np.ndarray, labels: np.ndarray, rotations: bool = False, device=None
) -> ImagePool:
    """Pool from images [M, H, W, C] uint8 and integer labels [M] (any ids; sorted order kept).

    With ``rotations``, every class appears four times (0, 90, 180, 270 degrees): class
    ``4 * c + r`` is class ``c`` turned ``r`` quarter turns.
    """
    labels = np.asarray(labels)
    uniq = np.unique(labels)
    rows = [np.flatnonzero(labels == u) for u in uniq]
    width = max(len(r) for r in rows)
    table = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    counts = np.array([len(r) for r in rows], np.int32)
    rot = np.zeros(len(rows), np.int32)
    if rotations:
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"rotations need square images, got {images.shape[1:3]}")
        table, counts = np.repeat(table, 4, axis=0), np.repeat(counts, 4)
        rot = np.tile(np.arange(4, dtype=np.int32), len(rows))
    put = (lambda a: jax.device_put(a, device)) if device is not None else jnp.asarray
    return ImagePool(put(images), put(table), put(counts), put(rot))


def smallest_k(keys: jax.Array, k: int) -> jax.Array:
    """Indices of the ``k`` smallest entries along the last axis, smallest first, ties to the lower
    index: exactly ``jnp.argsort(keys, axis=-1)[..., :k]`` (a stable sort), by ``lax.top_k`` of the
    negated keys, which XLA also breaks ties by index. A partial selection: O(n) per row instead of
    a full sort (the evaluator's 1,692-class draw per episode was 15x cheaper)."""
    return jax.lax.top_k(-keys, k)[1]


def distinct_integers(rng: jax.Array, n: int, k: int) -> jax.Array:
    """``k`` distinct integers of [0, n), uniformly random as an ordered tuple, from ``2k`` random
    numbers whatever ``n``: Robert Floyd's subset algorithm (for j = n-k, ..., n-1: draw t from
    [0, j]; take j if t is taken already, else t), which draws a uniform k-subset, then a uniform
    shuffle of it. Drawing the ``n`` uniform keys of a partial sort instead cost 1,692 threefry
    uniforms and a ``lax.top_k`` per evaluation episode over Omniglot's test classes."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct integers from {n}")
    k_int, k_perm = jax.random.split(rng)
    t = jax.random.randint(k_int, (k,), 0, jnp.arange(n - k + 1, n + 1, dtype=jnp.int32))
    picks = jnp.full((k,), -1, jnp.int32)
    for i in range(k):  # k is a handful of ways: unrolled, each step one compare over k
        taken = jnp.any(picks == t[i])
        picks = picks.at[i].set(jnp.where(taken, n - k + i, t[i]))
    return picks[smallest_k(jax.random.uniform(k_perm, (k,)), k)]


def sample_indices(
    rng: jax.Array, class_counts: jax.Array, max_per_class: int, ways: int, per_class: int
) -> tuple[jax.Array, jax.Array]:
    """``ways`` distinct classes and ``per_class`` distinct within-class positions for each.

    Both are uniform draws without replacement, in random order: the classes by
    ``distinct_integers``; the positions as the indices of the smallest of i.i.d. uniform keys
    (padded positions get key 2, so they are never drawn while a class has enough images).
    """
    k_cls, k_img = jax.random.split(rng)
    classes = distinct_integers(k_cls, class_counts.shape[0], ways)
    keys = jax.random.uniform(k_img, (ways, max_per_class))
    valid = jnp.arange(max_per_class)[None, :] < class_counts[classes][:, None]
    keys = jnp.where(valid, keys, 2.0)
    pos = smallest_k(keys, per_class)
    return classes, pos


def rotate_quarters(x: jax.Array, k: jax.Array) -> jax.Array:
    """Rotate images [..., H, W, C] by ``k`` (traced) quarter turns."""
    branches = [lambda a, r=r: jnp.rot90(a, r, axes=(-3, -2)) for r in range(4)]
    return jax.lax.switch(k % 4, branches, x)


def sample_task(pool: ImagePool, rng: jax.Array, ways: int, shots: int, queries: int) -> Tasks:
    """One task (no leading task axis); images stay uint8."""
    classes, pos = sample_indices(
        rng, pool.class_counts, pool.class_table.shape[1], ways, shots + queries
    )
    ids = pool.class_table[classes[:, None], pos]  # [N, K+Q]
    imgs = pool.images[ids]  # [N, K+Q, H, W, C]
    imgs = jax.vmap(rotate_quarters)(imgs, pool.class_rot[classes])
    h, w, c = imgs.shape[2:]
    labels = jnp.arange(ways, dtype=jnp.int32)
    return Tasks(
        support_x=imgs[:, :shots].reshape(ways * shots, h, w, c),
        support_y=jnp.repeat(labels, shots),
        query_x=imgs[:, shots:].reshape(ways * queries, h, w, c),
        query_y=jnp.repeat(labels, queries),
        class_ids=classes.astype(jnp.int32),
    )


def sample_tasks(
    pool: ImagePool, rng: jax.Array, ways: int, shots: int, queries: int, num_tasks: int
) -> Tasks:
    """``num_tasks`` independent tasks, leading axis T. Pure: the same rng gives the same tasks."""
    keys = jax.random.split(rng, num_tasks)
    return jax.vmap(lambda k: sample_task(pool, k, ways, shots, queries))(keys)


def to_float(x: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]."""
    return x.astype(jnp.float32) / 255.0


def random_shift(rng: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image [..., H, W, C] by up to ``max_shift`` pixels (zero fill)."""
    lead = x.shape[:-3]
    h, w, c = x.shape[-3:]
    flat = x.reshape((-1, h, w, c))
    pad = jnp.pad(flat, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offs = jax.random.randint(rng, (flat.shape[0], 2), 0, 2 * max_shift + 1)

    def crop(img, o):
        return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))

    return jax.vmap(crop)(pad, offs).reshape(lead + (h, w, c))


def random_flip(rng: jax.Array, x: jax.Array) -> jax.Array:
    """Mirror each image [..., H, W, C] left-right with probability 1/2."""
    lead = x.shape[:-3]
    flip = jax.random.bernoulli(rng, 0.5, lead)[..., None, None, None]
    return jnp.where(flip, x[..., ::-1, :], x)


def color_jitter(rng: jax.Array, x: jax.Array, strength: float) -> jax.Array:
    """Brightness, contrast and saturation jitter (torchvision ``ColorJitter(s, s, s)``, fixed
    order) of float images [..., H, W, 3] in [0, 1]; each factor uniform in [1 - s, 1 + s]."""
    lead = x.shape[:-3]
    f = jax.random.uniform(
        rng, (3,) + lead + (1, 1, 1), x.dtype, minval=1 - strength, maxval=1 + strength
    )
    gray = lambda a: (a @ jnp.array([0.299, 0.587, 0.114], a.dtype))[..., None]
    x = jnp.clip(x * f[0], 0.0, 1.0)  # brightness
    mean = gray(x).mean(axis=(-3, -2, -1), keepdims=True)
    x = jnp.clip(mean + f[1] * (x - mean), 0.0, 1.0)  # contrast
    g = gray(x)
    return jnp.clip(g + f[2] * (x - g), 0.0, 1.0)  # saturation


AUGMENTS = ("none", "shift", "crop_flip", "crop_flip_jitter")


def prepare_tasks(tasks: Tasks, rng: jax.Array, augment: str, shift: int) -> Tasks:
    """uint8 -> float and training augmentation, inside the jitted step.

    ``shift``: random translation by up to ``shift`` pixels (zero fill). ``crop_flip``: random crop
    with zero padding ``shift`` (the same thing) and a random horizontal flip, per image (the MTL /
    MetaOptNet recipe); ``crop_flip_jitter`` adds colour jitter 0.4 (brightness, contrast,
    saturation) to RGB images.
    """
    sx, qx = to_float(tasks.support_x), to_float(tasks.query_x)
    if augment == "shift":
        k1, k2 = jax.random.split(rng)
        sx, qx = random_shift(k1, sx, shift), random_shift(k2, qx, shift)
    elif augment in ("crop_flip", "crop_flip_jitter"):
        ks = jax.random.split(rng, 6)
        sx, qx = random_shift(ks[0], sx, shift), random_shift(ks[1], qx, shift)
        sx, qx = random_flip(ks[2], sx), random_flip(ks[3], qx)
        if augment == "crop_flip_jitter" and sx.shape[-1] == 3:
            sx, qx = color_jitter(ks[4], sx, 0.4), color_jitter(ks[5], qx, 0.4)
    elif augment != "none":
        raise ValueError(f"data.augment={augment!r}; choose one of {AUGMENTS}")
    return tasks._replace(support_x=sx, query_x=qx)
