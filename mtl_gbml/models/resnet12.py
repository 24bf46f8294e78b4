"""ResNet-12 (Lee et al. 2019, MetaOptNet; the MTL paper's backbone): 4 residual blocks of widths
64-160-320-640, each conv3x3-BN-LeakyReLU(0.1) x3 with a conv1x1-BN shortcut, maxpool 2; features
are the last map global-average-pooled (``avg_pool=True``, 640 dims: the MTL code) or flattened
(``avg_pool=False``: MetaOptNet's ``resnet12(avg_pool=False)``, 640 x 5 x 5 = 16000 dims on 84x84
images, 640 x 2 x 2 = 2560 on CIFAR's 32x32).

As in MetaOptNet's ``models/ResNet12_embedding.py`` and the MTL code's ``models/resnet.py`` (the
same network):

- regularisation after each block's max-pool: dropout (rate ``drop_rate``) after blocks 1 and 2,
  DropBlock (rate ``drop_rate``, ``dropblock_size`` squares) after blocks 3 and 4;
- convolutions initialised as ``kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu')``:
  untruncated normal, variance 2 / fan_out (torch's default negative slope 0 in the gain);
  BatchNorm scale 1, bias 0;
- ``dropblock_ramp_steps`` > 0: the DropBlock rate ramps up linearly,
  ``drop_rate * min(t / dropblock_ramp_steps, 1)`` (the references' ``keep_rate = max(1 - drop_rate
  * t / 40000, 1 - drop_rate)``); dropout keeps its full rate from the start, as there.

``t`` here is the training step: a counter ``train_forwards`` in the model's state (the
``batch_stats`` collection, which :func:`mtl_gbml.models.forward` keeps) goes up by one in each
training-mode forward, and ``t`` is its value after that forward's increment (1 in the first step).
Every algorithm keeps the state of one training forward per step (the per-task states are
averaged, and every task holds the same count), so it counts steps; evaluation-mode forwards and
steps skipped as non-finite do not count, and it is checkpointed with the rest of the state. The
counter exists only when the ramp is on, so a model without it has the same variables as before.
The references count every forward call of the block instead, evaluation-mode ones included (the
MTL code: one per training task and per validation episode, 2000 an epoch, so its 40000 is 20
epochs; MetaOptNet: two per training step and per validation episode), which the recipes
(:mod:`mtl_gbml.recipes`) translate into steps.

Deviation: DropBlock's block size is clipped to the feature map (the references would fail on a
map smaller than the block; the tiny test images need it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch's kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu'): gain^2 = 2 / (1 + 0^2)
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018) as in MetaOptNet: seeds drawn with probability ``gamma`` at
    the ``(h - bs + 1) x (w - bs + 1)`` positions where a whole block fits, each dropping the
    ``bs x bs`` block that starts at it; the survivors are rescaled by (elements / kept)."""

    rate: float
    block_size: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, scale: jax.Array | float = 1.0) -> jax.Array:
        """``scale`` multiplies ``rate`` (the ramp's fraction, possibly traced)."""
        if not train or self.rate == 0.0:
            return x
        n, h, w, c = x.shape
        bs = min(self.block_size, h, w)
        vh, vw = h - bs + 1, w - bs + 1  # where a block fits
        # gamma * bs^2 * vh * vw = rate * h * w: the dropped fraction is the rate, less overlaps
        gamma = self.rate * scale / (bs**2) * (h * w) / (vh * vw)
        seeds = jax.random.bernoulli(self.make_rng("dropout"), gamma, (n, vh, vw, c))
        # position p is dropped by the seeds at p - bs + 1 .. p: a max-pool over the seeds padded
        # by bs - 1 on both sides (h x w again)
        pad = ((bs - 1, bs - 1), (bs - 1, bs - 1))
        block = nn.max_pool(seeds.astype(jnp.float32), (bs, bs), strides=(1, 1), padding=pad)
        keep = 1.0 - block
        rescale = keep.size / jnp.maximum(keep.sum(), 1.0)  # counted in float32, whatever x's dtype
        return x * (keep * rescale).astype(x.dtype)


class ResBlock(nn.Module):
    width: int
    drop_rate: float
    drop_block: bool  # DropBlock (of dropblock_size squares) rather than dropout
    dropblock_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool, use_batch_stats: bool, ramp: jax.Array | float = 1.0
    ) -> jax.Array:
        def bn(h):
            return nn.BatchNorm(
                use_running_average=not use_batch_stats,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
            )(h)

        def conv(h, k):
            return nn.Conv(
                self.width,
                (k, k),
                padding="SAME",
                use_bias=False,
                dtype=self.dtype,
                kernel_init=CONV_INIT,
            )(h)

        h = x
        for i in range(3):
            h = bn(conv(h, 3))
            if i < 2:
                h = nn.leaky_relu(h, 0.1)
        shortcut = bn(conv(x, 1))
        h = nn.leaky_relu(h + shortcut, 0.1)
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
        if not self.drop_block:
            return nn.Dropout(self.drop_rate, deterministic=not train)(h)
        return DropBlock(self.drop_rate, self.dropblock_size)(h, train=train, scale=ramp)


class ResNet12(nn.Module):
    widths: tuple[int, ...] = (64, 160, 320, 640)
    drop_rate: float = 0.1
    dropblock_size: int = 5
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    dropblock_ramp_steps: int = 0  # 0: DropBlock at its full rate from the first step
    avg_pool: bool = True  # False: flatten the last map (MetaOptNet), in (h, w, c) order

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, use_batch_stats: bool) -> jax.Array:
        x = x.astype(self.dtype)
        ramp = 1.0
        if self.dropblock_ramp_steps > 0 and self.drop_rate > 0:
            # float32: exact for counts below 2^24, and its mean over tasks is the count itself
            count = self.variable("batch_stats", "train_forwards", jnp.zeros, (), jnp.float32)
            if train:
                count.value = count.value + 1.0
            ramp = jnp.minimum(count.value / self.dropblock_ramp_steps, 1.0)
        block_cls = nn.remat(ResBlock, static_argnums=(2, 3)) if self.remat else ResBlock
        for i, w in enumerate(self.widths):
            # dropout after blocks 1-2, DropBlock after blocks 3-4 (MetaOptNet, the MTL code)
            drop_block = i >= len(self.widths) - 2
            # the same name with and without remat, so checkpoints and seeds carry over
            x = block_cls(
                w, self.drop_rate, drop_block, self.dropblock_size, self.dtype, name=f"ResBlock_{i}"
            )(x, train, use_batch_stats, ramp)
        if self.avg_pool:
            return x.mean(axis=(1, 2)).astype(jnp.float32)
        return x.reshape(x.shape[0], -1).astype(jnp.float32)
