"""MAML (second order) on FC100, Conv4 (32 filters), 5-way: the MAML paper's
mini-ImageNet recipe applied as is.

Published: 1-shot 38.1%, 5-shot 50.4% (as cited by the MetaOptNet paper).

Prepare once: python -m mtl_gbml.data.prepare --dataset fc100 --manual_dir DIR
Train and evaluate:
    python -m mtl_gbml.train --config configs/fc100/maml.py:5shot --workdir runs/fc100_maml_5shot
    python -m mtl_gbml.train --config configs/fc100/maml.py:1shot --workdir runs/fc100_maml_1shot

Recipe: a meta-learned head (zero-initialised); 5 inner steps of lr 0.01 in training, 10 at
test; 15 queries per class; 4 tasks per step
(1-shot) / 2 (5-shot); Adam 1e-3; 60,000 steps; no augmentation; transductive BatchNorm as in the
MAML paper's numbers. Variants: ``5shot`` (default), ``1shot``, ``runlocal`` (tests).
"""

from mtl_gbml import recipes


def get_config(arg: str | None = None):
    return recipes.maml("fc100", arg)
