"""MTL (Wang, Zhao, Li, ICML 2021) on FC100 (CIFAR-100 by superclass: 12/4/4 superclasses, 60/20/20 classes, 32x32), ResNet-12: the official recipe
(../shared/docs/ANCHORS.md), 5-way.

Published (the paper, MTL, 5-way, ResNet-12): 1-shot 42.4 ± 0.2%, 5-shot 57.7 ± 0.3%.

Prepare once (DIR holds cifar-100-python.tar.gz; the superclass lists ship with the package):
    python -m mtl_gbml.data.prepare --dataset fc100 --manual_dir DIR [--data_dir TFDS_DIR]
Train and evaluate (5-shot is the default variant):
    python -m mtl_gbml.train --config configs/fc100/mtl.py:5shot --workdir runs/fc100_mtl_5shot
    python -m mtl_gbml.train --config configs/fc100/mtl.py:1shot --workdir runs/fc100_mtl_1shot
(add ``--config.data.tfds_dir=TFDS_DIR`` if it was prepared outside $TFDS_DATA_DIR).

Recipe: one head row per base class (60 rows, official Kaiming-uniform init scaled by
sqrt(C/5)), softmax over each task's 5 classes; support and query merged into one training set of
10 (5-shot) / 5 (1-shot) images per class, 6 (5-shot) / 1 (1-shot) tasks per step; no feature normalisation in training (the official FC100 setting); RAdam 1e-3, no weight decay;
augmentation: random crop with padding 4, colour jitter 0.4, horizontal flip; inductive
BatchNorm; test: frozen backbone, L2-normalised features, logistic regression (C=3), 2000 episodes,
best-validation parameters. An epoch is 1600 training tasks; validation (400 tasks) runs every
epoch.

Deviation: the official schedule multiplies the lr by 0.1 when validation accuracy plateaus for 4
epochs and stops after 15; ``mtl_gbml.optim`` has no plateau schedule, so this runs 60 epochs
with lr x 0.1 at 50% and 75% of them and evaluates the best-validation parameters (which is what
early stopping keeps).

Variants (``--config configs/fc100/mtl.py:<variant>``): ``5shot`` (default), ``1shot``;
``runlocal`` / ``1shot,runlocal``: 2 steps of a tiny ResNet-12 (widths 8) on a tiny prepared
dataset (tests use it; point data.tfds_dir at it).
"""

from mtl_gbml import recipes

# shots -> (images per class per training task, tasks per step), from the official code
RECIPE = {5: (10, 6), 1: (5, 1)}
FEATURE_NORM = False


def get_config(arg: str | None = None):
    return recipes.mtl("fc100", RECIPE, FEATURE_NORM, arg)
