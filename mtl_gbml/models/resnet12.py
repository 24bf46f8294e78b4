"""ResNet-12 (Lee et al. 2019, MetaOptNet; the MTL paper's backbone): 4 residual blocks of widths
64-160-320-640, each conv3x3-BN-LeakyReLU(0.1) x3 with a 1x1 shortcut, maxpool 2, DropBlock in the
last two blocks; features are global-average-pooled (640 dims).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drop contiguous ``block_size`` squares, rescale the rest."""

    rate: float
    block_size: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        _, h, w, _ = x.shape
        bs = min(self.block_size, h, w)
        gamma = self.rate / (bs**2) * (h * w) / max((h - bs + 1) * (w - bs + 1), 1)
        rng = self.make_rng("dropout")
        seeds = jax.random.bernoulli(rng, gamma, x.shape).astype(x.dtype)
        # a seed drops the bs x bs block starting at it: a max-pool spreads it
        block = nn.max_pool(seeds, (bs, bs), strides=(1, 1), padding=((bs - 1, 0), (bs - 1, 0)))
        keep = 1.0 - block
        return x * keep * (keep.size / jnp.maximum(keep.sum(), 1.0))


class ResBlock(nn.Module):
    width: int
    drop_rate: float
    dropblock_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, use_batch_stats: bool) -> jax.Array:
        def bn(h):
            return nn.BatchNorm(
                use_running_average=not use_batch_stats,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
            )(h)

        h = x
        for i in range(3):
            h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(h)
            h = bn(h)
            if i < 2:
                h = nn.leaky_relu(h, 0.1)
        shortcut = bn(nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype)(x))
        h = nn.leaky_relu(h + shortcut, 0.1)
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
        return DropBlock(self.drop_rate, self.dropblock_size)(h, train=train)


class ResNet12(nn.Module):
    widths: tuple[int, ...] = (64, 160, 320, 640)
    drop_rate: float = 0.1
    dropblock_size: int = 5
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, use_batch_stats: bool) -> jax.Array:
        x = x.astype(self.dtype)
        block_cls = nn.remat(ResBlock, static_argnums=(2, 3)) if self.remat else ResBlock
        for i, w in enumerate(self.widths):
            # DropBlock only in the last two blocks (as in MetaOptNet and the MTL paper's code)
            rate = self.drop_rate if i >= len(self.widths) - 2 else 0.0
            size = self.dropblock_size if i == len(self.widths) - 1 else 1
            # the same name with and without remat, so checkpoints and seeds carry over
            x = block_cls(w, rate, size, self.dtype, name=f"ResBlock_{i}")(
                x, train, use_batch_stats
            )
        return x.mean(axis=(1, 2)).astype(jnp.float32)
