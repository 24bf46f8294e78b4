"""Conv4: four blocks of conv3x3(width)-BatchNorm-ReLU-maxpool2 (Vinyals et al. 2016, Snell et al. 2017).

On 28x28 Omniglot the spatial size goes 28-14-7-3-1, so features have ``width`` dimensions; with
``pool_last=False`` the last block keeps its 3x3 map and features are ``9 * width``.

Implementation options (all compute the same function; ``tests/test_fast_backbone.py`` checks it):

- ``conv_impl``: 'xla' (``lax.conv``), 'im2col' (every conv as one matmul over 3x3 patches) or
  'im2col_first' (im2col for the first conv only, whose single input channel makes XLA:CPU's
  convolution slow; 'xla' for the rest, whose patch tensors would be 9x their input).
- ``block``: 'reference' (conv -> BatchNorm -> ReLU -> max-pool, as written) or 'fused': BatchNorm
  statistics from the full conv output, then max-pool the *pre-activation* and apply the BatchNorm
  affine map and ReLU on the 4x smaller pooled map. Exact: per channel BatchNorm+ReLU is
  ``relu(a*x + b)``, monotone in ``x`` (non-decreasing if ``a >= 0``, else non-increasing), so
  ``max_window relu(a*x + b) = relu(a * max_window(s*x) * s + b)`` with ``s = sign(a)``. It saves
  the full-resolution normalise/ReLU passes and their backward passes (the first block's
  28x28x64 map is the largest tensor of the step). Same parameter and state tree as 'reference'.
- ``chunk_first`` (block='fused', one-channel input with even height and width, i.e. Omniglot;
  the config's -1 means 64 on CPU and 0, off, on GPU/TPU: ``models.resolve_chunk_first``): the
  first block by ``chunked_first_block``. Its conv + pool runs over that many
  images at a time, so the full-resolution map (1 GB at 5,120 images) is never stored; a custom
  VJP keeps only the int8 position of each max. Its BatchNorm statistics come in closed form
  from the input's 3x3 patch moments (mean ``mu @ k + b``, variance ``k^T Sigma k``). Exact, to
  second order (``tests/test_fast_backbone.py``). The layer is reverse-mode only: ``jax.jvp``
  through it fails, so differentiate with ``grad``/``vjp`` (iMAML's Hessian-vector products do).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("xla", "im2col", "im2col_first")
BLOCKS = ("reference", "fused")


class _Im2colConv(nn.Module):
    """3x3 'SAME' convolution as one matmul over the 3x3 patches (``nn.Conv``'s parameters)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    params_only: bool = False  # return (kernel, bias) for a caller that convolves itself

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.params_only:
            return kernel, bias
        return im2col_conv(x, kernel, bias, self.dtype)


def im2col_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """3x3 'SAME' convolution as one matmul: [B, H, W, 9 C] patches @ [9 C, F] kernel."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    patches = jnp.concatenate(
        [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
    )
    y = patches.astype(dtype) @ kernel.reshape(-1, kernel.shape[-1]).astype(dtype)
    return y + bias.astype(dtype)


class Conv3x3(nn.Module):
    """3x3 'SAME' convolution; ``impl='im2col'`` lowers it to one matmul (faster on some CPUs).
    Both implementations keep their parameters under ``Conv_0`` (the same tree)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl == "params":  # (kernel, bias) only
            return _Im2colConv(self.features, self.dtype, params_only=True, name="Conv_0")(x)
        if self.impl == "xla":
            return nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype, name="Conv_0")(
                x
            )
        return _Im2colConv(self.features, dtype=self.dtype, name="Conv_0")(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool ('VALID') as reshape + max: its gradient avoids XLA:CPU's slow
    select-and-scatter (the pooling backward pass dominated the Conv4 step in profiles)."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class FusedBatchNormReluPool(nn.Module):
    """``max_pool_2x2(relu(BatchNorm(x)))`` (or without the pool) computed on the pooled map.

    Parameters ('scale', 'bias') and state ('mean', 'var') are those of ``flax.linen.BatchNorm``
    with the same momentum, epsilon and fast (E[x^2] - E[x]^2, float32) variance, so both blocks
    read each other's checkpoints.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    pool: bool = True
    dtype: jnp.dtype = jnp.float32
    features: int | None = None  # channels, when called with x=None

    @nn.compact
    def __call__(self, x: jax.Array, pool_and_stats=None) -> jax.Array:
        """``pool_and_stats(s) -> (pooled map, mean, var)``, if given, replaces ``x``: it pools
        ``x * s`` (times ``s``) and computes the batch statistics of ``x`` itself (chunked)."""
        c = self.features if x is None else x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        # sign of the per-channel slope a = scale / sqrt(var + eps): the sign of scale
        s = jax.lax.stop_gradient(jnp.where(scale < 0, -1.0, 1.0))
        if pool_and_stats is not None:
            x, mean, var = pool_and_stats(s)
        elif not self.use_running_average:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean, mean2 = xf.mean(axes), (xf * xf).mean(axes)
            var = jnp.maximum(0.0, mean2 - mean * mean)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        elif not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)  # y = a * (x - mean) + bias
        if self.pool and pool_and_stats is None:
            sx = s.astype(x.dtype)
            x = max_pool_2x2(x * sx) * sx  # per channel: max if a >= 0, min if a < 0
        y = (x.astype(jnp.float32) - mean) * a + bias
        return nn.relu(y.astype(self.dtype))


def _pool_patches(x: jax.Array) -> jax.Array:
    """[n, H, W, 1] -> [n, H/2, W/2, 4, 9]: the 3x3 'SAME' patch of every pixel, grouped by the
    2x2 pooling window it falls in (window position a = 2 * row + col, tap k = 3 * dy + dx)."""
    n, h, w = x.shape[:3]
    xp = jnp.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
    taps = jnp.stack([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1)
    taps = taps.reshape(n, h // 2, 2, w // 2, 2, 9).transpose(0, 1, 3, 2, 4, 5)
    return taps.reshape(n, h // 2, w // 2, 4, 9)


def _split(a: jax.Array, chunk: int) -> tuple[jax.Array | None, jax.Array | None]:
    """``a`` as [n // chunk, chunk, ...] chunks and the remainder (None where empty)."""
    main = (a.shape[0] // chunk) * chunk
    body = a[:main].reshape((main // chunk, chunk) + a.shape[1:]) if main else None
    return body, (a[main:] if main < a.shape[0] else None)


def _chunked(fn, arrays: tuple, chunk: int):
    """``fn`` (written for a batch of images) over ``chunk`` images at a time: ``lax.map`` with
    ``batch_size``, which also takes the remainder."""
    one = lambda xs: jax.tree.map(lambda t: t[0], fn(*(a[None] for a in xs)))
    return jax.lax.map(one, arrays, batch_size=chunk)


def _first_pool_fwd_chunk(x, kernel, bias, s):
    y = (_pool_patches(x) @ kernel.reshape(9, -1) + bias) * s  # [n, H/2, W/2, 4, C]
    m = y.max(-2)
    # window position of the max (the first on ties): the backward pass routes gradients there
    idx = jnp.where(y[..., 0, :] == m, 0, jnp.where(y[..., 1, :] == m, 1, 2))
    idx = jnp.where((idx == 2) & (y[..., 2, :] != m), 3, idx).astype(jnp.int8)
    return m * s, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def first_conv_pool(x, kernel, bias, s, chunk: int):
    """``max_pool_2x2((conv3x3(x) + bias) * s) * s`` for a one-channel ``x`` [n, H, W, 1]
    (``s``: per-channel +-1), over ``chunk`` images at a time: the full-resolution map of a chunk
    lives in cache and is never stored. The backward pass (a custom VJP) keeps only the int8
    window position of each max and recomputes the chunk's patches: it costs about one forward,
    where differentiating the pool's reshape + max costs several passes over the full map.

    Reverse mode only (``jax.custom_vjp``): differentiate it with ``grad``/``vjp``, to any order,
    not with ``jvp``."""
    return _first_pool(x, kernel, bias, s, chunk)[0]


def _first_pool(x, kernel, bias, s, chunk):
    return _chunked(lambda xc: _first_pool_fwd_chunk(xc, kernel, bias, s), (x,), chunk)


def _first_conv_pool_fwd(x, kernel, bias, s, chunk):
    pooled, idx = _first_pool(x, kernel, bias, s, chunk)
    return pooled, (x, kernel, s, idx)


def _first_conv_pool_bwd(chunk, res, g):
    x, kernel, s, idx = res
    positions = jnp.arange(4, dtype=jnp.int8)[:, None]

    def full_grad(ic, gc):  # [n, H/2, W/2, 4, C]: the cotangent of every window position
        return jnp.where(ic[..., None, :] == positions, gc[..., None, :], 0.0).astype(gc.dtype)

    def kernel_grad(xc, ic, gc):
        dy = full_grad(ic, gc)
        dims = (((0, 1, 2, 3), (0, 1, 2, 3)), ((), ()))
        return jax.lax.dot_general(
            _pool_patches(xc), dy, dims, preferred_element_type=jnp.float32
        ).astype(jnp.float32)

    parts = [_split(a, chunk) for a in (x, idx, g)]
    dk = jnp.zeros((9, kernel.shape[-1]), jnp.float32)
    if parts[0][0] is not None:
        dk, _ = jax.lax.scan(
            lambda acc, xs: (acc + kernel_grad(*xs), None), dk, tuple(p[0] for p in parts)
        )
    if parts[0][1] is not None:
        dk = dk + kernel_grad(*(p[1] for p in parts))

    def input_grad(ic, gc):  # unused (and removed by XLA) unless the caller differentiates x
        n, h2, w2, c = gc.shape
        dy = full_grad(ic, gc).reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        dy = dy.reshape(n, 2 * h2, 2 * w2, c)
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        return jax.lax.conv_general_dilated(
            dy, flipped, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    dx = _chunked(input_grad, (idx, g), chunk)
    db = g.astype(jnp.float32).sum((0, 1, 2)).astype(g.dtype)
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype), db, jnp.zeros_like(s)


first_conv_pool.defvjp(_first_conv_pool_fwd, _first_conv_pool_bwd)


def patch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean [9] and covariance [9, 9] over all pixels of the 3x3 'SAME' patches of a one-channel
    ``x``: a 3x3 convolution's per-channel output mean and variance are then ``mu @ k + b`` and
    ``k^T Sigma k``, without computing the output."""
    taps = _pool_patches(x).reshape(-1, 9).astype(jnp.float32)
    mu = taps.mean(0)
    centred = taps - mu
    return mu, centred.T @ centred / taps.shape[0]


def chunked_first_block(x, kernel, bias, s, chunk: int, dtype=jnp.float32):
    """(max_pool_2x2(conv(x) * s) * s, mean, var) of the first 3x3 convolution (one input
    channel): the pooled map by ``first_conv_pool`` (``chunk`` images at a time, never storing the
    full-resolution map), the BatchNorm batch statistics of the full map in closed form from the
    input's patch moments (``patch_moments``). Same function as conv -> statistics -> pool."""
    if x.shape[-1] != 1 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(
            f"model.chunk_first needs a one-channel input with even height and width, got "
            f"{x.shape[1:]}; set model.chunk_first=0"
        )
    kernel, bias = kernel.astype(dtype), bias.astype(dtype)
    pooled = first_conv_pool(x.astype(dtype), kernel, bias, s.astype(dtype), chunk)
    mu, sigma = patch_moments(x)
    k = kernel.reshape(9, -1).astype(jnp.float32)
    mean = mu @ k + bias.astype(jnp.float32)
    var = jnp.maximum(0.0, jnp.einsum("kc,kl,lc->c", k, sigma, k))
    return pooled, mean, var


class Conv4(nn.Module):
    width: int = 64
    pool_last: bool = True
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    block: str = "reference"
    # block='fused', one-channel even-sized input (Omniglot): the first block by
    # ``chunked_first_block``, this many images at a time (0: off)
    chunk_first: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, use_batch_stats: bool) -> jax.Array:
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"model.conv_impl={self.conv_impl!r}; choose one of {CONV_IMPLS}")
        if self.block not in BLOCKS:
            raise ValueError(f"model.block={self.block!r}; choose one of {BLOCKS}")
        x = x.astype(self.dtype)
        for i in range(4):
            impl = self.conv_impl
            if impl == "im2col_first":
                impl = "im2col" if i == 0 else "xla"
            pool = i < 3 or self.pool_last
            one_channel = x.shape[-1] == 1 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0
            if i == 0 and self.block == "fused" and self.chunk_first > 0 and pool and one_channel:
                kernel, bias = Conv3x3(self.width, self.dtype, "params", name="Conv3x3_0")(x)
                x = FusedBatchNormReluPool(
                    use_running_average=not use_batch_stats,
                    momentum=0.9,
                    epsilon=1e-5,
                    dtype=self.dtype,
                    features=self.width,
                    name="BatchNorm_0",
                )(
                    None,
                    lambda s, x=x, kernel=kernel, bias=bias: chunked_first_block(
                        x, kernel, bias, s, self.chunk_first, self.dtype
                    ),
                )
                continue
            x = Conv3x3(self.width, dtype=self.dtype, impl=impl, name=f"Conv3x3_{i}")(x)
            if self.block == "fused":
                x = FusedBatchNormReluPool(
                    use_running_average=not use_batch_stats,
                    momentum=0.9,
                    epsilon=1e-5,
                    pool=pool,
                    dtype=self.dtype,
                    name=f"BatchNorm_{i}",
                )(x)
                continue
            x = nn.BatchNorm(
                use_running_average=not use_batch_stats,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                name=f"BatchNorm_{i}",
            )(x)
            x = nn.relu(x)
            if pool:
                x = max_pool_2x2(x)
        return x.reshape(x.shape[0], -1).astype(jnp.float32)
