"""Shared defaults for every run. Config files in ``configs/`` start from :func:`get_config` and
override. Every key the code reads is declared here; configs are locked, so a misspelt key fails.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def get_config(algorithm: str = "mtl") -> ml_collections.ConfigDict:
    """Defaults (Omniglot, Conv4) plus the algorithm's own section ``config.algo``."""
    from mtl_gbml import algorithms  # late import: algorithms import models, not configs

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.algorithm = algorithm

    c.data = ml_collections.ConfigDict()
    c.data.name = "omniglot"  # | 'mini_imagenet' | 'tiered_imagenet' | 'cifar_fs' | 'fc100'
    # omniglot: 'vinyals' (1028/172/423 characters) or 'lake' (background/eval); others: 'standard'
    c.data.protocol = "vinyals"
    c.data.rotations = True  # rotations by 90/180/270 degrees are new classes (Vinyals protocol)
    c.data.data_dir = ""  # raw archives + split files; '' = $MTL_GBML_DATA_DIR
    c.data.tfds_dir = ""  # where TFDS keeps prepared data; '' = TFDS default ($TFDS_DATA_DIR)
    c.data.ways = 20
    c.data.shots = 1
    c.data.queries = 15
    c.data.tasks_per_step = 16
    # 'none' | 'shift' (random translation by up to data.shift pixels) | 'crop_flip' (random crop
    # with padding data.shift + horizontal flip) | 'crop_flip_jitter' (+ colour jitter 0.4)
    c.data.augment = "none"
    c.data.shift = 2

    c.model = ml_collections.ConfigDict()
    c.model.name = "conv4"
    c.model.width = 64
    c.model.pool_last = True
    c.model.conv_impl = "xla"  # conv4 only: 'xla' | 'im2col' | 'im2col_first' (models/conv4.py)
    # conv4 only: 'reference' (conv-BN-ReLU-pool) | 'fused' (pool before the BN affine + ReLU;
    # exact, see models/conv4.py and benchmarks/results/fast_backbone.md)
    c.model.block = "fused"  # fastest exact block on CPU: benchmarks/results/fast_backbone.md
    # conv4, block='fused', one-channel input (Omniglot): the first block over this many images at
    # a time (models/conv4.py); -1: 64 on CPU (4x faster there), 0 (XLA's conv) on GPU/TPU
    c.model.chunk_first = -1
    c.model.dtype = "float32"
    c.model.bn_mode = "inductive"  # test-time BatchNorm: 'inductive' (running) | 'transductive'
    c.model.resnet_widths = (64, 160, 320, 640)
    c.model.drop_rate = 0.1
    c.model.dropblock_size = 5
    c.model.remat = False
    # ResNet-12: DropBlock's rate ramps up linearly over this many training steps (0 = off)
    c.model.dropblock_ramp_steps = 0
    # ResNet-12: global-average-pool the last map (the MTL code: 640 dims) or flatten it (False:
    # MetaOptNet, 16000 dims on 84x84 images)
    c.model.avg_pool = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # 'adam' | 'radam' | 'sgd' (momentum)
    c.optimizer.lr = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "constant"  # 'constant' | 'cosine' | 'step'
    c.optimizer.warmup_steps = 0
    c.optimizer.decay_steps = ()  # for 'step': multiply lr by decay_factor at these steps
    c.optimizer.decay_factor = 0.1
    # for 'step': one factor per decay_steps entry (MetaOptNet: 0.06, 0.2, 0.2); () = decay_factor
    # at each
    c.optimizer.decay_factors = ()
    c.optimizer.grad_clip = 0.0  # global-norm clip; 0 = off
    c.optimizer.eps = 1e-8  # adam, radam: the denominator's epsilon (optax's and torch's default)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.time_budget_s = (
        0.0  # stop (checkpoint, then evaluate) after this much training; 0 = off
    )
    c.train.log_every = 50
    c.train.eval_every = 500  # validation during training; 0 = off
    c.train.val_split = "val"
    c.train.val_episodes = 1000
    c.train.val_setting = ""  # e.g. '20w1s'; '' = the training ways and shots
    # more settings validated at the same steps, logged as val_accuracy_<setting> (e.g.
    # ('5w1s',) -> val_accuracy_5w1s); the best parameters are chosen on val_setting alone
    c.train.val_extra_settings = ()
    c.train.nonfinite = "raise"  # 'raise' | 'skip': what to do with a NaN/Inf loss or gradient

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.settings = ("5w1s", "5w5s", "20w1s", "20w5s")
    c.eval.episodes = 10000
    c.eval.queries = 15
    c.eval.split = "test"
    c.eval.batch = 500  # episodes per vmapped evaluation batch
    c.eval.use_best = True  # evaluate the best-validation parameters when validation ran
    c.eval.logreg_c = 3.0  # inverse L2 strength of the test-time logistic regression (sklearn C)
    c.eval.logreg_steps = 1000  # at most; the fit stops at the gradient tolerance below
    c.eval.logreg_tol = 1e-5  # gradient norm / (C * support size), as sklearn's tol; 0: all steps

    # devices and hosts (see mtl_gbml/parallel.py); none of these change the results
    c.parallel = ml_collections.ConfigDict()
    # multi-host: coordinator ('host:port' of process 0), num_processes and process_id; or
    # distributed=True to let jax.distributed.initialize() detect them (TPU pods, SLURM, Open MPI,
    # or $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID)
    c.parallel.distributed = False
    c.parallel.coordinator = ""
    c.parallel.num_processes = 0  # 0 = detect
    c.parallel.process_id = -1  # -1 = detect
    c.parallel.shard_head = False  # MTL: split the head table's class axis over the devices

    c.algo = algorithms.default_config(algorithm)
    return c


# Config keys added after runs had been saved without them, with the value the code used before
# the key existed. A saved config that lacks one of these is compared as if it held that value, so
# an old run resumes only under the settings it ran with. A saved config that lacks any other key is
# refused: nobody recorded what the run did there. ``run_loading.load_run`` rebuilds such a run with
# these values too. Give every new key an entry here; tests/test_train.py fails on a key that is
# in neither this table nor tests/config_keys.json.
LEGACY_VALUES: dict[str, Any] = {
    "model.block": "reference",  # 10842c6 ('fused' is the same function, other float rounding)
    "model.chunk_first": 0,  # 2329aa7 (0: the first block unchunked)
    "algo.tasks_vmapped": 0,  # 7ad080c (0: every task in one vmap)
    "algo.cg_damping": 0.0,  # 53cda7d (iMAML's CG solved the undamped system before)
    "algo.lam_damping": 0.0,  # 53cda7d
    "train.val_extra_settings": [],  # f6746c4
    "algo.solver_tol": 0.0,  # MetaOptNet ran its solver_steps in full before
    "optimizer.decay_factors": [],  # decay_factor at every decay step
    "model.dropblock_ramp_steps": 0,  # DropBlock at its full rate from the first step
    "model.avg_pool": True,  # ResNet-12's features were always average-pooled
    "algo.label_smoothing": 0.0,  # protonet, r2d2, metaoptnet: none before
    "algo.intercept": True,  # r2d2: the features always had a constant 1 appended
    "algo.scale_by_dim": False,  # protonet: plain negative squared distances before
    "algo.learn_scale": False,
    "optimizer.eps": 1e-8,  # optax's default, which adam and radam always used
    "algo.bn_per_task": False,  # mtl: a step's tasks were always one BatchNorm batch
    "algo.init_scale": 1.0,  # protonet: no scale before (r2d2 and metaoptnet always had the key)
}
