"""optax optimizers and learning-rate schedules from ``config.optimizer``."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adam", "radam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def decay_factors(c: ml_collections.ConfigDict) -> tuple[float, ...]:
    """'step': the factor applied at each of ``decay_steps``: ``decay_factors`` (one per step)
    where given, else ``decay_factor`` at every one."""
    factors = tuple(c.get("decay_factors", ()))
    if not factors:
        return (c.decay_factor,) * len(c.decay_steps)
    if len(factors) != len(c.decay_steps) or not all(f > 0 for f in factors):
        raise ValueError(
            f"optimizer.decay_factors={factors}: give one positive factor per decay step "
            f"(optimizer.decay_steps={tuple(c.decay_steps)}), or () for decay_factor at each"
        )
    return factors


def schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    if c.schedule == "constant":
        main = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.lr, max(total_steps - c.warmup_steps, 1))
    elif c.schedule == "step":
        main = optax.piecewise_constant_schedule(
            c.lr,
            {
                int(s) - c.warmup_steps: f
                for s, f in zip(c.decay_steps, decay_factors(c), strict=True)
            },
        )
    else:
        raise ValueError(f"optimizer.schedule={c.schedule!r}; choose one of {SCHEDULES}")
    if c.warmup_steps:
        warm = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
        return optax.join_schedules([warm, main], [c.warmup_steps])
    return main


def make(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(c, total_steps)
    eps = c.get("eps", 1e-8)
    if c.name == "adam":
        opt = optax.adam(lr, eps=eps)
    elif c.name == "radam":
        opt = optax.radam(lr, eps=eps)
    elif c.name == "sgd":
        opt = optax.sgd(lr, momentum=c.momentum, nesterov=True)
    else:
        raise ValueError(f"optimizer.name={c.name!r}; choose one of {OPTIMIZERS}")
    parts = []
    if c.grad_clip:
        parts.append(optax.clip_by_global_norm(c.grad_clip))
    if c.weight_decay:
        parts.append(optax.add_decayed_weights(c.weight_decay))
    return optax.chain(*parts, opt)
