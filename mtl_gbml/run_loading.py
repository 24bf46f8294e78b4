"""Load a finished (or running) training run from its workdir: config, algorithm and parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from mtl_gbml import algorithms, base_config, models, xla_cache
from mtl_gbml.algorithms.base import Algorithm
from mtl_gbml.config_validation import split_facts


@dataclasses.dataclass
class LoadedRun:
    config: ml_collections.ConfigDict
    algorithm: Algorithm
    params: Any
    state: Any
    step: int
    which: str  # 'best validation (step S)' or 'final'


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A run's (init, train, validation, test) keys from its ``config.seed``."""
    k_init, k_train, k_val, k_test = jax.random.split(jax.random.PRNGKey(seed), 4)
    return k_init, k_train, k_val, k_test


def saved_config(saved: dict) -> ml_collections.ConfigDict:
    """The config a run was trained with, from its config.json: the saved values over today's
    defaults. A key added since the run was made takes the value the code used before the key
    existed (``base_config.LEGACY_VALUES``), as resuming the run does; other new keys take their
    defaults."""
    config = base_config.get_config(saved["algorithm"])

    def put(sec: str, k: str, v: Any) -> None:
        config[sec][k] = tuple(v) if isinstance(config[sec][k], tuple) else v

    for sec, value in saved.items():
        if isinstance(value, dict) and sec in config:
            for k, v in value.items():
                if k in config[sec]:
                    put(sec, k, v)
        elif sec in config:
            config[sec] = value
    for key, v in base_config.LEGACY_VALUES.items():
        sec, k = key.split(".")
        if isinstance(saved.get(sec), dict) and k not in saved[sec] and k in config[sec]:
            put(sec, k, v)
    return config


def load_run(workdir: str, use_best: bool | None = None) -> LoadedRun:
    """The run in ``workdir`` at its latest checkpoint (best-validation parameters by default,
    as the final evaluation uses them when validation ran)."""
    xla_cache.guard()  # before anything compiles
    cfg_path = os.path.join(workdir, "config.json")
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {workdir} is not a mtl_gbml run directory")
    config = saved_config(json.load(open(cfg_path)))
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler())
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}: train first (python -m mtl_gbml.train)"
        )
    # onto this process's first device, whatever devices (or hosts) the run was trained on
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), manager.item_metadata(step)
    )
    tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    manager.close()
    if use_best is None:
        use_best = bool(config.eval.use_best)
    best = use_best and int(tree["best_step"]) >= 0
    model = models.build(config.model)
    num_base = split_facts(config, "train")[0]
    algorithm = algorithms.build(config.algorithm, model, config, num_base)
    return LoadedRun(
        config=config,
        algorithm=algorithm,
        params=tree["best_params" if best else "params"],
        state=tree["best_model_state" if best else "model_state"],
        step=int(tree["step"]),
        which=f"best validation (step {int(tree['best_step'])})" if best else "final",
    )
