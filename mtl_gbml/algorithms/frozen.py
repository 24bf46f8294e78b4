"""Shared by the frozen-backbone algorithms (anil, r2d2, metaoptnet, protonet).

Training: each task's images go through the backbone as one batch (ANIL's support and query as
two, ``merged=False``), vmapped over tasks, so BatchNorm
uses the task's own batch statistics, as in an episode of the original methods; the running
statistics are the average of the per-task updates. The per-task head is then a function of the
task's features only, written for one task and vmapped.

Test time: ``embed`` (inductive BatchNorm; the evaluator caches the split's features) and
``predict_from_features`` for one episode; ``adapt_and_predict`` does both for the per-episode
path. Under transductive BatchNorm it batches an episode as training batched a task: support and
query as one batch (``merged``, as MTL does too), or each as its own batch (ANIL, as MAML), so the
test-time features of a task are those training computed for it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtl_gbml import models
from mtl_gbml.algorithms.base import Algorithm, accuracy, cross_entropy, mean_state


def task_features(model, backbone, state, tasks, rng, merged: bool = True):
    """(support features [T, ns, D], query features [T, nq, D], averaged new BatchNorm state).

    ``merged``: support and query of a task form one batch; otherwise each is its own batch (as
    MAML's inner loop and query pass see them), and the state comes from the query pass.
    """
    keys = jax.random.split(rng, tasks.support_x.shape[0])
    one = lambda xi, k: models.forward(model, backbone, state, xi, train=True, rng=k)
    ns = tasks.support_x.shape[1]
    if merged:
        x = jnp.concatenate([tasks.support_x, tasks.query_x], axis=1)
        feats, states = jax.vmap(one)(x, keys)
        sf, qf = feats[:, :ns], feats[:, ns:]
    else:
        sf, _ = jax.vmap(one)(tasks.support_x, keys)
        qf, states = jax.vmap(one)(
            tasks.query_x, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        )
    return sf, qf, mean_state(states)


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, eps: float) -> jax.Array:
    """Mean cross-entropy against MetaOptNet's smoothed targets: ``1 - eps`` on the label and
    ``eps / (ways - 1)`` on each other class (its train.py's ``--eps``); ``eps=0``: plain."""
    if eps == 0.0:
        return cross_entropy(logits, labels)
    ways = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, ways, dtype=logits.dtype)
    target = onehot * (1.0 - eps) + (1.0 - onehot) * eps / (ways - 1)
    return -(target * jax.nn.log_softmax(logits, axis=-1)).sum(-1).mean()


def make(
    name: str,
    model,
    bn_mode: str,
    init_head: Callable,
    head_logits: Callable,
    train_head_logits: Callable | None = None,
    merged: bool = True,
    label_smoothing: float = 0.0,
) -> Algorithm:
    """Algorithm from ``head_logits(params, support_f, support_y, query_f, ways) -> logits`` (one
    episode, differentiable; ``train_head_logits`` if training uses other settings) and
    ``init_head(rng, dim) -> dict`` (extra meta-parameters). ``label_smoothing``: the training
    loss's targets, as :func:`smoothed_cross_entropy`."""
    train_head_logits = train_head_logits or head_logits

    def init(rng, example_tasks):
        k_body, k_head = jax.random.split(rng)
        x = example_tasks.support_x[0]
        backbone, state = models.init(model, k_body, x)
        dim = models.forward(model, backbone, state, x, train=False)[0].shape[-1]
        return {"backbone": backbone, **init_head(k_head, dim)}, state

    def meta_loss(params, state, tasks, rng):
        sf, qf, new_state = task_features(model, params["backbone"], state, tasks, rng, merged)
        ways = tasks.class_ids.shape[1]

        def one_task(sf, sy, qf, qy):
            logits = train_head_logits(params, sf, sy, qf, ways)
            return smoothed_cross_entropy(logits, qy, label_smoothing), accuracy(logits, qy)

        losses, accs = jax.vmap(one_task)(sf, tasks.support_y, qf, tasks.query_y)
        return losses.mean(), (new_state, {"accuracy": accs.mean()})

    def embed(params, state, x):
        return models.forward(model, params["backbone"], state, x, train=False)[0]

    def adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng=None):
        fwd = lambda x: models.forward(
            model, params["backbone"], state, x, train=False, bn_mode=bn_mode
        )[0]
        if merged:  # batched as in training: transductive statistics of support and query together
            feats = fwd(jnp.concatenate([support_x, query_x], axis=0))
            sf, qf = feats[: support_x.shape[0]], feats[support_x.shape[0] :]
        else:
            sf, qf = fwd(support_x), fwd(query_x)
        return head_logits(params, sf, support_y, qf, ways)

    return Algorithm(
        name=name,
        init=init,
        meta_loss=meta_loss,
        adapt_and_predict=adapt_and_predict,
        frozen_backbone=True,
        embed=embed,
        predict_from_features=head_logits,
    )
