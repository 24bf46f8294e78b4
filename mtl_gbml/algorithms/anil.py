"""ANIL (Raghu, Raghu, Bengio, Vinyals, ICLR 2020): MAML's inner loop on the last layer only.

The backbone is not adapted, so a task's support and query features are computed once (support and
query each as their own batch, as MAML's passes see them); ``inner_steps`` GD steps of size
``inner_lr`` on the N-way head (``lax.scan``) fit the support features, and the meta-gradient is
second order through the head updates, down into the backbone through the features. Head start:
``head_init='zeros'`` (per task, any ways) or ``'learned'`` (meta-learned [data.ways, D]).
Test time: ``test_inner_steps`` steps of ``test_inner_lr`` on cached features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml.algorithms import frozen
from mtl_gbml.algorithms.base import Algorithm, cross_entropy
from mtl_gbml.algorithms.whole_network import HEAD_INITS


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.inner_steps = 5
    c.inner_lr = 0.1
    c.test_inner_steps = 10
    c.test_inner_lr = 0.1
    c.head_init = "zeros"  # 'zeros' (per task, not meta-learned) | 'learned'
    return c


def adapt_head(head, support_f, support_y, steps: int, lr: float):
    """``steps`` GD steps on the support cross-entropy of ``{"w": [N, D], "b": [N]}`` (a scan)."""

    def loss(h):
        return cross_entropy(support_f @ h["w"].T + h["b"], support_y)

    def step(h, _):
        g = jax.grad(loss)(h)
        return jax.tree.map(lambda p, g: p - lr * g, h, g), None

    head, _ = jax.lax.scan(step, head, None, length=steps)
    return head


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo
    if a.head_init not in HEAD_INITS:
        raise ValueError(f"algo.head_init={a.head_init!r}; choose one of {HEAD_INITS}")
    train_ways = config.data.ways

    def init_head(rng, dim):
        if a.head_init == "learned":
            return {"head": {"w": jnp.zeros((train_ways, dim)), "b": jnp.zeros((train_ways,))}}
        return {}

    def head0(params, dim, ways):
        if a.head_init == "learned":
            if ways > train_ways:
                raise ValueError(
                    f"{ways}-way episode but the meta-learned head has data.ways={train_ways} rows;"
                    " use algo.head_init='zeros' to evaluate other numbers of ways"
                )
            return jax.tree.map(lambda h: h[:ways], params["head"])
        return {"w": jnp.zeros((ways, dim)), "b": jnp.zeros((ways,))}

    def logits_fn(steps, lr):
        def head_logits(params, support_f, support_y, query_f, ways):
            head = head0(params, support_f.shape[-1], ways)
            head = adapt_head(head, support_f, support_y, steps, lr)
            return query_f @ head["w"].T + head["b"]

        return head_logits

    return frozen.make(
        "anil",
        model,
        config.model.bn_mode,
        init_head=init_head,
        head_logits=logits_fn(a.test_inner_steps, a.test_inner_lr),
        train_head_logits=logits_fn(a.inner_steps, a.inner_lr),
        merged=False,
    )
