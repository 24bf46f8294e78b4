"""Shared by the whole-network GBML algorithms (maml, fomaml, imaml, minibatchprox).

Adapted ("fast") parameters of one task: ``{"backbone": ..., "head": {"w": [N, D], "b": [N]}}``.
The N-way head starts each task at

- ``algo.head_init='zeros'``: zero, not a meta-parameter. Every class starts alike, so the learner
  is invariant to the order of the labels and works for any number of ways at test time (the
  "zero trick"; a meta-learned row shared by all classes would be a no-op under the softmax).
- ``algo.head_init='learned'``: a meta-learned [data.ways, D] head (zero-initialised), as in the
  original MAML; a test episode with ``ways <= data.ways`` uses its first ``ways`` rows.

BatchNorm: the inner loop uses the batch statistics of the task's support set, as in training
everywhere (at test time without dropout/DropBlock, so a prediction does not depend on an rng);
Meta-MinibatchProx's inner loop trains on support and query as one batch instead, and
transductively at test its support loss and query logits come from one forward over both
(``make_adapt_and_predict(merged=True)``);
the query forward uses the task's query batch statistics in training, and at test time follows
``model.bn_mode`` (running statistics for 'inductive', the query batch's for 'transductive').
Running statistics come from each task's query forward with its adapted parameters, averaged over
tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from mtl_gbml import models
from mtl_gbml.algorithms.base import accuracy, cross_entropy
from mtl_gbml.algorithms.base import mean_state as mean_state  # wn.mean_state in the algorithms

HEAD_INITS = ("zeros", "learned")


def tree_add(a, b, scale=1.0):
    """a + scale * b."""
    return jax.tree.map(lambda x, y: x + scale * y, a, b)


def tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def surrogate(value: jax.Array, direction, params) -> jax.Array:
    """A loss whose value is ``value`` and whose gradient w.r.t. ``params`` is ``direction``.

    First-order and implicit methods use it so that the train step stays ``jax.grad(meta_loss)``
    while the logged loss is the real one.
    """
    direction = jax.lax.stop_gradient(direction)
    offset = jax.tree.map(lambda p: p - jax.lax.stop_gradient(p), params)  # value 0, gradient 1
    return jax.lax.stop_gradient(value) + tree_vdot(direction, offset)


class Net:
    """A backbone plus an N-way linear head; per-task losses for one task."""

    def __init__(self, model, config: ml_collections.ConfigDict):
        if config.algo.head_init not in HEAD_INITS:
            raise ValueError(
                f"algo.head_init={config.algo.head_init!r}; choose one of {HEAD_INITS}"
            )
        self.model = model
        self.head_init = config.algo.head_init
        self.train_ways = config.data.ways
        self.bn_mode = config.model.bn_mode

    def init(self, rng, example_tasks):
        x = example_tasks.support_x[0]
        backbone, state = models.init(self.model, rng, x)
        params = {"backbone": backbone}
        if self.head_init == "learned":
            dim = models.forward(self.model, backbone, state, x, train=False)[0].shape[-1]
            params["head"] = {
                "w": jnp.zeros((self.train_ways, dim)),
                "b": jnp.zeros((self.train_ways,)),
            }
        return params, state

    def initial_fast(self, params, state, x, ways: int):
        """Fast parameters at the start of a task's inner loop."""
        if self.head_init == "learned":
            if ways > self.train_ways:
                raise ValueError(
                    f"{ways}-way episode but the meta-learned head has data.ways={self.train_ways} "
                    "rows; use algo.head_init='zeros' to evaluate other numbers of ways"
                )
            head = jax.tree.map(lambda h: h[:ways], params["head"])
        else:
            f = jax.eval_shape(
                lambda b, s, x: models.forward(self.model, b, s, x, train=False)[0],
                params["backbone"],
                state,
                x,
            )
            head = {"w": jnp.zeros((ways, f.shape[-1])), "b": jnp.zeros((ways,))}
        return {"backbone": params["backbone"], "head": head}

    def logits(self, fast, state, x, *, train: bool, rng=None, bn_mode: str = "inductive"):
        feats, new_state = models.forward(
            self.model, fast["backbone"], state, x, train=train, bn_mode=bn_mode, rng=rng
        )
        return feats @ fast["head"]["w"].T + fast["head"]["b"], new_state

    def loss(self, fast, state, x, y, rng=None):
        """Cross-entropy with batch statistics; aux: (new BatchNorm state, accuracy)."""
        logits, new_state = self.logits(fast, state, x, train=True, rng=rng)
        return cross_entropy(logits, y), (new_state, accuracy(logits, y))

    def test_support_loss(self, fast, state, x, y):
        """The test-time inner loop's cross-entropy: the support batch's statistics, as in
        training, but no dropout or DropBlock (an evaluation-mode forward; state unchanged), so a
        test prediction does not depend on an rng."""
        logits, _ = self.logits(fast, state, x, train=False, bn_mode="transductive")
        return cross_entropy(logits, y)


