"""Backbones: BatchNorm modes, equivalent convolution/pooling implementations, shapes, ResNet-12
against a numpy reference, DropBlock, bfloat16 and rematerialisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtl_gbml import models
from mtl_gbml.base_config import get_config
from mtl_gbml.models.conv4 import Conv4, max_pool_2x2


def _conv4(**kw):
    c = get_config("mtl").model
    c.update(kw)
    return models.build(c)


def test_bn_modes_differ_where_they_should():
    model = _conv4(width=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 28, 28, 1))
    params, state = models.init(model, jax.random.PRNGKey(1), x)
    # give the running statistics values unlike this batch's
    _, state = models.forward(model, params, state, x + 3.0, train=True)
    ind, _ = models.forward(model, params, state, x, train=False, bn_mode="inductive")
    tra, _ = models.forward(model, params, state, x, train=False, bn_mode="transductive")
    assert not np.allclose(ind, tra, atol=1e-3)
    # inductive: one image's features do not depend on the rest of the batch
    ind_one, _ = models.forward(model, params, state, x[:1], train=False, bn_mode="inductive")
    np.testing.assert_allclose(ind_one[0], ind[0], rtol=1e-4, atol=1e-5)
    # transductive: they do
    tra_one, _ = models.forward(model, params, state, x[:3], train=False, bn_mode="transductive")
    assert not np.allclose(tra_one[0], tra[0], atol=1e-3)
    # transductive at test equals training-mode features (batch statistics), state untouched
    trn, _ = models.forward(model, params, state, x, train=True)
    np.testing.assert_allclose(tra, trn, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="bn_mode"):
        models.forward(model, params, state, x, train=False, bn_mode="both")


def test_running_statistics_update_in_training_only():
    model = _conv4(width=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 28, 28, 1))
    params, state = models.init(model, jax.random.PRNGKey(1), x)
    _, s_train = models.forward(model, params, state, x, train=True)
    _, s_test = models.forward(model, params, state, x, train=False, bn_mode="transductive")
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state, s_train)
    assert all(jax.tree.leaves(changed))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, state, s_test)))


def test_reshape_max_pool_equals_flax_max_pool():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 7, 5))
    np.testing.assert_array_equal(
        max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    )


def test_im2col_convolution_matches_xla():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
    a, b = Conv4(width=8, conv_impl="xla"), Conv4(width=8, conv_impl="im2col")
    va = a.init(jax.random.PRNGKey(1), x, train=False, use_batch_stats=False)
    vb = b.init(jax.random.PRNGKey(1), x, train=False, use_batch_stats=False)
    # same weights (leaves in the same order: bias, kernel, BatchNorm per block)
    leaves_a, leaves_b = jax.tree.leaves(va), jax.tree.leaves(vb)
    vb = jax.tree.unflatten(
        jax.tree.structure(vb),
        [a.reshape(b.shape) for a, b in zip(leaves_a, leaves_b, strict=True)],
    )
    fa = a.apply(va, x, train=False, use_batch_stats=True, mutable=["batch_stats"])[0]
    fb = b.apply(vb, x, train=False, use_batch_stats=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool_last,dim", [(True, 8), (False, 72)])
def test_conv4_feature_dims(pool_last, dim):
    model = _conv4(width=8, pool_last=pool_last)
    x = jnp.zeros((2, 28, 28, 1))
    params, state = models.init(model, jax.random.PRNGKey(0), x)
    assert models.forward(model, params, state, x, train=False)[0].shape == (2, dim)


def test_resnet12_shapes_and_dropblock():
    c = ml_collections.ConfigDict(get_config("mtl").model.to_dict())
    c.name, c.resnet_widths = "resnet12", (4, 6, 8, 10)
    model = models.build(c)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params, state = models.init(model, jax.random.PRNGKey(1), x)
    f0, _ = models.forward(model, params, state, x, train=True, rng=jax.random.PRNGKey(2))
    f1, _ = models.forward(model, params, state, x, train=True, rng=jax.random.PRNGKey(3))
    assert f0.shape == (2, 10)
    assert not np.allclose(f0, f1)  # DropBlock is random in training
    e0, _ = models.forward(model, params, state, x, train=False)
    e1, _ = models.forward(model, params, state, x, train=False)
    np.testing.assert_array_equal(e0, e1)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model.name='conv5' is unknown"):
        _conv4(name="conv5")


def _dropblock_expected_fraction(h, bs, rate):
    """DropBlock's expected dropped fraction on an h x h map: seeds with probability gamma =
    rate / bs^2 * h^2 / (h - bs + 1)^2 at the (h - bs + 1)^2 positions where a block fits; a
    position covered by k of them is dropped with probability 1 - (1 - gamma)^k. It is the rate
    when blocks cannot overlap (h == bs, or bs == 1) and a little less otherwise."""
    v = h - bs + 1
    gamma = rate / bs**2 * h * h / v**2
    k1 = np.array([min(p, v - 1) - max(0, p - bs + 1) + 1 for p in range(h)])
    return float(np.mean(1 - (1 - gamma) ** (k1[:, None] * k1[None, :])))


@pytest.mark.parametrize(
    "h,bs",
    [
        (5, 5),  # mini/tiered-ImageNet's last block (84 -> 5x5), dropblock_size 5
        (2, 2),  # CIFAR-FS/FC100's last block (32 -> 2x2), dropblock_size 2
        (10, 5),  # mini-ImageNet's third block
        (8, 2),
        (6, 1),
    ],
)
def test_dropblock_drops_the_rate_in_whole_blocks_and_rescales_the_rest(h, bs):
    """On ones, Monte-Carlo over 4096 maps: every output is 0 (dropped) or N / kept (the survivors
    rescaled so the mean stays 1); the dropped positions of each map are a union of whole
    bs x bs blocks inside it; the dropped fraction is the expected one, within 5 binomial standard
    errors over maps (a conservative bound: a map's dropped fraction varies less than one
    Bernoulli), and that is the rate where blocks cannot overlap (h == bs, bs == 1), within 7% of
    it otherwise. Evaluation leaves x alone."""
    from mtl_gbml.models.resnet12 import DropBlock

    rate, n, c = 0.1, 64, 64
    x = jnp.ones((n, h, h, c))
    layer = DropBlock(rate=rate, block_size=bs)
    y = np.asarray(layer.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(h + bs)}))
    kept = y > 0
    np.testing.assert_allclose(y[kept], kept.size / kept.sum(), rtol=1e-5)
    assert y.mean() == pytest.approx(1.0, rel=1e-5)
    dropped = np.moveaxis(~kept, 3, 1).reshape(n * c, h, h)
    # whole blocks: the blocks inside the map that are all dropped cover every dropped position
    win = np.lib.stride_tricks.sliding_window_view(dropped, (bs, bs), axis=(1, 2))
    full = win.all(axis=(3, 4)).astype(np.uint8)  # [maps, h - bs + 1, h - bs + 1]
    padded = np.pad(full, ((0, 0), (bs - 1, bs - 1), (bs - 1, bs - 1)))
    covered = np.lib.stride_tricks.sliding_window_view(padded, (bs, bs), axis=(1, 2)).any((3, 4))
    np.testing.assert_array_equal(covered, dropped)
    want = _dropblock_expected_fraction(h, bs, rate)
    if h == bs or bs == 1:
        assert want == pytest.approx(rate, rel=1e-9)
    assert abs(want - rate) < 0.07 * rate
    se = np.sqrt(want * (1 - want) / (n * c))
    assert abs(dropped.mean() - want) < 5 * se, (dropped.mean(), want, se)
    np.testing.assert_array_equal(np.asarray(layer.apply({}, x, train=False)), np.asarray(x))


def test_dropblock_scale_multiplies_the_rate():
    """The ramp's ``scale`` (a traced fraction in training) scales the dropped fraction."""
    from mtl_gbml.models.resnet12 import DropBlock

    x = jnp.ones((64, 5, 5, 64))
    layer = DropBlock(rate=0.2, block_size=5)
    f = jax.jit(lambda s: layer.apply({}, x, train=True, scale=s, rngs={"dropout": key}))
    key = jax.random.PRNGKey(0)
    for scale in (0.25, 1.0):
        frac = float((np.asarray(f(scale)) == 0).mean())
        want = 0.2 * scale
        assert abs(frac - want) < 5 * np.sqrt(want * (1 - want) / 4096), (scale, frac)


