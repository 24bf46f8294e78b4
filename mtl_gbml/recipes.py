"""The published recipes for the RGB few-shot datasets, shared by their config files.

``configs/<dataset>/<algorithm>.py`` keeps what differs (its docstring with the published number,
the per-dataset constants) and calls one of these; the four datasets share everything else:

- :func:`mtl`: the official MTL recipe (Wang, Zhao, Li 2021; ``../shared/docs/ANCHORS.md``),
  ResNet-12, RAdam, 60 epochs with lr x 0.1 at 50% and 75% (the plateau schedule's deviation is
  described in each config's docstring).
- :func:`metaoptnet_family`: ProtoNet, R2D2 and MetaOptNet as in MetaOptNet (Lee et al. 2019):
  its heads (a logit scale learned from 1; R2D2 with lambda fixed at 50 and no intercept; ProtoNet
  distances divided by the feature dimension), label smoothing 0.1 on mini-ImageNet,
  ResNet-12 with its last map flattened (16000-d features on 84x84 images, 2560-d on 32x32), SGD with momentum 0.9, weight decay 5e-4, 60 epochs of 1000 steps, lr 0.1 x 0.06 /
  0.2 / 0.2 from epochs 20 / 40 / 50 (MetaOptNet's ``lambda_epoch``).
- :func:`maml`: second-order MAML with a Conv4 of width 32 and a meta-learned head, transductive
  BatchNorm.

Variants: ``5shot`` (default), ``1shot``, and ``runlocal`` (2 steps of a tiny network on a tiny
prepared dataset; the tests use it), combinable as ``1shot,runlocal``.
"""

from __future__ import annotations

import ml_collections

from mtl_gbml import base_config

# per dataset: (random-crop zero padding, DropBlock size), MetaOptNet's transforms and network
AUGMENT = {
    "cifar_fs": (4, 2),
    "fc100": (4, 2),
    "mini_imagenet": (8, 5),
    "tiered_imagenet": (8, 5),
}
EPOCHS = 60
DECAY_AT = (0.5, 0.75)  # MTL: fractions of training at which the lr is multiplied by 0.1
TASKS_PER_EPOCH = 1600  # MTL: training tasks per epoch (official code)
# MetaOptNet's train.py: lr 0.1 * lambda_epoch(e) in (1-based) epoch e, with lambda_epoch(e) = 1.0
# if e < 20 else (0.06 if e < 40 else 0.012 if e < 50 else 0.0024); its LambdaLR steps at the start
# of each epoch, so epoch e trains at lambda_epoch(e): 0.1 for 19 epochs, 0.006 from epoch 20,
# 0.0012 from 40, 0.00024 from 50. (first epoch of each lr, factor on the previous lr)
METAOPTNET_DECAYS = ((20, 0.06), (40, 0.2), (50, 0.2))
# Both references ramp DropBlock's rate up over t = 40000 (= 20 * 2000) forward calls of a block,
# evaluation-mode ones included. The MTL code makes 2000 an epoch (1600 training tasks and 400
# validation episodes, one call each): 20 epochs, which is what the ramp is here, in steps.
# MetaOptNet makes 2000 in training (support and query embedded apart, 1000 steps) and 4000 in
# validation (2000 episodes); 20 epochs is its 20 * 2000 read as training calls (counting its
# validation calls too, the ramp would end in epoch 7).
DROPBLOCK_RAMP_EPOCHS = 20
# MetaOptNet's train.py --eps (label smoothing) in its README's commands: 0.1 on mini-ImageNet only
METAOPTNET_EPS = {"mini_imagenet": 0.1}
# MetaOptNet's heads (models/classification_heads.py): every head's logits times a learnable scale
# starting at 1; R2D2Head: ridge lambda fixed at 50, no intercept; ProtoNetHead: squared distances
# divided by the feature dimension
METAOPTNET_HEADS = {
    "protonet": {"scale_by_dim": True, "learn_scale": True, "init_scale": 1.0},
    "r2d2": {"init_lambda": 50.0, "learn_lambda": False, "intercept": False, "init_scale": 1.0},
    "metaoptnet": {"init_scale": 1.0},
}


def parse_variant(arg: str | None) -> tuple[int, bool]:
    """``'5shot' | '1shot' | 'runlocal' | '1shot,runlocal' | None`` -> (shots, runlocal)."""
    tokens = [t for t in (arg or "").split(",") if t]
    if set(tokens) - {"1shot", "5shot", "runlocal"} or {"1shot", "5shot"} <= set(tokens):
        raise ValueError(f"unknown variant {arg!r}; use 5shot, 1shot, runlocal or 1shot,runlocal")
    return (1 if "1shot" in tokens else 5), "runlocal" in tokens


def _dataset(c: ml_collections.ConfigDict, dataset: str) -> None:
    if dataset not in AUGMENT:
        raise ValueError(f"no recipe for dataset {dataset!r}; choose one of {list(AUGMENT)}")
    c.data.name, c.data.protocol, c.data.rotations = dataset, "standard", False


def _resnet12(c: ml_collections.ConfigDict, dataset: str) -> None:
    padding, dropblock = AUGMENT[dataset]
    c.data.augment, c.data.shift = "crop_flip_jitter", padding
    c.model.name = "resnet12"
    c.model.resnet_widths = (64, 160, 320, 640)
    c.model.drop_rate, c.model.dropblock_size = 0.1, dropblock


