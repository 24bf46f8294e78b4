"""R2D2 (ridge-regression head; MetaOptNet-RR) on mini-ImageNet, 5-way: the MetaOptNet recipe (Lee et al. 2019), the baseline the
MTL paper compares against.

Published (MetaOptNet-RR (ridge head), ResNet-12; R2D2 paper's own CNN: 51.8 ± 0.2 / 68.4 ± 0.2): 1-shot 61.41%, 5-shot 77.88%.

Prepare once: python -m mtl_gbml.data.prepare --dataset mini_imagenet --manual_dir DIR
Train and evaluate:
    python -m mtl_gbml.train --config configs/mini_imagenet/r2d2.py:5shot --workdir runs/mini_imagenet_r2d2_5shot
    python -m mtl_gbml.train --config configs/mini_imagenet/r2d2.py:1shot --workdir runs/mini_imagenet_r2d2_1shot

Recipe (MetaOptNet's code): ResNet-12 (DropBlock 0.1) with its last map flattened (16000-d
features); MetaOptNet's ridge head: lambda fixed at 50, no intercept, a logit scale learned from 1;
15-shot 5-way training episodes with 6 queries per class whatever the test shot, 8 episodes per
step, 1000 steps per epoch, 60 epochs, SGD (Nesterov momentum 0.9, weight decay 5e-4) lr 0.1 x 0.06
/ 0.012 / 0.0024 at epochs 20 / 40 / 50, random crop (padding 8) + colour jitter 0.4 + horizontal
flip, label smoothing 0.1. Test: 2000 episodes with 15 queries (MetaOptNet's test.py: 1000).
Variants: ``5shot`` (default), ``1shot`` (they differ only in validation),
``runlocal`` (2 steps of a tiny ResNet-12 on a tiny prepared dataset; tests use it).
"""

from mtl_gbml import recipes

TRAIN_SHOT = 15


def get_config(arg: str | None = None):
    return recipes.metaoptnet_family("r2d2", "mini_imagenet", TRAIN_SHOT, arg)
