"""Synthetic few-shot regression problems whose tasks share one representation.

Every task i is y = w_i · h(x) / sqrt(r) + noise with a *shared* feature map
h(x) = relu(A x / sqrt(d)) (A fixed, r × d Gaussian) and a task-specific head w_i ~ N(0, I_r).
Inputs are Gaussian vectors rescaled to norm sqrt(d), so x·x/d = 1 and every kernel diagonal is
the same. Each task has a support set (X', Y') of ``n_support`` points and a query set (X, Y) of
``n_query`` points. Training tasks and unseen test tasks are drawn from the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskSet:
    """A batch of tasks; arrays are (n_tasks, n_points, ...)."""

    xs: np.ndarray  # support inputs (T, ns, d)
    ys: np.ndarray  # support targets (T, ns)
    xq: np.ndarray  # query inputs (T, nq, d)
    yq: np.ndarray  # query targets (T, nq)

    @property
    def n_tasks(self) -> int:
        return int(self.xs.shape[0])


@dataclass(frozen=True)
class Problem:
    """Training tasks (seen during meta-/multi-task training) and unseen test tasks."""

    train: TaskSet
    test: TaskSet


def _inputs(rng: np.random.Generator, shape: tuple[int, ...], dim: int) -> np.ndarray:
    x = rng.standard_normal((*shape, dim))
    return x / np.linalg.norm(x, axis=-1, keepdims=True) * np.sqrt(dim)


def _taskset(
    rng: np.random.Generator, a: np.ndarray, n_tasks: int, ns: int, nq: int, noise: float
) -> TaskSet:
    d = a.shape[1]
    r = a.shape[0]
    w = rng.standard_normal((n_tasks, r))

    def label(x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ a.T / np.sqrt(d), 0.0)
        y = np.einsum("tnr,tr->tn", h, w) / np.sqrt(r)
        return y + noise * rng.standard_normal(y.shape)

    xs = _inputs(rng, (n_tasks, ns), d)
    xq = _inputs(rng, (n_tasks, nq), d)
    return TaskSet(xs=xs, ys=label(xs), xq=xq, yq=label(xq))


def make_problem(
    n_train: int = 8,
    n_test: int = 20,
    n_support: int = 5,
    n_query: int = 10,
    dim: int = 8,
    rep_dim: int = 4,
    noise: float = 0.0,
    seed: int = 0,
) -> Problem:
    """Draw a shared representation, ``n_train`` training tasks and ``n_test`` unseen tasks."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rep_dim, dim))
    train = _taskset(rng, a, n_train, n_support, n_query, noise)
    test = _taskset(rng, a, n_test, n_support, n_query, noise)
    return Problem(train=train, test=test)
