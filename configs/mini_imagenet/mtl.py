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

from mtl_gbml import recipes

# shots -> (images per class per training task, tasks per step), from the official code
RECIPE = {5: (10, 2), 1: (10, 6)}
FEATURE_NORM = True


def get_config(arg: str | None = None):
    return recipes.mtl("mini_imagenet", RECIPE, FEATURE_NORM, arg)
