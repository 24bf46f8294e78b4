"""R2D2 (ridge-regression head; MetaOptNet-RR) on tiered-ImageNet, 5-way: the MetaOptNet recipe (Lee et al. 2019), the baseline the
MTL paper compares against.

Published (no published ResNet-12 ridge figure in ANCHORS.md): 1-shot n/a%, 5-shot n/a%.

Prepare once: python -m mtl_gbml.data.prepare --dataset tiered_imagenet --manual_dir DIR
Train and evaluate:
    python -m mtl_gbml.train --config configs/tiered_imagenet/r2d2.py:5shot --workdir runs/tiered_imagenet_r2d2_5shot
    python -m mtl_gbml.train --config configs/tiered_imagenet/r2d2.py:1shot --workdir runs/tiered_imagenet_r2d2_1shot

Recipe (MetaOptNet's code): ResNet-12 (DropBlock 0.1), 10-shot 5-way training episodes with
6 queries per class whatever the test shot, 8 episodes per step, 1000 steps per epoch, 60 epochs,
SGD (Nesterov momentum 0.9, weight decay 5e-4) lr 0.1 x 0.06 / 0.012 / 0.0024 at epochs 20 / 40 /
50, random crop (padding 8) + colour jitter 0.4 + horizontal flip; test 2000 episodes with 15
queries. Variants: ``5shot`` (default), ``1shot`` (they differ only in validation),
``runlocal`` (2 steps of a tiny ResNet-12 on a tiny prepared dataset; tests use it).
"""

from mtl_gbml import base_config

TRAIN_SHOT = 10


def get_config(arg: str | None = None):
    tokens = [t for t in (arg or "").split(",") if t]
    if set(tokens) - {"1shot", "5shot", "runlocal"} or {"1shot", "5shot"} <= set(tokens):
        raise ValueError(f"unknown variant {arg!r}; use 5shot, 1shot or runlocal")
    shots = 1 if "1shot" in tokens else 5
    c = base_config.get_config("r2d2")
    c.data.name, c.data.protocol, c.data.rotations = "tiered_imagenet", "standard", False
    c.data.ways, c.data.shots, c.data.queries = 5, TRAIN_SHOT, 6
    c.data.tasks_per_step = 8
    c.data.augment, c.data.shift = "crop_flip_jitter", 8
    c.model.name = "resnet12"
    c.model.resnet_widths = (64, 160, 320, 640)
    c.model.drop_rate, c.model.dropblock_size = 0.1, 5
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.1, 0.9
    c.optimizer.weight_decay = 5e-4
    epoch = 1000
    c.optimizer.schedule = "step"
    c.optimizer.decay_steps = (20 * epoch, 40 * epoch, 50 * epoch)
    c.optimizer.decay_factor = (
        0.2  # 0.1 -> 0.02 -> 0.004 -> 0.0008 (MetaOptNet: 0.006 / 0.0012 / 0.00024)
    )
    c.train.steps = 60 * epoch
    c.train.time_budget_s = 0.0
    c.train.log_every = 50
    c.train.eval_every = epoch
    c.train.val_episodes = 2000
    c.train.val_setting = f"5w{shots}s"
    c.checkpoint.every = epoch
    c.eval.settings = ("5w1s", "5w5s")
    c.eval.episodes, c.eval.queries, c.eval.batch = 2000, 15, 250
    if "runlocal" in tokens:
        c.model.resnet_widths = (8, 8, 8, 8)
        c.data.shots, c.data.queries, c.data.tasks_per_step = 1, 1, 2
        c.optimizer.decay_steps = (1,)
        c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 2, 2
        c.train.val_episodes, c.train.val_setting = 10, "5w1s"
        c.eval.settings, c.eval.queries = ("5w1s",), 2
        c.eval.episodes, c.eval.batch = 20, 10
    return c
