"""MAML (second order) on tiered-ImageNet, Conv4 (32 filters), 5-way: the MAML paper's
mini-ImageNet recipe applied as is.

Published: 1-shot n/a%, 5-shot n/a% (no figure in ANCHORS.md).

Prepare once: python -m mtl_gbml.data.prepare --dataset tiered_imagenet --manual_dir DIR
Train and evaluate:
    python -m mtl_gbml.train --config configs/tiered_imagenet/maml.py:5shot --workdir runs/tiered_imagenet_maml_5shot
    python -m mtl_gbml.train --config configs/tiered_imagenet/maml.py:1shot --workdir runs/tiered_imagenet_maml_1shot

Recipe: 5 inner steps of lr 0.01 in training, 10 at test; 15 queries per class; 4 tasks per step
(1-shot) / 2 (5-shot); Adam 1e-3; 60,000 steps; no augmentation; transductive BatchNorm as in the
MAML paper's numbers. Variants: ``5shot`` (default), ``1shot``, ``runlocal`` (tests).
"""

from mtl_gbml import base_config


def get_config(arg: str | None = None):
    tokens = [t for t in (arg or "").split(",") if t]
    if set(tokens) - {"1shot", "5shot", "runlocal"} or {"1shot", "5shot"} <= set(tokens):
        raise ValueError(f"unknown variant {arg!r}; use 5shot, 1shot or runlocal")
    shots = 1 if "1shot" in tokens else 5
    c = base_config.get_config("maml")
    c.data.name, c.data.protocol, c.data.rotations = "tiered_imagenet", "standard", False
    c.data.ways, c.data.shots, c.data.queries = 5, shots, 15
    c.data.tasks_per_step = 4 if shots == 1 else 2
    c.model.name, c.model.width, c.model.pool_last = "conv4", 32, True
    c.model.bn_mode = "transductive"
    c.algo.inner_steps, c.algo.inner_lr = 5, 0.01
    c.algo.test_inner_steps, c.algo.test_inner_lr = 10, 0.01
    c.optimizer.name, c.optimizer.lr = "adam", 1e-3
    c.train.steps = 60000
    c.train.time_budget_s = 0.0
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.val_episodes = 200
    c.train.val_setting = f"5w{shots}s"
    c.checkpoint.every = 1000
    c.eval.settings = (f"5w{shots}s",)
    c.eval.episodes, c.eval.batch = 600, 25  # per-episode adaptation: memory grows with batch
    if "runlocal" in tokens:
        c.model.width = 8
        c.data.shots, c.data.queries, c.data.tasks_per_step = 1, 1, 2
        c.algo.inner_steps, c.algo.test_inner_steps = 1, 2
        c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 0, 2
        c.eval.settings, c.eval.queries = ("5w1s",), 2
        c.eval.episodes, c.eval.batch = 10, 10
    return c
