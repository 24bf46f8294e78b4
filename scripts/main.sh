#!/usr/bin/env bash
# The main job: a short, real MTL training on Omniglot (Vinyals split, Conv4) and its evaluation
# (5w1s, 5w5s, 20w1s, 20w5s). A few minutes on 2 CPU cores. Extra arguments go to mtl_gbml.train.
source "$(dirname "$0")/env.sh"
python -m mtl_gbml.train --config configs/omniglot/mtl.py:quick --workdir "${WORKDIR:-runs/omniglot_mtl_quick}" "$@"
