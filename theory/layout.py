"""Flatten a :class:`theory.tasks.Problem` into one point array plus per-task index arrays.

Kernels are computed once over all points (train and test supports and queries); predictors in
:mod:`theory.predictors` then address blocks by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from theory.tasks import Problem, TaskSet


@dataclass(frozen=True)
class Layout:
    """All points of a problem and where each task's support/query sets live."""

    x: np.ndarray  # (n_all, d)
    y: np.ndarray  # (n_all,)
    train: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray]]


def _add(taskset: TaskSet, xs: list, ys: list, offset: int):
    tasks = []
    for i in range(taskset.n_tasks):
        ns, nq = taskset.xs.shape[1], taskset.xq.shape[1]
        s = np.arange(offset, offset + ns)
        q = np.arange(offset + ns, offset + ns + nq)
        xs += [taskset.xs[i], taskset.xq[i]]
        ys += [taskset.ys[i], taskset.yq[i]]
        tasks.append((s, q))
        offset += ns + nq
    return tasks, offset


def flatten(problem: Problem) -> Layout:
    """Stack train then test tasks, each as support followed by query."""
    xs: list = []
    ys: list = []
    train, off = _add(problem.train, xs, ys, 0)
    test, _ = _add(problem.test, xs, ys, off)
    return Layout(x=np.concatenate(xs), y=np.concatenate(ys), train=train, test=test)


def split_by_task(values: np.ndarray, tasks: list[tuple[np.ndarray, np.ndarray]]) -> list:
    """Split concatenated query predictions back into one array per task."""
    sizes = np.cumsum([len(q) for _, q in tasks])[:-1]
    return np.split(values, sizes)
