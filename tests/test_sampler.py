"""Episode sampler: fixed shapes, determinism in rng, label -> class bijection, rotations,
uniform draws without replacement, and the augmentations (shift offsets, left-right flips)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from mtl_gbml.data.sampler import (
    Tasks,
    distinct_integers,
    make_pool,
    prepare_tasks,
    random_flip,
    random_shift,
    sample_indices,
    sample_tasks,
    smallest_k,
)


def _coded_pool(num_classes=30, per_class=6, rotations=False):
    """Each image encodes (class, index) in its pixels, so a task can be decoded independently."""
    imgs, labels = [], []
    for c in range(num_classes):
        for i in range(per_class):
            img = np.zeros((8, 8, 1), np.uint8)
            img[0, 0, 0], img[0, 1, 0] = c, i
            img[0, 2, 0] = 200  # a marker that rotation moves
            imgs.append(img)
            labels.append(1000 + 7 * c)  # arbitrary ids: the pool must not rely on 0..C-1
    return make_pool(np.stack(imgs), np.array(labels), rotations=rotations)


def test_shapes_and_label_bijection():
    pool = _coded_pool()
    t = sample_tasks(pool, jax.random.PRNGKey(0), ways=5, shots=2, queries=3, num_tasks=7)
    assert t.support_x.shape == (7, 10, 8, 8, 1) and t.query_x.shape == (7, 15, 8, 8, 1)
    assert t.class_ids.shape == (7, 5)
    sx, sy, qx, qy, cids = map(np.asarray, t)
    for task in range(7):
        assert len(set(cids[task])) == 5  # distinct classes
        # decode the true class of every image from its pixels: it must be class_ids[label]
        for x, y in ((sx[task], sy[task]), (qx[task], qy[task])):
            true_class = x[:, 0, 0, 0]
            np.testing.assert_array_equal(true_class, cids[task][y])
        # label -> class is a bijection: each label has exactly one class and vice versa
        pairs = {(int(a), int(b)) for a, b in zip(sy[task], sx[task][:, 0, 0, 0], strict=True)}
        assert (
            len(pairs) == 5 and len({a for a, _ in pairs}) == 5 and len({b for _, b in pairs}) == 5
        )
        # support and query images of a class are distinct images
        for c in range(5):
            s_idx = set(sx[task][sy[task] == c][:, 0, 1, 0])
            q_idx = set(qx[task][qy[task] == c][:, 0, 1, 0])
            assert len(s_idx) == 2 and len(q_idx) == 3 and not (s_idx & q_idx)


def test_deterministic_in_rng():
    pool = _coded_pool()
    a = sample_tasks(pool, jax.random.PRNGKey(3), 5, 1, 2, 4)
    b = sample_tasks(pool, jax.random.PRNGKey(3), 5, 1, 2, 4)
    c = sample_tasks(pool, jax.random.PRNGKey(4), 5, 1, 2, 4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.class_ids, c.class_ids)


def test_rotated_classes_are_rotated_copies():
    pool = _coded_pool(num_classes=3, rotations=True)
    assert pool.num_classes == 12
    t = sample_tasks(pool, jax.random.PRNGKey(1), ways=12, shots=1, queries=0, num_tasks=1)
    for img, cid in zip(np.asarray(t.support_x[0]), np.asarray(t.class_ids[0]), strict=True):
        base = np.zeros((8, 8), np.uint8)
        base[0, 2] = 200
        expect = np.rot90(base, cid % 4)
        np.testing.assert_array_equal(img[..., 0] == 200, expect == 200)


def test_variable_images_per_class_never_pads():
    imgs = np.arange(13, dtype=np.uint8).reshape(13, 1, 1, 1).repeat(2, 1).repeat(2, 2)
    labels = np.array([0] * 3 + [1] * 10)
    pool = make_pool(imgs, labels)
    for s in range(20):
        t = sample_tasks(pool, jax.random.PRNGKey(s), 2, 1, 2, 1)
        vals = np.concatenate([t.support_x[0, :, 0, 0, 0], t.query_x[0, :, 0, 0, 0]])
        cls = np.concatenate([t.class_ids[0][t.support_y[0]], t.class_ids[0][t.query_y[0]]])
        assert np.all((vals < 3) == (cls == 0))  # class 0 only ever draws its own 3 images
        assert len(set(vals[cls == 0])) == 3


def test_random_shift_is_a_translation():
    x = jnp.zeros((4, 10, 10, 1)).at[:, 5, 5, 0].set(1.0)
    y = random_shift(jax.random.PRNGKey(0), x, 2)
    assert float(y.sum()) == 4.0  # the centre pixel moved, nothing was lost
    pos = np.argwhere(np.asarray(y[..., 0]) == 1.0)[:, 1:]
    assert np.all(np.abs(pos - 5) <= 2)


def test_random_shift_draws_every_offset_up_to_max_shift_uniformly():
    x = jnp.zeros((2500, 10, 10, 1)).at[:, 5, 5, 0].set(1.0)
    y = np.asarray(random_shift(jax.random.PRNGKey(1), x, 2)[..., 0])
    pos = np.argwhere(y == 1.0)
    assert len(pos) == len(x)  # one marker per image, inside it
    offsets = (pos[:, 1] - 5 + 2) * 5 + (pos[:, 2] - 5 + 2)  # (dy, dx) in [-2, 2]^2 -> 0..24
    counts = np.bincount(offsets, minlength=25)
    assert len(counts) == 25 and counts.min() > 0
    assert chisquare(counts).pvalue > 1e-3


def _marked(n, h=4, w=6):
    """uint8 images [n, h, w, 1], each marked at row 1, column 0."""
    return jnp.zeros((n, h, w, 1), jnp.uint8).at[:, 1, 0, 0].set(255)


def _mirrored(x):
    """Per image: True if the row-1 marker sits at the right edge, False at the left; anything
    else (another row: a vertical flip) fails."""
    x = np.asarray(x[..., 0])
    left, right = x[:, 1, 0] > 0, x[:, 1, -1] > 0
    assert np.all(left ^ right) and x.sum() == x[:, 1].sum(), "marker left row 1 or vanished"
    return right


def test_random_flip_mirrors_left_right_about_half_the_images():
    flipped = _mirrored(random_flip(jax.random.PRNGKey(0), _marked(400)))
    assert 0.4 < flipped.mean() < 0.6  # binomial(400, 1/2): sd 0.025


def test_crop_flip_augments_support_and_query_images_alike():
    x = _marked(200).reshape(2, 100, 4, 6, 1)  # two tasks of 100 images
    y = jnp.zeros((2, 100), jnp.int32)
    tasks = Tasks(x, y, x, y, jnp.zeros((2, 1), jnp.int32))
    out = prepare_tasks(tasks, jax.random.PRNGKey(3), "crop_flip", 0)
    flips = {}
    for name in ("support_x", "query_x"):
        flips[name] = _mirrored(getattr(out, name).reshape(200, 4, 6, 1))
        assert 0.35 < flips[name].mean() < 0.65, name  # binomial(200, 1/2): sd 0.035
    # the same images in both sets, flipped independently (one key for both would match them)
    assert not np.array_equal(flips["support_x"], flips["query_x"])


def test_smallest_k_is_the_stable_argsort_prefix():
    """top_k of the negated keys == the first k of a stable argsort, ties (to the lower index)
    included: coarse keys make ties the rule, not the exception."""
    rng = np.random.default_rng(0)
    for shape in ((7,), (50,), (300, 20), (40, 1692)):
        coarse = jnp.asarray(rng.integers(0, 5, size=shape).astype(np.float32) / 4)
        fine = jnp.asarray(rng.random(shape, dtype=np.float32))
        for keys in (coarse, fine, jnp.where(coarse > 0.5, 2.0, fine)):
            for k in {1, 3, shape[-1] // 2, shape[-1]}:
                expect = np.asarray(jnp.argsort(keys, axis=-1, stable=True)[..., :k])
                np.testing.assert_array_equal(np.asarray(smallest_k(keys, k)), expect)
                np.testing.assert_array_equal(
                    np.asarray(jax.jit(smallest_k, static_argnums=1)(keys, k)), expect
                )


def _ordered_frequencies(draws: np.ndarray, n: int, k: int) -> np.ndarray:
    index = {t: i for i, t in enumerate(itertools.permutations(range(n), k))}
    return np.bincount([index[tuple(d)] for d in draws], minlength=len(index))


@pytest.mark.parametrize("n,k", [(6, 3), (4, 4), (7, 1), (5, 2)])
def test_distinct_integers_every_ordered_tuple_equally_likely(n, k):
    """Against the exact answer: each of the n!/(n-k)! ordered tuples has the same probability
    (k = n: every permutation; small n, so Floyd's 'taken already' branch is the common one)."""
    cells = len(list(itertools.permutations(range(n), k)))
    keys = jax.random.split(jax.random.PRNGKey(n * 10 + k), 100 * cells)
    draws = np.asarray(jax.jit(jax.vmap(lambda r: distinct_integers(r, n, k)))(keys))
    assert draws.shape == (100 * cells, k) and draws.min() >= 0 and draws.max() < n
    assert all(len(set(d)) == k for d in draws)
    assert chisquare(_ordered_frequencies(draws, n, k)).pvalue > 1e-3


def test_distinct_integers_at_omniglot_scale():
    """20 of the 1,692 test classes: distinct, in range, each class drawn equally often and at
    each of the 20 places equally often."""
    n, k, m = 1692, 20, 4000
    keys = jax.random.split(jax.random.PRNGKey(7), m)
    draws = np.asarray(jax.jit(jax.vmap(lambda r: distinct_integers(r, n, k)))(keys))
    assert all(len(set(d)) == k for d in draws) and draws.min() >= 0 and draws.max() < n
    assert chisquare(np.bincount(draws.ravel(), minlength=n)).pvalue > 1e-3
    # the place a class lands at: uniform over the 20 places (low classes, high classes alike)
    for block in (draws < 100, draws >= n - 100):
        assert chisquare(block.sum(0)).pvalue > 1e-3, block.sum(0)


def test_distinct_integers_refuses_more_than_there_are():
    with pytest.raises(ValueError, match="cannot draw 6 distinct integers from 5"):
        distinct_integers(jax.random.PRNGKey(0), 5, 6)
    assert distinct_integers(jax.random.PRNGKey(0), 5, 0).shape == (0,)


def test_draws_are_uniform_without_replacement():
    """Against the exact answer: every ordered choice of 3 of 8 classes is equally likely
    (336 of them), and every 2 of a 3-image class's positions likewise (6), never a padded one."""
    counts = jnp.asarray([3, 5, 5, 5, 4, 5, 5, 5], jnp.int32)
    n = 33600
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    classes, pos = jax.jit(jax.vmap(lambda k: sample_indices(k, counts, 5, 3, 2)))(keys)
    classes, pos = np.asarray(classes), np.asarray(pos)
    assert all(len(set(c)) == 3 for c in classes)  # without replacement
    assert np.all(pos < np.asarray(counts)[classes][..., None])  # never a padded position
    assert np.all(pos[..., 0] != pos[..., 1])
    ordered = {t: i for i, t in enumerate(itertools.permutations(range(8), 3))}
    freq = np.bincount([ordered[tuple(c)] for c in classes], minlength=len(ordered))
    assert chisquare(freq).pvalue > 1e-3, freq
    # positions drawn for class 0 (3 images), at whichever label it was drawn
    pairs = {t: i for i, t in enumerate(itertools.permutations(range(3), 2))}
    of0 = pos[classes == 0]
    freq = np.bincount([pairs[tuple(p)] for p in of0], minlength=len(pairs))
    assert len(of0) > 3000 and chisquare(freq).pvalue > 1e-3, freq
