"""mtl_gbml/recipes.py against the references' code: MetaOptNet's learning-rate schedule evaluated
at steps in every epoch, and the DropBlock ramp the recipes set."""

import math

import pytest
from conftest import load_config

from mtl_gbml import optim
from mtl_gbml.config_validation import validate

DATASETS = ("mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100")


def metaoptnet_lr(epoch: int) -> float:
    """MetaOptNet's train.py: SGD lr 0.1 with LambdaLR(lambda_epoch), stepped at the start of each
    (1-based) epoch before its training, so epoch e trains at 0.1 * lambda_epoch(e)."""
    lambda_epoch = lambda e: 1.0 if e < 20 else (0.06 if e < 40 else 0.012 if e < 50 else 0.0024)
    return 0.1 * lambda_epoch(epoch)


@pytest.mark.parametrize("algorithm", ["protonet", "r2d2", "metaoptnet"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_metaoptnet_family_lr_is_metaoptnets(dataset, algorithm):
    """lr at the first, a middle and the last step of each of the 60 epochs of 1000 steps:
    0.1 -> 0.006 (epoch 20) -> 0.0012 (epoch 40) -> 0.00024 (epoch 50), not 0.02 / 0.004 /
    0.0008."""
    c = load_config(f"configs/{dataset}/{algorithm}.py", "5shot")
    validate(c)
    epoch = 1000
    assert c.train.steps == 60 * epoch
    fn = optim.schedule(c.optimizer, c.train.steps)
    for e in range(1, 61):
        for step in ((e - 1) * epoch, (e - 1) * epoch + 517, e * epoch - 1):
            assert float(fn(step)) == pytest.approx(metaoptnet_lr(e), rel=1e-6), (e, step)
    assert [metaoptnet_lr(e) for e in (19, 20, 39, 40, 49, 50)] == pytest.approx(
        [0.1, 0.006, 0.006, 0.0012, 0.0012, 0.00024]
    )


@pytest.mark.parametrize("dataset", DATASETS)
def test_recipes_ramp_dropblock_over_20_epochs(dataset):
    """The references' 40000 forward calls: 20 epochs (the MTL code's 1600 training tasks and 400
    validation episodes an epoch; MetaOptNet's 2 x 1000 training calls), in steps (an epoch is
    the validation interval)."""
    for algorithm in ("mtl", "protonet", "r2d2", "metaoptnet"):
        for variant in ("5shot", "1shot"):
            c = load_config(f"configs/{dataset}/{algorithm}.py", variant)
            epoch = c.train.eval_every
            assert epoch == (
                math.ceil(1600 / c.data.tasks_per_step) if algorithm == "mtl" else 1000
            )
            assert c.model.dropblock_ramp_steps == 20 * epoch, (algorithm, variant)


@pytest.mark.parametrize("dataset", DATASETS)
def test_feature_dimensions_are_the_references(dataset):
    """The MTL code average-pools ResNet-12's last map (640-d); MetaOptNet flattens it
    (``resnet12(avg_pool=False)``): 640 x 5 x 5 on 84x84 images, 640 x 2 x 2 on CIFAR's 32x32."""
    import jax
    import jax.numpy as jnp

    from mtl_gbml import models

    size, cells = (32, 4) if dataset in ("cifar_fs", "fc100") else (84, 25)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    for algorithm in ("mtl", "protonet", "r2d2", "metaoptnet"):
        model = models.build(load_config(f"configs/{dataset}/{algorithm}.py").model)
        variables = jax.eval_shape(
            lambda x, m=model: m.init(jax.random.PRNGKey(0), x, train=False, use_batch_stats=False),
            x,
        )
        out = jax.eval_shape(
            lambda v, x, m=model: m.apply(v, x, train=False, use_batch_stats=False), variables, x
        )
        assert out.shape == (2, 640 if algorithm == "mtl" else 640 * cells), algorithm


@pytest.mark.parametrize("dataset", DATASETS)
def test_metaoptnet_family_heads_shots_and_smoothing_are_metaoptnets(dataset):
    """MetaOptNet's README commands and heads: --train-shot 15 (mini-ImageNet, FC100), 10
    (tiered-ImageNet), 5 (CIFAR-FS); --eps 0.1 on mini-ImageNet only; a logit scale learned from 1
    for every head, R2D2Head's lambda fixed at 50 without an intercept, ProtoNetHead's distances
    divided by the dimension."""
    shot = {"mini_imagenet": 15, "fc100": 15, "tiered_imagenet": 10, "cifar_fs": 5}[dataset]
    eps = 0.1 if dataset == "mini_imagenet" else 0.0
    for algorithm in ("protonet", "r2d2", "metaoptnet"):
        for variant in ("5shot", "1shot"):
            c = load_config(f"configs/{dataset}/{algorithm}.py", variant)
            assert c.data.shots == shot and c.algo.label_smoothing == eps, (algorithm, variant)
            assert c.algo.init_scale == 1.0 and not c.model.avg_pool
    p = load_config(f"configs/{dataset}/protonet.py").algo
    assert p.scale_by_dim and p.learn_scale
    r = load_config(f"configs/{dataset}/r2d2.py").algo
    assert (r.init_lambda, r.learn_lambda, r.intercept) == (50.0, False, False)
