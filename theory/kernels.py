"""Infinite-width kernels of fully-connected ReLU networks (the only neural-tangents import).

Architecture (NTK parameterisation, no biases)::

    x -> [Dense(width, W_std=sqrt(2)) -> ReLU] * L -> Dense(1, W_std=sqrt(2))

so ``depth`` = L is the number of hidden layers and the network has L + 1 weight matrices.

Two kernels are returned:

* ``theta`` -- the NTK Θ(x, x') of the whole network (all L + 1 layers trained);
* ``k`` -- the last-layer kernel K(x, x') = <∂f/∂w_out(x), ∂f/∂w_out(x')>, i.e. the NTK
  contribution of the output layer alone. In NTK parameterisation this equals
  W_std² φ(x)·φ(x')/n, the NNGP kernel of the network output, which is what neural-tangents
  returns as ``nngp``.

Θ − K is the NTK of the body (all but the last layer). With W_std² = 2 and no biases the ReLU
recursion preserves the diagonal, so trace(K)/trace(Θ) = 1/(L + 1) exactly: the 1/L term of the
ANIL/MTL bound.

Precision: callers that need float64 must run ``jax.config.update("jax_enable_x64", True)``
before calling; this module does not change global jax configuration at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from neural_tangents import stax

W_STD = float(np.sqrt(2.0))


@dataclass(frozen=True)
class Kernels:
    """Kernel matrices between two sets of inputs."""

    theta: np.ndarray  # NTK Θ
    k: np.ndarray  # last-layer kernel K


def mlp_stax(depth: int, width: int = 512, w_std: float = W_STD) -> tuple[Callable, ...]:
    """Return ``(init_fn, apply_fn, kernel_fn)`` of the depth-L bias-free ReLU MLP."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(width, W_std=w_std, parameterization="ntk"), stax.Relu()]
    layers.append(stax.Dense(1, W_std=w_std, parameterization="ntk"))
    return stax.serial(*layers)


def kernels(x1: np.ndarray, x2: np.ndarray | None, depth: int, w_std: float = W_STD) -> Kernels:
    """Analytic infinite-width Θ and K between ``x1`` (n1, d) and ``x2`` (n2, d)."""
    _, _, kernel_fn = mlp_stax(depth, w_std=w_std)
    out = kernel_fn(jnp.asarray(x1), None if x2 is None else jnp.asarray(x2), ("ntk", "nngp"))
    return Kernels(theta=np.asarray(out.ntk), k=np.asarray(out.nngp))
