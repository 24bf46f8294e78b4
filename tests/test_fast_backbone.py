"""Every Conv4 implementation computes the reference function: features, BatchNorm state updates
and gradients, in training (batch statistics) and at test (running statistics), for any sign of
the BatchNorm scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_gbml import models
from mtl_gbml.base_config import get_config
from mtl_gbml.models.conv4 import BLOCKS, CONV_IMPLS

VARIANTS = [(c, b, 0) for c in CONV_IMPLS for b in BLOCKS if (c, b) != ("xla", "reference")]
VARIANTS += [("xla", "fused", 4), ("im2col_first", "fused", 3)]  # chunked first block (6 images)


def _model(pool_last, **kw):
    c = get_config("mtl").model
    c.update(width=8, pool_last=pool_last, **kw)
    return models.build(c)


def _setup(pool_last):
    ref = _model(pool_last, conv_impl="xla", block="reference", chunk_first=0)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 28, 28, 1))
    params, state = models.init(ref, jax.random.PRNGKey(1), x)
    # mixed-sign BatchNorm scales: the fused block must pool by min where the scale is negative
    signs = jnp.where(jnp.arange(8) % 3 == 0, -1.0, 1.0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * signs if "scale" in jax.tree_util.keystr(p) else v, params
    )
    _, state = models.forward(ref, params, state, 0.5 * x + 0.3, train=True)  # non-trivial stats
    return ref, params, state, x


def _loss(model, params, state, x):
    feats, new_state = models.forward(model, params, state, x, train=True)
    w = jnp.sin(jnp.arange(feats.shape[-1], dtype=jnp.float32))
    return jnp.sum(jnp.tanh(feats) * w), new_state


@pytest.mark.parametrize("pool_last", [True, False])
@pytest.mark.parametrize("conv_impl,block,chunk_first", VARIANTS)
def test_variant_equals_reference(conv_impl, block, chunk_first, pool_last):
    ref, params, state, x = _setup(pool_last)
    fast = _model(pool_last, conv_impl=conv_impl, block=block, chunk_first=chunk_first)
    # same parameter and state trees: checkpoints are interchangeable
    p2, s2 = models.init(fast, jax.random.PRNGKey(1), x)
    assert jax.tree.structure(p2) == jax.tree.structure(params)
    assert jax.tree.structure(s2) == jax.tree.structure(state)

    (l_ref, st_ref), g_ref = jax.value_and_grad(_loss, 1, has_aux=True)(ref, params, state, x)
    (l_new, st_new), g_new = jax.value_and_grad(_loss, 1, has_aux=True)(fast, params, state, x)
    np.testing.assert_allclose(l_new, l_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), st_new, st_ref
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4), g_new, g_ref)
    for bn_mode in models.BN_MODES:
        f_ref, _ = models.forward(ref, params, state, x, train=False, bn_mode=bn_mode)
        f_new, _ = models.forward(fast, params, state, x, train=False, bn_mode=bn_mode)
        np.testing.assert_allclose(f_new, f_ref, rtol=1e-4, atol=1e-5)


def test_unknown_implementation_is_named():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="model.block"):
        models.init(_model(True, block="nope"), jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="model.conv_impl"):
        models.init(_model(True, conv_impl="nope"), jax.random.PRNGKey(0), x)


def test_chunked_first_block_is_exact_to_second_order():
    """MAML differentiates through the inner gradient and iMAML takes Hessian-vector products: the
    chunked first block's custom VJP must give the reference block's Hessian-vector product."""
    ref, params, state, x = _setup(True)
    fast = _model(True, conv_impl="xla", block="fused", chunk_first=4)
    v = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params
    )

    def hvp(model, forward_over_reverse):
        grad = jax.grad(lambda p: _loss(model, p, state, x)[0])
        if forward_over_reverse:  # the reference, by JAX's own rules
            return jax.jvp(grad, (params,), (v,))[1]
        return jax.vjp(grad, params)[1](v)[0]

    h_ref = hvp(ref, True)
    h_new = hvp(fast, False)
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(h_ref))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * scale), h_new, h_ref
    )
    # the first block's kernel gets second-order terms (else the test would not test the block)
    k = h_ref["Conv3x3_0"]["Conv_0"]["kernel"]
    assert float(jnp.abs(k).max()) > 1e-3 * scale


def test_chunked_first_block_input_gradient():
    """The custom VJP's input cotangent (unused in training, where inputs are data) is exact."""
    from mtl_gbml.models.conv4 import first_conv_pool, max_pool_2x2

    x = jax.random.normal(jax.random.PRNGKey(3), (5, 6, 8, 1))
    k = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 1, 4))
    b = jnp.arange(4.0) / 10
    s = jnp.array([1.0, -1.0, 1.0, -1.0])

    def ref(x, k, b):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return max_pool_2x2((y + b) * s) * s

    g = jax.random.normal(jax.random.PRNGKey(5), (5, 3, 4, 4))
    for chunk in (2, 5):
        new = lambda x, k, b, chunk=chunk: first_conv_pool(x, k, b, s, chunk)
        np.testing.assert_allclose(new(x, k, b), ref(x, k, b), rtol=1e-6, atol=1e-6)
        d_ref = jax.vjp(ref, x, k, b)[1](g)
        d_new = jax.vjp(new, x, k, b)[1](g)
        for a, r in zip(d_new, d_ref, strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_chunk_first_auto_is_64_on_cpu_and_given_values_pass_through():
    from mtl_gbml.models import CPU_CHUNK_FIRST, resolve_chunk_first

    assert get_config("mtl").model.chunk_first == -1
    assert resolve_chunk_first(-1) == (CPU_CHUNK_FIRST if jax.default_backend() == "cpu" else 0)
    assert resolve_chunk_first(0) == 0 and resolve_chunk_first(16) == 16
    with pytest.raises(ValueError, match="model.chunk_first=-3"):
        resolve_chunk_first(-3)


def test_chunked_first_block_drops_the_input_gradient_when_unused():
    """Training differentiates the parameters only: the custom VJP's input cotangent (a full-map
    transposed convolution) must be removed from the compiled program, not computed and dropped."""
    from mtl_gbml.models.conv4 import first_conv_pool

    x, k = jnp.ones((8, 28, 28, 1)), jnp.ones((3, 3, 1, 4))
    b, s = jnp.zeros(4), jnp.ones(4)

    def convolutions(f, *args):
        return (
            jax.jit(jax.grad(f, tuple(range(len(args)))))
            .lower(*args)
            .compile()
            .as_text()
            .count(" convolution(")
        )

    assert convolutions(lambda k, b: jnp.sum(first_conv_pool(x, k, b, s, 4) ** 2), k, b) == 0
    assert convolutions(lambda x: jnp.sum(first_conv_pool(x, k, b, s, 4) ** 2), x) == 1


def test_chunked_first_block_statistics_are_the_conv_outputs_biased_moments():
    """On a map so small that the divisor matters (2 images of 4x4: 32 pixels), the closed-form
    mean and variance are those of the explicit convolution's output over (n, H, W), divided by
    the pixel count as BatchNorm does (ddof=0), and the pooled map is the explicit one."""
    from mtl_gbml.models.conv4 import chunked_first_block

    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 1))
    kernel = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 1, 5))
    bias = jnp.linspace(-1.0, 1.0, 5)
    s = jnp.array([1.0, -1.0, 1.0, 1.0, -1.0])
    pooled, mean, var = chunked_first_block(x, kernel, bias, s, chunk=1)
    y = np.asarray(
        jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    ) + np.asarray(bias)
    np.testing.assert_allclose(mean, y.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, y.var((0, 1, 2), ddof=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(var, y.var((0, 1, 2), ddof=1), rtol=1e-3)  # 32/31: distinguishable
    windows = (y * np.asarray(s)).reshape(2, 2, 2, 2, 2, 5).max((2, 4)) * np.asarray(s)
    np.testing.assert_allclose(pooled, windows, rtol=1e-5, atol=1e-6)
