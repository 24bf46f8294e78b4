"""iMAML (implicit meta-gradient by CG) on Omniglot 20-way 1-shot, Vinyals split, Conv4,
inductive BatchNorm.

python -m mtl_gbml.train --config configs/omniglot/imaml.py --workdir runs/omniglot_imaml
Targets (iMAML paper, Hessian-free variant, ../shared/docs/ANCHORS.md): 99.50 / 99.74 / 96.18 /
99.14 for 5w1s / 5w5s / 20w1s / 20w5s (transductive BatchNorm in the paper).
Proximal strength lambda 2, 16 GD steps of lr 0.1 (train and test), 5 CG steps on the damped
system 2 I + H / 12 (cg_damping 1, lam_damping 10), 16 tasks per step, Adam 1e-3: the authors'
Omniglot command and code (github.com/aravindr93/imaml_dev), except that the inner loop is
proximal GD at every step (theirs: plain GD, then one proximal step; at test, no proximal term)
and that Adam's epsilon is optax's 1e-8 (theirs: 1e-3; ``--config.optimizer.eps=1e-3``; the
README's iMAML numbers were made with 1e-8). `:runlocal` runs in seconds.
"""

from mtl_gbml import base_config


def get_config(arg: str | None = None):
    c = base_config.get_config("imaml")
    c.data.ways, c.data.shots, c.data.queries = 20, 1, 15
    c.data.tasks_per_step = 16
    # per-task adapted weights: as one matmul over 3x3 patches each conv is a batched matmul under
    # vmap; as lax.conv it becomes a grouped convolution, 14x slower per FO-MAML step on CPU
    # (benchmarks/results/step_cost.md)
    c.model.conv_impl = "im2col"
    c.algo.lam, c.algo.cg_steps = 2.0, 5
    c.algo.inner_steps, c.algo.inner_lr = 16, 0.1
    c.algo.test_inner_steps, c.algo.test_inner_lr = 16, 0.1
    c.optimizer.name, c.optimizer.lr = "adam", 1e-3
    c.train.steps = 60000
    c.train.time_budget_s = 5400.0
    c.train.log_every = 25
    c.train.eval_every = 500
    c.train.val_episodes = 200
    c.train.val_setting = "20w1s"
    c.checkpoint.every = 250
    c.eval.episodes, c.eval.batch = 1000, 25  # per-episode adaptation: memory grows with batch
    if arg == "runlocal":
        c.model.width = 8
        c.data.ways, c.data.tasks_per_step, c.data.queries = 5, 2, 2
        c.algo.inner_steps, c.algo.test_inner_steps, c.algo.cg_steps = 2, 2, 2
        c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 2, 1, 0, 2
        c.train.time_budget_s = 0.0
        c.eval.episodes, c.eval.batch = 10, 10
        c.eval.settings = ("5w1s",)
    elif arg == "budget":  # the equal wall-clock budget comparison (benchmarks/time_to_accuracy.py)
        c.data.queries, c.data.tasks_per_step = 5, 4
        c.optimizer.schedule = "constant"
        c.train.steps, c.train.eval_every, c.train.val_episodes = 10**6, 20, 100
        c.checkpoint.every = 20
        c.eval.episodes = 500
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; use 'runlocal', 'budget' or none")
    return c