def _np_resnet12(params, x, avg_pool=True):
    """ResNet-12 in numpy from the paper's description (Lee et al. 2019): per block three
    conv3x3-BN layers with LeakyReLU(0.1) after the first two, a conv1x1-BN shortcut, LeakyReLU(0.1)
    of the sum, 2x2 max-pool; BatchNorm on the batch's biased statistics; global average pool (or,
    MetaOptNet's, the last map flattened: every position's channels in turn)."""

    def conv(h, k):  # 'SAME', stride 1, no bias
        p = k.shape[0] // 2
        hp = np.pad(h, ((0, 0), (p, p), (p, p), (0, 0)))
        win = np.lib.stride_tricks.sliding_window_view(hp, k.shape[:2], axis=(1, 2))
        return np.einsum("nhwcij,ijco->nhwo", win, k)

    def bn(h, p):
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        return (h - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    def leaky(h):
        return np.where(h > 0, h, 0.1 * h)

    h = np.asarray(x, np.float64)
    for b in range(4):
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params[f"ResBlock_{b}"])
        y = h
        for i in range(3):
            y = bn(conv(y, p[f"Conv_{i}"]["kernel"]), p[f"BatchNorm_{i}"])
            y = leaky(y) if i < 2 else y
        y = leaky(y + bn(conv(h, p["Conv_3"]["kernel"]), p["BatchNorm_3"]))
        n, hh, ww, c = y.shape
        h = y.reshape(n, hh // 2, 2, ww // 2, 2, c).max((2, 4))
    if not avg_pool:
        return np.stack([h[i].reshape(-1) for i in range(len(h))])
    return h.mean((1, 2))


@pytest.mark.parametrize("avg_pool", [True, False])
def test_resnet12_matches_a_numpy_reference(avg_pool):
    from mtl_gbml.models.resnet12 import ResNet12

    model = ResNet12(widths=(3, 4, 5, 6), avg_pool=avg_pool)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))  # a 2x2 last map, as CIFAR's
    # random values for every variable, from the init's shapes (compiling the init costs ~10 s):
    # kernels scaled to keep activations O(1), BatchNorm scales and biases away from 1 and 0
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(1), x, train=False, use_batch_stats=True)
    )
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_map_with_path(
        lambda path, s: np.float32(
            rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
            if "kernel" in jax.tree_util.keystr(path)
            else rng.normal(size=s.shape) * 0.5 + ("scale" in jax.tree_util.keystr(path))
        ),
        shapes,
    )
    params = v["params"]
    apply = jax.jit(
        lambda v, x: model.apply(v, x, train=False, use_batch_stats=True, mutable=["batch_stats"])
    )
    got, _ = apply(v, x)
    assert got.shape == (3, 6 if avg_pool else 6 * 2 * 2)
    np.testing.assert_allclose(got, _np_resnet12(params, x, avg_pool), rtol=1e-4, atol=1e-5)


