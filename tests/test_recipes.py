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
