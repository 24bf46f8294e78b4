"""Conv4: four blocks of conv3x3(width)-BatchNorm-ReLU-maxpool2 (Vinyals et al. 2016, Snell et al. 2017).

On 28x28 Omniglot the spatial size goes 28-14-7-3-1, so features have ``width`` dimensions; with
``pool_last=False`` the last block keeps its 3x3 map and features are ``9 * width``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("xla", "im2col")


class Conv3x3(nn.Module):
    """3x3 'SAME' convolution; ``impl='im2col'`` lowers it to one matmul (faster on some CPUs)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl == "xla":
            return nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype)(x)
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = x.shape[1], x.shape[2]
        patches = jnp.concatenate(
            [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
        )
        y = patches.astype(self.dtype) @ kernel.reshape(-1, self.features).astype(self.dtype)
        return y + bias.astype(self.dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool ('VALID') as reshape + max: its gradient avoids XLA:CPU's slow
    select-and-scatter (the pooling backward pass dominated the Conv4 step in profiles)."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv4(nn.Module):
    width: int = 64
    pool_last: bool = True
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, use_batch_stats: bool) -> jax.Array:
        x = x.astype(self.dtype)
        for i in range(4):
            x = Conv3x3(self.width, dtype=self.dtype, impl=self.conv_impl)(x)
            x = nn.BatchNorm(
                use_running_average=not use_batch_stats,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
            )(x)
            x = nn.relu(x)
            if i < 3 or self.pool_last:
                x = max_pool_2x2(x)
        return x.reshape(x.shape[0], -1).astype(jnp.float32)