def test_resnet12_regularisation_is_metaoptnets():
    """As in MetaOptNet and the MTL code: dropout (rate drop_rate) after blocks 1 and 2,
    DropBlock (rate drop_rate, block size dropblock_size) after blocks 3 and 4."""
    from mtl_gbml.models.resnet12 import DropBlock, ResNet12

    seen = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Dropout | DropBlock) and context.method_name == "__call__":
            size = m.block_size if isinstance(m, DropBlock) else None
            seen.append((m.parent.name, type(m).__name__, m.rate, size))
        return next_fun(*args, **kwargs)

    model = ResNet12(widths=(2, 2, 2, 2), drop_rate=0.3, dropblock_size=3)
    x = jnp.ones((1, 32, 32, 3))
    with nn.intercept_methods(record):  # tracing is enough: nothing compiles or runs
        jax.eval_shape(
            lambda: model.init(
                {"params": jax.random.PRNGKey(0)}, x, train=True, use_batch_stats=True
            )
        )
    assert seen == [
        ("ResBlock_0", "Dropout", 0.3, None),
        ("ResBlock_1", "Dropout", 0.3, None),
        ("ResBlock_2", "DropBlock", 0.3, 3),
        ("ResBlock_3", "DropBlock", 0.3, 3),
    ]


def test_resnet12_dropout_is_active_in_the_first_blocks():
    """Block 1's output in training: dropout at rate drop_rate (about half of it zero at 0.5,
    the rest doubled, against the same block in evaluation mode, both on batch statistics)."""
    from mtl_gbml.models.resnet12 import ResNet12

    model = ResNet12(widths=(8, 2, 2), drop_rate=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 3))
    v = model.init(jax.random.PRNGKey(1), x, train=False, use_batch_stats=False)
    block = lambda train: model.apply(
        v,
        x,
        train=train,
        use_batch_stats=True,
        rngs={"dropout": jax.random.PRNGKey(2)},
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda m, _: m.name == "ResBlock_0",
    )[1]["intermediates"]["ResBlock_0"]["__call__"][0]
    on, off = np.asarray(block(True)), np.asarray(block(False))
    zeros = on == 0
    assert abs(zeros.mean() - 0.5) < 0.05 and not (off == 0).any()
    np.testing.assert_allclose(on[~zeros], 2 * off[~zeros], rtol=1e-5)


