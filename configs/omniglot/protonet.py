"""ProtoNet (squared Euclidean distance to class means) on Omniglot, Vinyals split, Conv4,
inductive BatchNorm.

python -m mtl_gbml.train --config configs/omniglot/protonet.py --workdir runs/omniglot_protonet
Targets (ProtoNet paper, ../shared/docs/ANCHORS.md): 98.8 / 99.7 / 96.0 / 98.9 for
5w1s / 5w5s / 20w1s / 20w5s. Paper recipe: 60-way 1-shot training episodes with 5 queries per
class, Adam 1e-3 halved every 2000 episodes. `:runlocal` runs in seconds (tests use it).
"""

from mtl_gbml import base_config


def get_config(arg: str | None = None):
    c = base_config.get_config("protonet")
    c.data.ways, c.data.shots, c.data.queries = 60, 1, 5
    c.data.tasks_per_step = 1
    c.optimizer.name, c.optimizer.lr = "adam", 1e-3
    c.optimizer.schedule = "step"
    c.optimizer.decay_steps = tuple(range(2000, 60001, 2000))
    c.optimizer.decay_factor = 0.5
    c.train.steps = 60000
    c.train.time_budget_s = 5400.0
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.val_setting = "20w1s"
    c.checkpoint.every = 1000
    if arg == "runlocal":
        c.model.width = 8
        c.data.ways, c.data.tasks_per_step, c.data.queries = 5, 2, 2
        c.optimizer.decay_steps = (1,)
        c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 0, 2
        c.train.time_budget_s = 0.0
        c.eval.episodes, c.eval.batch = 20, 10
        c.eval.settings = ("5w1s",)
    elif arg == "budget":  # the equal wall-clock budget comparison (benchmarks/time_to_accuracy.py)
        c.optimizer.schedule = "constant"
        c.train.steps, c.train.eval_every, c.train.val_episodes = 10**6, 50, 500
        c.checkpoint.every = 50
        c.eval.episodes = 10000
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use 'runlocal', 'budget' or none")
    return c
