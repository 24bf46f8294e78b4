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
"""

from __future__ import annotations

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


def chunked_first_block(x, kernel, bias, s, chunk: int, dtype=jnp.float32):
    """(max_pool_2x2(conv(x) * s) * s, mean, var) of a 3x3 convolution over ``chunk`` images at a
    time (im2col matmul): the full-resolution map of a chunk stays in cache and is never stored;
    the backward pass recomputes it per chunk (``jax.checkpoint``)."""
    n = x.shape[0]

    def pool_sums(xc):
        y = im2col_conv(xc, kernel, bias, dtype).astype(jnp.float32)
        sums = jnp.stack([y.sum((0, 1, 2)), (y * y).sum((0, 1, 2))])
        return max_pool_2x2(y * s) * s, sums

    pool_sums = jax.checkpoint(pool_sums, prevent_cse=False)
    main = (n // chunk) * chunk
    pooled, total = [], jnp.zeros((2, kernel.shape[-1]), jnp.float32)
    if main:
        xs = x[:main].reshape((main // chunk, chunk) + x.shape[1:])

        def body(acc, xc):
            p, sums = pool_sums(xc)
            return acc + sums, p

        total, p = jax.lax.scan(body, total, xs)
        pooled.append(p.reshape((main,) + p.shape[2:]))
    if main < n:
        p, sums = pool_sums(x[main:])
        total, pooled = total + sums, pooled + [p]
    pooled = jnp.concatenate(pooled) if len(pooled) > 1 else pooled[0]
    mean = total[0] / (n * x.shape[1] * x.shape[2])
    var = jnp.maximum(0.0, total[1] / (n * x.shape[1] * x.shape[2]) - mean * mean)
    return pooled.astype(dtype), mean, var


class Conv4(nn.Module):
    width: int = 64
    pool_last: bool = True
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    block: str = "reference"
    chunk_first: int = 0  # block='fused': first block over this many images at a time (0: off)

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
            if i == 0 and self.block == "fused" and self.chunk_first > 0 and pool:
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
