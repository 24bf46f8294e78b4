"""MTL (Wang, Zhao, Li, ICML 2021) on mini-ImageNet (Ravi & Larochelle split, 64/16/20 classes, 84x84), ResNet-12: the official recipe
(../shared/docs/ANCHORS.md), 5-way.

Published (the paper, MTL, 5-way, ResNet-12): 1-shot 59.84 ± 0.22%, 5-shot 77.72 ± 0.09%.

Prepare once (DIR holds mini-imagenet-cache-{train,val,test}.pkl, or images/ + {train,val,test}.csv):
    python -m mtl_gbml.data.prepare --dataset mini_imagenet --manual_dir DIR [--data_dir TFDS_DIR]
Train and evaluate (5-shot is the default variant):
    python -m mtl_gbml.train --config configs/mini_imagenet/mtl.py:5shot --workdir runs/mini_imagenet_mtl_5shot
    python -m mtl_gbml.train --config configs/mini_imagenet/mtl.py:1shot --workdir runs/mini_imagenet_mtl_1shot
(add ``--config.data.tfds_dir=TFDS_DIR`` if it was prepared outside $TFDS_DATA_DIR).

Recipe: one head row per base class (64 rows, official Kaiming-uniform init scaled by
sqrt(C/5)), softmax over each task's 5 classes; support and query merged into one training set of
10 images per class, 2 (5-shot) / 6 (1-shot) tasks per step; features L2-normalised in training; RAdam 1e-3, no weight decay;
augmentation: random crop with padding 8, colour jitter 0.4, horizontal flip; inductive
BatchNorm; test: frozen backbone, L2-normalised features, logistic regression (C=3), 2000 episodes,
best-validation parameters. An epoch is 1600 training tasks; validation (400 tasks) runs every
epoch.

Deviation: the official schedule multiplies the lr by 0.1 when validation accuracy plateaus for 4
epochs and stops after 15; ``mtl_gbml.optim`` has no plateau schedule, so this runs 60 epochs
with lr x 0.1 at 50% and 75% of them and evaluates the best-validation parameters (which is what
early stopping keeps).

Variants (``--config configs/mini_imagenet/mtl.py:<variant>``): ``5shot`` (default), ``1shot``;
``runlocal`` / ``1shot,runlocal``: 2 steps of a tiny ResNet-12 (widths 8) on a tiny prepared
dataset (tests use it; point data.tfds_dir at it).
"""

from mtl_gbml import base_config

# shots -> (images per class per training task, tasks per step), from the official code
RECIPE = {5: (10, 2), 1: (10, 6)}
FEATURE_NORM = True
PADDING = 8  # random-crop zero padding (MetaOptNet's transforms)
DROPBLOCK_SIZE = 5
EPOCHS = 60
DECAY_AT = (0.5, 0.75)  # fractions of training at which lr is multiplied by 0.1
TASKS_PER_EPOCH = 1600


def get_config(arg: str | None = None):
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = set(tokens) - {"1shot", "5shot", "runlocal"}
    if unknown or ("1shot" in tokens and "5shot" in tokens):
        raise ValueError(f"unknown variant {arg!r}; use 5shot, 1shot, runlocal or 1shot,runlocal")
    shots = 1 if "1shot" in tokens else 5
    per_class, tasks = RECIPE[shots]
    c = base_config.get_config("mtl")
    c.data.name, c.data.protocol, c.data.rotations = "mini_imagenet", "standard", False
    c.data.ways, c.data.shots, c.data.queries = 5, shots, per_class - shots
    c.data.tasks_per_step = tasks
    c.data.augment, c.data.shift = "crop_flip_jitter", PADDING
    c.model.name = "resnet12"
    c.model.resnet_widths = (64, 160, 320, 640)
    c.model.drop_rate, c.model.dropblock_size = 0.1, DROPBLOCK_SIZE
    c.model.bn_mode = "inductive"
    c.algo.feature_norm = FEATURE_NORM
    c.algo.head_init, c.algo.logit_scale = "official", 1.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "radam", 1e-3, 0.0
    epoch = -(-TASKS_PER_EPOCH // tasks)  # steps per epoch
    c.train.steps = EPOCHS * epoch
    c.optimizer.schedule, c.optimizer.decay_factor = "step", 0.1
    c.optimizer.decay_steps = tuple(int(f * EPOCHS) * epoch for f in DECAY_AT)
    c.train.time_budget_s = 0.0
    c.train.log_every = 50
    c.train.eval_every = epoch
    c.train.val_episodes = 400
    c.train.val_setting = f"5w{shots}s"
    c.checkpoint.every = epoch
    c.eval.settings = ("5w1s", "5w5s")
    c.eval.episodes, c.eval.queries, c.eval.batch = 2000, 15, 250
    c.eval.use_best, c.eval.logreg_c = True, 3.0
    if "runlocal" in tokens:
        c.model.resnet_widths = (8, 8, 8, 8)
        c.data.shots, c.data.queries, c.data.tasks_per_step = 1, 1, 2
        c.optimizer.decay_steps = (1,)
        c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 2, 2
        c.train.val_episodes, c.train.val_setting = 10, "5w1s"
        c.eval.settings, c.eval.queries = ("5w1s",), 2
        c.eval.episodes, c.eval.batch, c.eval.logreg_steps = 20, 10, 20
    return c
