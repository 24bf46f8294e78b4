"""First-order MAML (Finn et al. 2017): MAML with every inner gradient treated as a constant.

The adapted parameters are ``theta - inner_lr * sum(stop_gradient(g_k))``, so ``jax.grad`` of the
query loss w.r.t. ``theta`` is the query gradient at the adapted parameters: no second-order terms,
no memory for them. Same inner loop, head and BatchNorm handling as :mod:`mtl_gbml.algorithms.maml`.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from mtl_gbml.algorithms import maml
from mtl_gbml.algorithms.base import Algorithm


def default_config() -> ml_collections.ConfigDict:
    return maml.default_config()


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    return maml.build(model, config, num_base_classes, first_order=True, name="fomaml")
