"""MetaOptNet-SVM (Crammer-Singer SVM head) on CIFAR-FS, 5-way: the MetaOptNet recipe (Lee et al. 2019), the baseline the
MTL paper compares against.

Published (MetaOptNet-SVM, ResNet-12): 1-shot 72.0 ± 0.7%, 5-shot 84.2 ± 0.5%.

Prepare once: python -m mtl_gbml.data.prepare --dataset cifar_fs --manual_dir DIR
Train and evaluate:
    python -m mtl_gbml.train --config configs/cifar_fs/metaoptnet.py:5shot --workdir runs/cifar_fs_metaoptnet_5shot
    python -m mtl_gbml.train --config configs/cifar_fs/metaoptnet.py:1shot --workdir runs/cifar_fs_metaoptnet_1shot

Recipe (MetaOptNet's code): ResNet-12 (DropBlock 0.1) with its last map flattened (2560-d
features); a Crammer-Singer SVM head with C = 0.1 and a logit scale learned from 1; 5-shot 5-way
training episodes with 6 queries per class whatever the test shot, 8 episodes per step, 1000 steps
per epoch, 60 epochs, SGD (Nesterov momentum 0.9, weight decay 5e-4) lr 0.1 x 0.06 / 0.012 / 0.0024
at epochs 20 / 40 / 50, random crop (padding 4) + colour jitter 0.4 + horizontal flip. Test: 2000
episodes with 15 queries (MetaOptNet's test.py: 1000). Variants: ``5shot`` (default), ``1shot`` (they differ only in validation),
``runlocal`` (2 steps of a tiny ResNet-12 on a tiny prepared dataset; tests use it).
"""

from mtl_gbml import recipes

TRAIN_SHOT = 5


def get_config(arg: str | None = None):
    return recipes.metaoptnet_family("metaoptnet", "cifar_fs", TRAIN_SHOT, arg)