def test_resnet12_conv_init_is_kaiming_normal_fan_out():
    """torch's kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu'): every convolution
    (3x3 and the 1x1 shortcut) ~ N(0, 2 / (out * kh * kw)), not truncated (a truncated normal has
    no value beyond 2 standard deviations; here 4.6% of them are)."""
    from mtl_gbml.models.resnet12 import ResNet12

    model = ResNet12(widths=(32, 48))
    x = jnp.ones((1, 8, 8, 16))
    params = model.init(jax.random.PRNGKey(0), x, train=False, use_batch_stats=False)["params"]
    kernels = [
        np.asarray(k)
        for path, k in jax.tree_util.tree_leaves_with_path(params)
        if "kernel" in jax.tree_util.keystr(path)
    ]
    assert len(kernels) == 8
    for k in kernels:
        std = np.sqrt(2.0 / (k.shape[-1] * k.shape[0] * k.shape[1]))
        z = k / std
        n = z.size
        assert abs(z.mean()) < 5 / np.sqrt(n), k.shape
        assert abs(z.var() - 1) < 5 * np.sqrt(2 / n), (k.shape, z.var())
        if n >= 1000:
            assert (np.abs(z) > 2).mean() > 0.03, k.shape


def test_resnet12_bfloat16_and_remat_forward_backward():
    """bf16 compute (float32 parameters), with and without remat: finite loss and gradients,
    features close to float32's; remat gives float32's gradients for the same parameters."""
    cfg = get_config("mtl").model  # the cifar_fs runlocal configs' tiny ResNet-12
    cfg.update(name="resnet12", resnet_widths=(8, 8, 8, 8), dropblock_size=2)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    base = None
    results = {}
    for dtype, remat in (
        ("float32", False),
        ("bfloat16", False),
        ("bfloat16", True),
        ("float32", True),
    ):
        cfg.dtype, cfg.remat = dtype, remat
        model = models.build(cfg)
        params, state = models.init(model, jax.random.PRNGKey(1), x)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        if base is None:
            base = params
        # remat renames the blocks (CheckpointResBlock_i): use the same values under its names
        params = dict(zip(sorted(params), (base[k] for k in sorted(base)), strict=True))

        def loss(p, model=model, state=state, train=False):
            # batch statistics without DropBlock: deterministic, so the runs are comparable
            kw = {"train": True, "rng": jax.random.PRNGKey(2)} if train else {"train": False}
            f, _ = models.forward(model, p, state, x, bn_mode="transductive", **kw)
            return jnp.mean(f**2), f

        (val, f), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        assert f.dtype == jnp.float32 and np.isfinite(float(val))
        assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g))
        results[(dtype, remat)] = np.asarray(f), [np.asarray(v) for v in jax.tree.leaves(g)]
        if dtype == "bfloat16" and remat:  # the training path too (DropBlock on)
            grad_fn = jax.jit(jax.grad(lambda p: loss(p, train=True)[0]))
            g = grad_fn(params)
            assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g))
    f32, g32 = results[("float32", False)]
    for key in (("bfloat16", False), ("bfloat16", True)):
        f = results[key][0]
        assert np.abs(f - f32).max() / np.abs(f32).max() < 0.05, key
    for a, b in zip(g32, results[("float32", True)][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