def _resnet_training(c: ml_collections.ConfigDict, epoch: int, shots: int, val: int) -> None:
    """Logging, validation every epoch on ``val`` episodes, checkpoints, test protocol."""
    c.train.time_budget_s = 0.0
    c.train.log_every = 50
    c.train.eval_every = epoch
    c.train.val_episodes = val
    c.train.val_setting = f"5w{shots}s"
    c.checkpoint.every = epoch
    c.eval.settings = ("5w1s", "5w5s")
    c.eval.episodes, c.eval.queries, c.eval.batch = 2000, 15, 250


def _resnet_runlocal(c: ml_collections.ConfigDict) -> None:
    """2 steps of a ResNet-12 of widths 8 on a tiny prepared dataset (the tests use it)."""
    c.model.resnet_widths = (8, 8, 8, 8)
    c.data.shots, c.data.queries, c.data.tasks_per_step = 1, 1, 2
    c.optimizer.decay_steps = (1,)
    if c.optimizer.get("decay_factors"):
        c.optimizer.decay_factors = c.optimizer.decay_factors[:1]
    c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 2, 2
    c.train.val_episodes, c.train.val_setting = 10, "5w1s"
    c.eval.settings, c.eval.queries = ("5w1s",), 2
    c.eval.episodes, c.eval.batch = 20, 10


def mtl(
    dataset: str,
    recipe: dict[int, tuple[int, int]],
    feature_norm: bool,
    arg: str | None = None,
) -> ml_collections.ConfigDict:
    """The official MTL recipe; ``recipe[shots] = (images per class per task, tasks per step)``."""
    shots, runlocal = parse_variant(arg)
    per_class, tasks = recipe[shots]
    c = base_config.get_config("mtl")
    _dataset(c, dataset)
    c.data.ways, c.data.shots, c.data.queries = 5, shots, per_class - shots
    c.data.tasks_per_step = tasks
    _resnet12(c, dataset)
    c.model.bn_mode = "inductive"
    c.algo.feature_norm = feature_norm
    c.algo.bn_per_task = True  # the official code's one task per forward
    c.algo.head_init, c.algo.logit_scale = "official", 1.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "radam", 1e-3, 0.0
    epoch = -(-TASKS_PER_EPOCH // tasks)  # steps per epoch
    c.train.steps = EPOCHS * epoch
    c.optimizer.schedule, c.optimizer.decay_factor = "step", 0.1
    c.optimizer.decay_steps = tuple(int(f * EPOCHS) * epoch for f in DECAY_AT)
    c.model.dropblock_ramp_steps = DROPBLOCK_RAMP_EPOCHS * epoch
    _resnet_training(c, epoch, shots, val=400)
    c.eval.use_best, c.eval.logreg_c = True, 3.0
    if runlocal:
        _resnet_runlocal(c)
        c.eval.logreg_steps = 20
    return c


def metaoptnet_family(
    algorithm: str, dataset: str, train_shot: int, arg: str | None = None
) -> ml_collections.ConfigDict:
    """ProtoNet / R2D2 / MetaOptNet as trained in MetaOptNet: 5-way tasks with ``train_shot``
    shots (whatever the test shot), 6 queries per class, 8 tasks per step."""
    if algorithm not in ("protonet", "r2d2", "metaoptnet"):
        raise ValueError(f"{algorithm!r} is not protonet, r2d2 or metaoptnet")
    shots, runlocal = parse_variant(arg)
    c = base_config.get_config(algorithm)
    _dataset(c, dataset)
    c.data.ways, c.data.shots, c.data.queries = 5, train_shot, 6
    c.data.tasks_per_step = 8
    _resnet12(c, dataset)
    c.model.avg_pool = False  # resnet12(avg_pool=False): the last map flattened
    c.algo.update(METAOPTNET_HEADS[algorithm])
    c.algo.label_smoothing = METAOPTNET_EPS.get(dataset, 0.0)
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.1, 0.9
    c.optimizer.weight_decay = 5e-4
    epoch = 1000
    c.optimizer.schedule = "step"  # 0.1 -> 0.006 -> 0.0012 -> 0.00024, as MetaOptNet's
    c.optimizer.decay_steps = tuple((e - 1) * epoch for e, _ in METAOPTNET_DECAYS)
    c.optimizer.decay_factors = tuple(f for _, f in METAOPTNET_DECAYS)
    c.model.dropblock_ramp_steps = DROPBLOCK_RAMP_EPOCHS * epoch
    c.train.steps = 60 * epoch
    _resnet_training(c, epoch, shots, val=2000)
    if runlocal:
        _resnet_runlocal(c)
    return c


def maml(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """MAML: Conv4 width 32, a meta-learned head, transductive BatchNorm, 5 inner steps of 0.01
    (10 at test)."""
    shots, runlocal = parse_variant(arg)
    c = base_config.get_config("maml")
    _dataset(c, dataset)
    c.data.ways, c.data.shots, c.data.queries = 5, shots, 15
    c.data.tasks_per_step = 4 if shots == 1 else 2
    c.model.name, c.model.width, c.model.pool_last = "conv4", 32, True
    c.model.bn_mode = "transductive"
    c.algo.inner_steps, c.algo.inner_lr = 5, 0.01
    c.algo.test_inner_steps, c.algo.test_inner_lr = 10, 0.01
    c.algo.head_init = "learned"  # MAML meta-learns the 5-way head (tested at 5 ways only)
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
    if runlocal:
        c.model.width = 8
        c.data.shots, c.data.queries, c.data.tasks_per_step = 1, 1, 2
        c.algo.inner_steps, c.algo.test_inner_steps = 1, 2
        c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 0, 2
        c.eval.settings, c.eval.queries = ("5w1s",), 2
        c.eval.episodes, c.eval.batch = 10, 10
    return c
