"""Backbones by name. Each is a pure Flax linen module mapping images [B, H, W, C] to features [B, D].

Call ``model.apply`` through :func:`mtl_gbml.models.forward`, which makes the BatchNorm mode explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml.models.conv4 import Conv4
from mtl_gbml.models.resnet12 import ResNet12

BN_MODES = ("inductive", "transductive")

_REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "conv4": lambda c: Conv4(
        width=c.width,
        pool_last=c.pool_last,
        dtype=jnp.dtype(c.dtype),
        conv_impl=c.conv_impl,
        block=c.get("block", "reference"),
        chunk_first=resolve_chunk_first(c.get("chunk_first", 0)),
    ),
    "resnet12": lambda c: ResNet12(
        widths=tuple(c.resnet_widths),
        drop_rate=c.drop_rate,
        dropblock_size=c.dropblock_size,
        dtype=jnp.dtype(c.dtype),
        remat=c.remat,
        dropblock_ramp_steps=check_resnet12(c),
        avg_pool=c.get("avg_pool", True),
    ),
}


def check_resnet12(c: ml_collections.ConfigDict) -> int:
    """Validate ResNet-12's regularisation keys; returns ``model.dropblock_ramp_steps`` (0 where a
    config predates the key: no ramp)."""
    if not 0.0 <= c.drop_rate < 1.0:
        raise ValueError(f"model.drop_rate={c.drop_rate}: use a rate in [0, 1) (0: none)")
    if not c.dropblock_size >= 1:
        raise ValueError(f"model.dropblock_size={c.dropblock_size}: use a block size >= 1")
    ramp = c.get("dropblock_ramp_steps", 0)
    if not (isinstance(ramp, int) and ramp >= 0):
        raise ValueError(
            f"model.dropblock_ramp_steps={ramp!r}: use 0 (DropBlock at its full rate from the "
            "start) or the number of training steps over which its rate ramps up from 0"
        )
    return ramp


CPU_CHUNK_FIRST = 64  # benchmarks/results/fast_backbone.md: 16, 64 and 256 within noise on CPU


def resolve_chunk_first(chunk_first: int) -> int:
    """``model.chunk_first``: -1 (the default) is 64 on CPU, where the chunked first block is 4x
    faster than XLA's convolution (benchmarks/results/fast_backbone.md), and 0 (XLA's convolution)
    on GPU and TPU, where it has not been measured; n >= 0 is used as given."""
    if chunk_first < -1:
        raise ValueError(
            f"model.chunk_first={chunk_first}: use -1 (auto), 0 (off) or a positive chunk size"
        )
    if chunk_first == -1:
        return CPU_CHUNK_FIRST if jax.default_backend() == "cpu" else 0
    return chunk_first


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The backbone named by ``model_config.name``."""
    if model_config.name not in _REGISTRY:
        raise ValueError(
            f"model.name={model_config.name!r} is unknown; choose one of {list(names())}"
        )
    return _REGISTRY[model_config.name](model_config)


def forward(
    model: nn.Module,
    params: Any,
    state: Any,
    x: jax.Array,
    *,
    train: bool,
    bn_mode: str = "inductive",
    rng: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """Features of ``x`` and the (possibly updated) BatchNorm state.

    ``train=True``: batch statistics, running statistics updated, dropout/DropBlock active.
    ``train=False, bn_mode='inductive'``: running statistics, state unchanged.
    ``train=False, bn_mode='transductive'``: statistics of this batch (e.g. one task), state unchanged.
    """
    variables = {"params": params, **state}
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    if train:
        feats, new_state = model.apply(
            variables, x, train=True, use_batch_stats=True, rngs=rngs, mutable=["batch_stats"]
        )
        return feats, dict(new_state)
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r}; choose one of {BN_MODES}")
    if bn_mode == "transductive":
        feats, _ = model.apply(
            variables, x, train=False, use_batch_stats=True, mutable=["batch_stats"]
        )
        return feats, state
    return model.apply(variables, x, train=False, use_batch_stats=False), state


def init(model: nn.Module, rng: jax.Array, example_x: jax.Array) -> tuple[Any, dict]:
    """(params, state) of ``model`` for inputs shaped like ``example_x``."""
    variables = model.init(
        {"params": rng, "dropout": rng}, example_x, train=False, use_batch_stats=False
    )
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables
