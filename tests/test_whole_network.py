"""A ResNet-12 (dropout, DropBlock) in the algorithms: the whole-network methods' test-time
adaptation is deterministic (no dropout in its support loss) and equals an independent loop on the
same network without dropout; DropBlock's ramp counts one training step per meta-loss in every
kind of algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adaptation_reference import TEST, TRAIN, reference_logits

from mtl_gbml import algorithms, base_config, models
from mtl_gbml.data.sampler import Tasks
from mtl_gbml.models.resnet12 import ResNet12

WIDTHS = (4, 4, 4, 4)


@pytest.mark.parametrize("algorithm,lam", [("maml", 0.0), ("minibatchprox", 1.5)])
def test_test_time_adaptation_has_no_dropout(algorithm, lam):
    """adapt_and_predict of a ResNet-12 with dropout and DropBlock at rate 0.5: the same logits
    for two rngs, equal to tests/adaptation_reference.py's loop (support forward with the batch's
    statistics) on the same parameters with drop_rate 0. Before the fix the inner loop ran the
    training forward (dropout on), so the rng changed the predictions."""
    ways = 3
    rng = np.random.default_rng(0)
    sx = jnp.asarray(rng.normal(size=(ways * 2, 16, 16, 3)), jnp.float32)
    qx = jnp.asarray(rng.normal(size=(ways * 2, 16, 16, 3)), jnp.float32)
    sy = jnp.repeat(jnp.arange(ways), 2)
    config = base_config.get_config(algorithm)
    config.data.ways = 5
    config.model.bn_mode = "inductive"
    for k, v in {**TRAIN, **TEST}.items():
        config.algo[k] = v
    if lam:
        config.algo.lam = lam
    model = ResNet12(widths=WIDTHS, drop_rate=0.5, dropblock_size=2)
    algo = algorithms.build(algorithm, model, config, 10)
    backbone, state = models.init(model, jax.random.PRNGKey(1), sx)
    # running statistics unlike the batch's: inductive query logits differ from transductive ones
    state = jax.tree.map(lambda s: s + 0.3, state)
    params = {"backbone": backbone}
    predict = jax.jit(lambda k: algo.adapt_and_predict(params, state, sx, sy, qx, ways, k))
    a, b = np.asarray(predict(jax.random.PRNGKey(2))), np.asarray(predict(jax.random.PRNGKey(3)))
    assert np.std(a) > 1e-3  # the adaptation moved the logits away from the zero head's
    np.testing.assert_array_equal(a, b)
    want = reference_logits(
        ResNet12(widths=WIDTHS, drop_rate=0.0, dropblock_size=2),
        params,
        state,
        sx,
        sy,
        qx,
        ways,
        steps=TEST["test_inner_steps"],
        lr=TEST["test_inner_lr"],
        lam=lam,
        whole=True,
        bn_mode="inductive",
        learned=False,
    )
    np.testing.assert_allclose(a, np.asarray(want), rtol=1e-4, atol=1e-5)


def _tasks(num_tasks=2, ways=3, hw=16):
    rng = np.random.default_rng(1)
    sx = jnp.asarray(rng.normal(size=(num_tasks, ways, hw, hw, 3)), jnp.float32)
    qx = jnp.asarray(rng.normal(size=(num_tasks, ways, hw, hw, 3)), jnp.float32)
    y = jnp.tile(jnp.arange(ways), (num_tasks, 1))
    class_ids = jnp.asarray([[0, 1, 2], [3, 4, 5]][:num_tasks])
    return Tasks(sx, y, qx, y, class_ids)


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "mtl"])
def test_dropblock_ramp_counts_one_step_per_meta_loss(algorithm):
    """With model.dropblock_ramp_steps, the state's counter goes up by exactly one per meta-loss
    (the per-task states' mean over 2 tasks, a whole-network, a frozen-backbone and the MTL
    algorithm). float32 keeps it exact and its dtype through the mean."""
    config = base_config.get_config(algorithm)
    config.data.ways = 3
    config.model.update(
        name="resnet12", resnet_widths=WIDTHS, drop_rate=0.2, dropblock_size=2, bn_mode="inductive"
    )
    config.model.dropblock_ramp_steps = 8
    if algorithm == "maml":
        config.algo.inner_steps = 1
    model = models.build(config.model)
    assert model.dropblock_ramp_steps == 8
    algo = algorithms.build(algorithm, model, config, 6)
    tasks = _tasks()
    params, state = algo.init(jax.random.PRNGKey(0), tasks)
    assert float(state["batch_stats"]["train_forwards"]) == 0.0
    step = jax.jit(lambda p, s, k: algo.meta_loss(p, s, tasks, k)[1][0])
    state = jax.tree.map(lambda s: s + 5.0 * (s.ndim == 0), state)  # counter 5: t = 6 next
    new = step(params, state, jax.random.PRNGKey(1))
    assert new["batch_stats"]["train_forwards"].dtype == jnp.float32
    assert float(new["batch_stats"]["train_forwards"]) == 6.0


def test_dropblock_ramp_in_the_model():
    """DropBlock's scale is t / ramp_steps (capped at 1), t counting training-mode forwards:
    evaluation-mode forwards (both BatchNorm modes) read the counter and leave it; no ramp, no
    counter (the variables of a model from before the key); bad values are clear errors."""
    from flax import linen as nn

    from mtl_gbml.models.resnet12 import DropBlock

    model = ResNet12(widths=(2, 2, 2, 2), drop_rate=0.2, dropblock_size=2, dropblock_ramp_steps=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    params, state = models.init(model, jax.random.PRNGKey(1), x)
    scales = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, DropBlock) and kwargs.get("train"):
            scales.append(float(kwargs["scale"]))
        return next_fun(*args, **kwargs)

    seen = []
    with nn.intercept_methods(record):
        for t in range(1, 6):
            for bn_mode in ("inductive", "transductive"):
                _, same = models.forward(model, params, state, x, train=False, bn_mode=bn_mode)
                assert same is state
            _, state = models.forward(
                model, params, state, x, train=True, rng=jax.random.PRNGKey(t)
            )
            seen.append(float(state["batch_stats"]["train_forwards"]))
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]
    # two DropBlocks (blocks 3 and 4) per forward
    np.testing.assert_allclose(scales, np.repeat([1 / 3, 2 / 3, 1.0, 1.0, 1.0], 2), rtol=1e-6)

    plain = ResNet12(widths=(2, 2, 2, 2), drop_rate=0.2, dropblock_size=2)
    _, plain_state = models.init(plain, jax.random.PRNGKey(1), x)
    assert "train_forwards" not in plain_state["batch_stats"]
    assert jax.tree.structure(plain_state) != jax.tree.structure(state)

    c = base_config.get_config("mtl").model
    c.update(name="resnet12", resnet_widths=(2, 2, 2, 2))
    if "dropblock_ramp_steps" in c:
        del c["dropblock_ramp_steps"]
    assert models.build(c).dropblock_ramp_steps == 0  # a config from before the key: no ramp
    c.dropblock_ramp_steps = -1
    with pytest.raises(ValueError, match="model.dropblock_ramp_steps=-1"):
        models.build(c)
    c.dropblock_ramp_steps, c.dropblock_size = 0, 0
    with pytest.raises(ValueError, match="model.dropblock_size=0"):
        models.build(c)
