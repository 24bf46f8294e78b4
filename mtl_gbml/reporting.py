"""What a run leaves in its workdir: metrics.jsonl (+ TensorBoard), results.json and results.md."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np


def params_digest(params: Any) -> str:
    """sha256 over the parameters' bytes, leaves in tree order: equal digests = identical weights."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader, or a rerun after a kill mid-write, sees the old
    file or the new one, never a torn one: a temporary file beside it, synced, then renamed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class MetricsWriter:
    """Appends one JSON object per logged step; on resume, drops lines past the restored step."""

    def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            keep = []
            for line in open(self.path):
                try:
                    if json.loads(line)["step"] <= resume_step:
                        # a last line cut just before its newline still parses: end it
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a killed run
            atomic_write(self.path, "".join(keep))  # a kill now must not lose the history
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1
            )

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def results_markdown(results: dict) -> str:
    lines = [
        f"# {results['algorithm']} on {results['dataset']} ({results['backbone']}, "
        f"BatchNorm {results['bn_mode']})",
        "",
        f"Trained {results['train']['steps']} steps in {results['train']['wall_s']:.0f} s on "
        f"{results['devices']} device(s). params_digest `{results['train']['params_digest'][:16]}`",
        "",
        "| setting | split | accuracy % | 95% CI | episodes |",
        "|---|---|---|---|---|",
    ]
    for k, v in results["eval"].items():
        lines.append(
            f"| {k} | {v['split']} | {v['accuracy']:.2f} | ±{v['ci95']:.2f} | {v['episodes']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict) -> None:
    atomic_write(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    atomic_write(os.path.join(workdir, "results.md"), results_markdown(results))
