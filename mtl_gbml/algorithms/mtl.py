"""Multi-task learning with memory-efficient per-task heads (Wang, Zhao, Li, ICML 2021).

One weight row per base class, no bias: ``head`` has shape [num_base_classes, D] however many tasks
a step samples. A task's head is the rows of its class ids in sampling order, and its softmax runs
over its N classes only. Support and query are merged into one training set per task (as in the
official code); the backbone sees all tasks' images as one batch (``bn_per_task=True``: each task
as its own batch, as the official code's one task per forward), and the per-task loss is written
for one task and vmapped. Training is first order and joint: plain ``jax.grad``.

Test time (official recipe): freeze the backbone, L2-normalise features, fit a new head by
L2-regularised multinomial logistic regression (scikit-learn's ``C``) to convergence. The fit sees
the normalised features only through inner products, so the cached-feature evaluator normalises
the embedded split once and hands the head Gram matrices (``predict_from_gram``). For 2-way
episodes scikit-learn fits a binary model (one weight vector d, penalty ``0.5 ||d||^2``); the
multinomial fit with ``C / 2`` is that model (its optimum has ``w_1 = -w_0 = d / 2``), so the
recipe's 2-way predictions are reproduced too (:func:`recipe_c`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml import linear_heads, models
from mtl_gbml.algorithms.base import (
    Algorithm,
    accuracy,
    cross_entropy,
    flatten_tasks,
    l2_normalize,
    mean_state,
    merge_support_query,
)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.feature_norm = False  # L2-normalise features in training (official: on, except FC100)
    c.head_init = "official"  # 'official' (Kaiming-uniform x sqrt(C/N)) | 'zeros' | 'normal'
    c.logit_scale = 1.0  # fixed multiplier of the task logits (the official code has none: 1.0)
    c.label_smoothing = 0.0
    # BatchNorm statistics per task (the official code: one task per forward, gradients
    # accumulated over a step's tasks) instead of over all of a step's tasks as one batch
    c.bn_per_task = False
    return c


def init_head(rng: jax.Array, kind: str, num_classes: int, dim: int, ways: int) -> jax.Array:
    """Head table [num_classes, dim].

    'official': PyTorch ``nn.Linear``'s Kaiming-uniform bound 1/sqrt(dim), scaled by
    sqrt(num_classes / ways) as in the authors' code (a row is used by only N of C classes' tasks).
    """
    if kind == "official":
        bound = (1.0 / jnp.sqrt(dim)) * jnp.sqrt(num_classes / ways)
        return jax.random.uniform(rng, (num_classes, dim), minval=-bound, maxval=bound)
    if kind == "zeros":
        return jnp.zeros((num_classes, dim))
    if kind == "normal":
        return jax.random.normal(rng, (num_classes, dim)) / jnp.sqrt(dim)
    raise ValueError(f"algo.head_init={kind!r}; choose 'official', 'zeros' or 'normal'")


def task_logits(
    feats: jax.Array, head: jax.Array, class_ids: jax.Array, scale: float, norm: bool
) -> jax.Array:
    """Logits [n, N] of one task: features against the head rows of its classes."""
    if norm:
        feats = l2_normalize(feats)
    return scale * feats @ head[class_ids].T


def recipe_c(c: float, ways: int) -> float:
    """The multinomial fit's ``C`` that gives scikit-learn's ``LogisticRegression(C=c)`` on
    ``ways`` classes: ``c``, or ``c / 2`` for two (scikit-learn's binary model)."""
    return c / 2 if ways == 2 else c


def build(model: nn.Module, config: ml_collections.ConfigDict, num_base_classes: int) -> Algorithm:
    a = config.algo
    bn_mode = config.model.bn_mode
    logreg_c = config.eval.logreg_c
    logreg = dict(steps=config.eval.logreg_steps, tol=config.eval.logreg_tol)

    def init(rng, example_tasks):
        k_body, k_head = jax.random.split(rng)
        x = example_tasks.support_x[0]
        params, state = models.init(model, k_body, x)
        dim = models.forward(model, params, state, x, train=False)[0].shape[-1]
        head = init_head(k_head, a.head_init, num_base_classes, dim, config.data.ways)
        return {"backbone": params, "head": head}, state

    def meta_loss(params, state, tasks, rng):
        x, y = merge_support_query(tasks)
        num_tasks, n = y.shape
        if a.bn_per_task:  # each task its own batch; the running statistics' update averaged
            one = lambda xi, k: models.forward(
                model, params["backbone"], state, xi, train=True, rng=k
            )
            feats, states = jax.vmap(one)(x, jax.random.split(rng, num_tasks))
            new_state = mean_state(states)
        else:
            feats, new_state = models.forward(
                model, params["backbone"], state, flatten_tasks(x), train=True, rng=rng
            )
        feats = feats.reshape(num_tasks, n, -1)

        def one_task(f, labels, class_ids):
            logits = task_logits(f, params["head"], class_ids, a.logit_scale, a.feature_norm)
            ways = class_ids.shape[0]
            target = jax.nn.one_hot(labels, ways)
            target = target * (1 - a.label_smoothing) + a.label_smoothing / ways
            loss = -(target * jax.nn.log_softmax(logits)).sum(-1).mean()
            return loss, accuracy(logits, labels)

        losses, accs = jax.vmap(one_task)(feats, y, tasks.class_ids)
        return losses.mean(), (new_state, {"accuracy": accs.mean()})

    def embed(params, state, x):
        return models.forward(model, params["backbone"], state, x, train=False)[0]

    def predict_from_gram(params, support_gram, query_support_gram, support_y, ways):
        c = recipe_c(logreg_c, ways)
        a, b = linear_heads.logistic_regression_dual(support_gram, support_y, ways, c, **logreg)
        return query_support_gram @ a + b[..., None, :]

    def predict_from_features(params, support_f, support_y, query_f, ways):
        support_f, query_f = l2_normalize(support_f), l2_normalize(query_f)
        c = recipe_c(logreg_c, ways)
        w, b = linear_heads.logistic_regression(support_f, support_y, ways, c, **logreg)
        return query_f @ w.T + b

    def adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng=None):
        x = jnp.concatenate([support_x, query_x], axis=0)
        feats, _ = models.forward(model, params["backbone"], state, x, train=False, bn_mode=bn_mode)
        ns = support_x.shape[0]
        return predict_from_features(params, feats[:ns], support_y, feats[ns:], ways)

    return Algorithm(
        name="mtl",
        init=init,
        meta_loss=meta_loss,
        adapt_and_predict=adapt_and_predict,
        frozen_backbone=True,
        embed=embed,
        predict_from_features=predict_from_features,
        feature_transform=l2_normalize,
        predict_from_gram=predict_from_gram,
    )


__all__ = ["build", "default_config", "init_head", "recipe_c", "task_logits", "cross_entropy"]
