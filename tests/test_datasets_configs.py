"""The mini-ImageNet / tiered-ImageNet / CIFAR-FS / FC100 configs: the official MTL recipe's values,
``:runlocal`` training and evaluation on tiny prepared datasets (one through the CLI), and the
crop/flip/jitter augmentation (ResNet-12 in bfloat16 with rematerialisation: test_models.py)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import subprocess_env

from mtl_gbml.config_validation import validate
from mtl_gbml.data import fake, prepare
from mtl_gbml.data.sampler import Tasks, prepare_tasks
from mtl_gbml.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100")
# ANCHORS.md: shots -> (images per class per training task, tasks per step), feature norm
OFFICIAL = {
    "mini_imagenet": ({5: (10, 2), 1: (10, 6)}, True),
    "tiered_imagenet": ({5: (40, 1), 1: (40, 2)}, True),
    "cifar_fs": ({5: (10, 6), 1: (20, 2)}, True),
    "fc100": ({5: (10, 6), 1: (5, 1)}, False),
}


def _config(name, arg, algorithm="mtl"):
    path = os.path.join(ROOT, "configs", name, f"{algorithm}.py")
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("name", DATASETS)
def test_official_recipe_values(name):
    recipe, norm = OFFICIAL[name]
    for shots in (1, 5):
        c = _config(name, f"{shots}shot")
        validate(c)
        per_class, tasks = recipe[shots]
        assert (c.data.ways, c.data.shots, c.data.shots + c.data.queries) == (5, shots, per_class)
        assert c.data.tasks_per_step == tasks and c.algo.feature_norm == norm
        assert c.model.name == "resnet12" and tuple(c.model.resnet_widths) == (64, 160, 320, 640)
        assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay) == ("radam", 1e-3, 0.0)
        assert c.data.augment == "crop_flip_jitter" and c.data.rotations is False
        assert c.algo.head_init == "official" and c.eval.logreg_c == 3.0
        assert c.eval.episodes == 2000 and c.train.val_episodes == 400
        assert c.train.eval_every * tasks >= 1600  # validation once per 1600-task epoch
        # 60 epochs of 1600 tasks, lr x 0.1 at half and three quarters of them (our fixed
        # stand-in for the official decay on a 4-epoch plateau); best chosen on 5w<shots>s
        epoch = math.ceil(1600 / tasks)
        assert c.train.steps == 60 * epoch and c.optimizer.schedule == "step"
        assert tuple(c.optimizer.decay_steps) == (30 * epoch, 45 * epoch)
        assert c.optimizer.decay_factor == 0.1 and c.train.val_setting == f"5w{shots}s"
    assert _config(name, None).to_dict() == _config(name, "5shot").to_dict()
    with pytest.raises(ValueError, match="unknown variant"):
        _config(name, "3shot")


@pytest.mark.parametrize("name", DATASETS)
def test_baseline_configs_validate(name):
    """ProtoNet / R2D2 / MetaOptNet (MetaOptNet's ResNet-12 recipe) and MAML (Conv4) configs."""
    for alg in ("protonet", "r2d2", "metaoptnet", "maml"):
        for arg in ("5shot", "1shot", "runlocal"):
            c = _config(name, arg, alg)
            validate(c)
            assert (c.algorithm, c.data.name, c.data.rotations) == (alg, name, False)
            if arg == "runlocal":
                continue
            if alg == "maml":  # MAML's mini-ImageNet recipe: transductive BN, 5 (10) steps of 0.01
                assert c.model.bn_mode == "transductive" and c.model.width == 32
                assert (c.algo.inner_steps, c.algo.test_inner_steps) == (5, 10)
                assert c.algo.inner_lr == c.algo.test_inner_lr == 0.01
            else:  # MetaOptNet's: SGD (Nesterov) 0.1, momentum 0.9, weight decay 5e-4
                o = c.optimizer
                assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
                assert (c.data.ways, c.data.queries, c.data.tasks_per_step) == (5, 6, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Raw tiny datasets in the exact formats, prepared into one TFDS dir."""
    root = tmp_path_factory.mktemp("tiny")
    tfds_dir = root / "tfds"
    fake.write_mini_imagenet(root / "mini_imagenet", "pickle", classes=6, per_class=4)
    fake.write_tiered_imagenet(root / "tiered_imagenet", classes=6, per_class=4)
    fake.write_cifar100(root / "cifar", per_class_train=3, per_class_test=1)
    raw = {"mini_imagenet": "mini_imagenet", "tiered_imagenet": "tiered_imagenet"}
    for name in DATASETS:
        manual = root / raw.get(name, "cifar")
        args = ["--dataset", name, "--manual_dir", str(manual), "--data_dir", str(tfds_dir)]
        assert prepare.main(args) == 0
    return root, tfds_dir


@pytest.mark.parametrize("name", ["tiered_imagenet", "cifar_fs", "fc100"])
def test_runlocal_trains_and_evaluates(tiny, tmp_path, name):
    _, tfds_dir = tiny
    c = _config(name, "runlocal")
    c.data.tfds_dir = str(tfds_dir)
    res = train_and_evaluate(c, str(tmp_path / "run"))
    assert res["dataset"] == f"{name}/standard" and res["backbone"] == "resnet12"
    assert res["train"]["steps"] == 2
    acc = res["eval"]["5way1shot"]
    assert 0.0 <= acc["accuracy"] <= 100.0 and acc["episodes"] == 20 and acc["split"] == "test"
    assert os.path.exists(tmp_path / "run" / "results.json")


def test_runlocal_through_the_cli(tiny, tmp_path):
    """configs/mini_imagenet/mtl.py:runlocal through ``python -m mtl_gbml.train``."""
    _, tfds_dir = tiny
    work = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mtl_gbml.train",
        f"--config={os.path.join(ROOT, 'configs/mini_imagenet/mtl.py')}:runlocal",
        f"--config.data.tfds_dir={tfds_dir}",
        f"--workdir={work}",
    ]
    env = subprocess_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.load(open(work / "results.json"))
    assert res["dataset"] == "mini_imagenet/standard" and res["train"]["steps"] == 2
    assert "5way1shot" in res["eval"]


def _tasks(x):
    y = jnp.zeros(x.shape[:2], jnp.int32)
    return Tasks(x, y, x, y, jnp.zeros((x.shape[0], 1), jnp.int32))


def test_crop_flip_jitter_augmentation():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (2, 8, 32, 32, 3), dtype=np.uint8))
    base = prepare_tasks(_tasks(x), jax.random.PRNGKey(0), "none", 0).support_x
    for aug in ("crop_flip", "crop_flip_jitter"):
        out = prepare_tasks(_tasks(x), jax.random.PRNGKey(1), aug, 4)
        sx = np.asarray(out.support_x)
        assert sx.shape == base.shape and sx.dtype == np.float32
        assert 0.0 <= sx.min() and sx.max() <= 1.0 and not np.allclose(sx, base)
    # crop_flip with no padding: every image is itself or its mirror image
    out = np.asarray(prepare_tasks(_tasks(x), jax.random.PRNGKey(2), "crop_flip", 0).support_x)
    b = np.asarray(base)
    same = np.all(out == b, axis=(2, 3, 4))
    mirrored = np.all(out == b[..., ::-1, :], axis=(2, 3, 4))
    assert np.all(same | mirrored) and same.any() and mirrored.any()
    # grayscale images: crop_flip_jitter leaves colour alone (no RGB to jitter)
    g = x[..., :1]
    out = prepare_tasks(_tasks(g), jax.random.PRNGKey(3), "crop_flip_jitter", 0).support_x
    assert out.shape == g.shape