def gradient_descent(
    loss_fn: Callable,
    fast0,
    rng: jax.Array,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    remat: bool = False,
    prox: tuple[float, object] | None = None,
):
    """``steps`` GD steps on ``loss_fn(fast, rng)`` as a ``lax.scan``.

    ``first_order`` treats each inner gradient as a constant; ``prox=(lam, anchor)`` adds
    ``lam/2 * ||fast - anchor||^2`` to the objective; ``remat`` recomputes each step's forward
    pass in the backward pass (memory O(1) in steps for the activations, one extra forward each).
    """

    def step(fast, i):
        g = jax.grad(loss_fn)(fast, jax.random.fold_in(rng, i))
        if first_order:
            g = jax.lax.stop_gradient(g)
        if prox is not None:
            lam, anchor = prox
            g = tree_add(g, tree_add(fast, anchor, -1.0), lam)
        return tree_add(fast, g, -lr), None

    if remat:
        step = jax.checkpoint(step)
    fast, _ = jax.lax.scan(step, fast0, jnp.arange(steps))
    return fast


def make_adapt_and_predict(
    net: Net, *, steps: int, lr: float, prox_lam: float | None = None, merged: bool = False
):
    """Test-time rule: ``steps`` GD steps from the meta-parameters on the support set (proximal to
    them when ``prox_lam`` is set; the support batch's statistics, no dropout: see
    :meth:`Net.test_support_loss`), then query logits under ``model.bn_mode``.

    ``merged`` (an algorithm whose inner loop trains on support and query as one batch:
    Meta-MinibatchProx): under transductive BatchNorm, the inner loop's support loss and the query
    logits both come from one forward over support and query together, the batch training saw
    (the loss on the support rows only). Under inductive BatchNorm the inner loop keeps the
    support's own statistics, so no query image informs a prediction of another."""

    def adapt_and_predict(params, state, support_x, support_y, query_x, ways, rng=None):
        rng = jax.random.PRNGKey(0) if rng is None else rng  # unused by the deterministic loss
        fast0 = net.initial_fast(params, state, support_x, ways)
        prox = None if prox_lam is None else (prox_lam, fast0)
        if merged and net.bn_mode == "transductive":
            ns, x = support_x.shape[0], jnp.concatenate([support_x, query_x], axis=0)
            both = lambda f: net.logits(f, state, x, train=False, bn_mode="transductive")[0]
            support_loss = lambda f, k: cross_entropy(both(f)[:ns], support_y)
            fast = gradient_descent(
                support_loss, fast0, rng, steps=steps, lr=lr, first_order=True, prox=prox
            )
            return both(fast)[ns:]
        support_loss = lambda f, k: net.test_support_loss(f, state, support_x, support_y)
        fast = gradient_descent(
            support_loss, fast0, rng, steps=steps, lr=lr, first_order=True, prox=prox
        )
        return net.logits(fast, state, query_x, train=False, bn_mode=net.bn_mode)[0]

    return adapt_and_predict


def resolve_tasks_vmapped(tasks_vmapped: int, num_tasks: int) -> int:
    """How many tasks one vmapped group holds (see :func:`map_tasks`): ``0`` means all of them
    (a plain vmap, the default); a count > 0 must divide the number of tasks.

    Fewer tasks per group trade speed for memory (the activations of one group at a time, e.g.
    second-order MAML with many inner steps on a GPU). It is not a CPU speed-up: FO-MAML on the
    20-way 1-shot workload with 4 tasks (conv_impl='xla') took ~30 s a step vmapped and ~160 s
    one task at a time on this 2-core machine (measured side by side in one process).
    """
    if tasks_vmapped < 0:
        raise ValueError(f"algo.tasks_vmapped={tasks_vmapped}; use 0 (all tasks) or a count > 0")
    if tasks_vmapped == 0:
        return num_tasks
    if num_tasks % tasks_vmapped:
        raise ValueError(
            f"algo.tasks_vmapped={tasks_vmapped} does not divide the {num_tasks} tasks of a "
            "batch; use a divisor of data.tasks_per_step (or 0 for all of them)"
        )
    return tasks_vmapped


def map_tasks(fn: Callable, xs, tasks_vmapped: int):
    """``fn`` (written for one task) over the leading task axis T of the pytree ``xs``.

    Groups of ``tasks_vmapped`` tasks are vmapped; the T / tasks_vmapped groups run one after
    another in a ``lax.map``. Task t = p * S + s sits at vmap lane p of sequential step s (S = T /
    tasks_vmapped), so that when the task axis is sharded over devices in contiguous blocks the
    vmapped axis is the sharded one (the layout's intent; grouped runs on several devices are
    not measured here). Outputs keep the task order. ``tasks_vmapped == T`` is a plain vmap.
    """
    num = jax.tree.leaves(xs)[0].shape[0]
    if tasks_vmapped >= num:
        return jax.vmap(fn)(xs)
    seq = num // tasks_vmapped
    split = lambda x: jnp.swapaxes(x.reshape((tasks_vmapped, seq) + x.shape[1:]), 0, 1)
    merge = lambda y: jnp.swapaxes(y, 0, 1).reshape((num,) + y.shape[2:])
    ys = jax.lax.map(jax.vmap(fn), jax.tree.map(split, xs))
    return jax.tree.map(merge, ys)


def task_arrays(tasks):
    return tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
