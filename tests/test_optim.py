"""optim.py: the learning-rate schedules against their closed forms, and the update chain
(global-norm clip, then L2 weight decay, then SGD with Nesterov momentum or Adam) against the
same updates written out in numpy, step by step."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mtl_gbml import base_config, optim


def _config(**kw):
    c = base_config.get_config("mtl").optimizer
    for k, v in kw.items():
        c[k] = v
    return c


def _lr(t, lr, total, schedule, warmup=0, decay_steps=(), factor=0.1):
    """The schedule as documented in base_config: linear warmup from 0, then the main schedule
    counted from the end of the warmup (cosine to 0 at ``total``; ``step``: times ``factor`` from
    each of ``decay_steps``, counted from step 0 of the run)."""
    if t < warmup:
        return lr * t / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(total - warmup, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(t - warmup, span) / span))
    return lr * factor ** sum(t >= s for s in decay_steps)


@pytest.mark.parametrize(
    "schedule,warmup,decay_steps",
    [
        ("constant", 0, ()),
        ("constant", 5, ()),
        ("cosine", 0, ()),
        ("cosine", 10, ()),
        ("step", 0, (20, 35)),
        ("step", 8, (20, 35)),
    ],
)
def test_schedules_are_their_closed_forms(schedule, warmup, decay_steps):
    total, lr = 50, 0.3
    c = _config(lr=lr, schedule=schedule, warmup_steps=warmup, decay_steps=decay_steps)
    fn = optim.schedule(c, total)
    for t in range(total + 5):  # past the end: cosine stays at 0
        want = _lr(t, lr, total, schedule, warmup, decay_steps)
        assert float(fn(t)) == pytest.approx(want, rel=1e-5, abs=1e-7), t


def test_step_decay_lands_on_the_named_steps_with_a_warmup():
    c = _config(lr=1.0, schedule="step", warmup_steps=8, decay_steps=(20,), decay_factor=0.5)
    fn = optim.schedule(c, 50)
    assert [float(fn(t)) for t in (8, 19, 20, 49)] == [1.0, 1.0, 0.5, 0.5]


def _run(c, params, grads):
    tx = optim.make(c, 100)
    state = tx.init(params)
    out = []
    p = params
    for g in grads:
        u, state = tx.update(g, state, p)
        p = {k: p[k] + u[k] for k in p}
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4)}
    params["b"] = params["b"].astype(np.float32)
    grads = [
        {k: (5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
        for _ in range(4)
    ]
    return params, grads


def _clip_and_decay(g, p, clip, wd):
    if clip:
        norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g.values()))
        g = {k: v * min(1.0, clip / norm) for k, v in g.items()}
    return {k: g[k] + wd * p[k] for k in g}


@pytest.mark.parametrize("clip,wd", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.05), (2.0, 0.05)])
def test_sgd_nesterov_with_clip_and_weight_decay_matches_numpy(clip, wd):
    """PyTorch's SGD(nesterov=True) with coupled weight decay: buf = m buf + g; p -= lr (g + m buf),
    where g is the clipped gradient plus wd * p (the decay itself is not clipped)."""
    params, grads = _problem()
    lr, m = 0.1, 0.9
    c = _config(name="sgd", lr=lr, momentum=m, grad_clip=clip, weight_decay=wd)
    got = _run(c, {k: jnp.asarray(v) for k, v in params.items()}, grads)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for i, g in enumerate(grads):
        g = _clip_and_decay({k: v.astype(np.float64) for k, v in g.items()}, p, clip, wd)
        for k in p:
            buf[k] = m * buf[k] + g[k]
            p[k] = p[k] - lr * (g[k] + m * buf[k])
        for k in p:
            np.testing.assert_allclose(got[i][k], p[k], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("clip,wd,eps", [(0.0, 0.0, 1e-8), (3.0, 0.01, 1e-8), (0.0, 0.0, 3.0)])
def test_adam_with_clip_and_weight_decay_matches_numpy(clip, wd, eps):
    """Adam (b1 0.9, b2 0.999, bias-corrected, optimizer.eps) on the clipped gradient plus wd * p:
    PyTorch's Adam(weight_decay=wd), the coupled L2 form, not AdamW. (eps 3 against gradients of
    ~5: an eps that were not passed on would show.)"""
    params, grads = _problem(1)
    lr, b1, b2 = 0.01, 0.9, 0.999
    c = _config(name="adam", lr=lr, grad_clip=clip, weight_decay=wd, eps=eps)
    got = _run(c, {k: jnp.asarray(v) for k, v in params.items()}, grads)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    mo = {k: np.zeros_like(v) for k, v in p.items()}
    ve = {k: np.zeros_like(v) for k, v in p.items()}
    for i, g in enumerate(grads):
        t = i + 1
        g = _clip_and_decay({k: v.astype(np.float64) for k, v in g.items()}, p, clip, wd)
        for k in p:
            mo[k] = b1 * mo[k] + (1 - b1) * g[k]
            ve[k] = b2 * ve[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = mo[k] / (1 - b1**t), ve[k] / (1 - b2**t)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
        for k in p:
            np.testing.assert_allclose(got[i][k], p[k], rtol=2e-5, atol=2e-6)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        optim.make(_config(name="adamw"), 10)
    with pytest.raises(ValueError, match="choose one of"):
        optim.schedule(_config(schedule="linear"), 10)
