"""``validate()``: every shipped config passes it, and each bad value it exists to catch fails there
(before anything loads data or compiles) with a ConfigError naming the key, the value and the fix."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config

from mtl_gbml import algorithms, models
from mtl_gbml.config_validation import (
    MTL_HEAD_INITS,
    TRAIN_WITHOUT_QUERIES,
    ConfigError,
    validate,
)
from mtl_gbml.data.sampler import Tasks

MTL = "configs/omniglot/mtl.py"
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py"))
_NOT_VARIANTS = {"use", "one", "of", "or", "none"}


def variants(path: str) -> list[str | None]:
    """The variants of a config file: ``None`` (the default) and those its ``get_config`` lists in
    its 'unknown variant' error (each config names its variants there)."""
    with pytest.raises(ValueError, match="unknown variant") as e:
        load_config(path, "no-such-variant")
    listed = str(e.value).split("use", 1)[1]
    names = [n for n in re.findall(r"\w+(?:,\w+)*", listed) if n not in _NOT_VARIANTS]
    assert names, f"no variants found in {e.value}"
    return [None, *names]


def config(path: str = MTL, arg: str | None = "runlocal", **changes):
    """``path:arg`` with ``changes`` ({'section.key': value}) applied."""
    c = load_config(path, arg)
    c.unlock()
    for key, value in changes.items():
        *sections, k = key.split(".")
        target = c
        for s in sections:
            target = target[s]
        target[k] = value
    return c


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_and_variant_validates(path):
    for arg in variants(path):
        validate(load_config(path, arg))


def test_the_config_list_is_complete():
    assert len(CONFIGS) >= 29 and {pathlib.Path(p).parent.name for p in CONFIGS} >= {
        "omniglot",
        "mini_imagenet",
        "tiered_imagenet",
        "cifar_fs",
        "fc100",
    }
    assert variants(MTL) == [
        None,
        "plain64",
        "cosine576",
        "smooth576",
        "quick",
        "runlocal",
        "budget",
    ]
    assert variants("configs/fc100/mtl.py") == [
        None,
        "5shot",
        "1shot",
        "runlocal",
        "1shot,runlocal",
    ]


# --- 1. validation settings are checked against train.val_split, the default one included ---

NO_ROT = {"data.rotations": False}  # Omniglot without rotations: val 172, test 423 classes


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"train.val_setting": "200w1s"},
            r"^train\.val_setting: setting '200w1s': 200 ways but split 'val' has 172 classes",
        ),
        (
            {"train.val_extra_settings": ("5w1s", "200w1s")},
            r"^train\.val_extra_settings: setting '200w1s': 200 ways but split 'val' has 172",
        ),
        (  # the default validation setting: data.ways and data.shots
            {"train.val_setting": "", "data.ways": 200},
            r"^train\.val_setting='' \(the default: data\.ways=200 and data\.shots=1, '200w1s'\)"
            r": setting '200w1s': 200 ways but split 'val' has 172 classes; set "
            r"train\.val_setting to a setting with fewer ways, or lower data\.ways",
        ),
        (  # another validation split, named in the message
            {"train.val_split": "train", "eval.split": "val", "train.val_setting": "1100w1s"},
            r"^train\.val_setting: setting '1100w1s': 1100 ways but split 'train' has 1028",
        ),
        (
            {"train.val_setting": "5w10s", "eval.queries": 15},
            r"^train\.val_setting: setting '5w10s': 10 shots \+ eval\.queries=15 exceed the 20 "
            r"images per class of split 'val'",
        ),
        (
            {"train.val_extra_settings": ("5w0s",)},
            r"^train\.val_extra_settings: setting '5w0s' needs at least 2 ways \(1-way",
        ),
    ],
)
def test_validation_settings_are_checked_against_the_validation_split(changes, message):
    c = config(**NO_ROT, **changes)
    assert c.train.eval_every > 0
    with pytest.raises(ConfigError, match=message):
        validate(c)


@pytest.mark.parametrize(
    "changes",
    [
        # fits the validation split (test: 423 classes) though not eval.split (val: 172)
        {"train.val_split": "test", "eval.split": "val", "train.val_setting": "300w1s"},
        # validation off: its settings are not run, only parsed
        {"train.eval_every": 0, "train.val_setting": "500w1s"},
        {"train.eval_every": 0, "train.val_setting": "", "data.ways": 500},
    ],
)
def test_validation_settings_that_fit_the_validation_split_pass(changes):
    validate(config(**NO_ROT, **changes))


# --- 2. a setting that does not parse names the key it came from ---


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"train.val_extra_settings": ("3w",)}, "train.val_extra_settings"),
        ({"train.val_setting": "20w"}, "train.val_setting"),
        ({"train.val_setting": "20w", "train.eval_every": 0}, "train.val_setting"),  # train.py
        ({"eval.settings": ("5w1s", "5way")}, "eval.settings"),
    ],
)
def test_a_malformed_setting_names_its_key(changes, key):
    bad = next(v if isinstance(v, str) else v[-1] for k, v in changes.items() if k == key)
    with pytest.raises(ConfigError) as e:
        validate(config(**changes))
    assert str(e.value).startswith(f"{key}: evaluation setting {bad!r} is not of the form")


# --- 3. data.queries=0 only for the algorithms whose training loss does not need queries ---


@pytest.mark.parametrize("algorithm", algorithms.NAMES)
def test_zero_training_queries_only_where_the_loss_needs_none(algorithm):
    c = config(f"configs/omniglot/{algorithm}.py", **{"data.queries": 0})
    if algorithm in ("mtl", "minibatchprox"):  # support and query merged into one training set
        validate(c)
        return
    message = (
        rf"^data\.queries=0 but algorithm='{algorithm}' trains on the loss of the query examples"
        r".*set data\.queries >= 1"
    )
    with pytest.raises(ConfigError, match=message):
        validate(c)


def _empty_query_tasks(c, seed=0):
    rng = np.random.default_rng(seed)
    t, n, k = c.data.tasks_per_step, c.data.ways, c.data.shots
    f = lambda *shape: jnp.asarray(rng.random(shape, np.float32))
    return Tasks(
        support_x=f(t, n * k, 28, 28, 1),
        support_y=jnp.tile(jnp.repeat(jnp.arange(n), k), (t, 1)),
        query_x=f(t, 0, 28, 28, 1),
        query_y=jnp.zeros((t, 0), jnp.int32),
        class_ids=jnp.tile(jnp.arange(n), (t, 1)),
    )


@pytest.mark.parametrize("algorithm", [*TRAIN_WITHOUT_QUERIES, "protonet"])
def test_which_algorithms_train_without_queries(algorithm):
    """The reason for the exemption: with no query examples, MTL's and MinibatchProx's training
    loss and gradient are finite (both train on support and query merged); ProtoNet's (a query
    loss, like every other algorithm's) is a mean over nothing."""
    c = config(f"configs/omniglot/{algorithm}.py", **{"data.queries": 0})
    tasks = _empty_query_tasks(c)
    algorithm_ = algorithms.build(c.algorithm, models.build(c.model), c, num_base_classes=20)
    params, state = algorithm_.init(jax.random.PRNGKey(0), tasks)
    loss_fn = lambda p: algorithm_.meta_loss(p, state, tasks, jax.random.PRNGKey(1))
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    finite = bool(jnp.isfinite(loss)) and all(
        bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)
    )
    assert finite == (algorithm in TRAIN_WITHOUT_QUERIES), float(loss)


def test_negative_queries_are_refused():
    with pytest.raises(ConfigError, match=r"^data\.queries=-1 must be >= 0"):
        validate(config(**{"data.queries": -1}))


# --- 4. checkpoint.keep, train.val_episodes, eval.episodes, eval.batch ---


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"checkpoint.keep": 0}, r"^checkpoint\.keep=0 must be >= 1: .*0 keeps none"),
        ({"checkpoint.keep": -1}, r"^checkpoint\.keep=-1 must be >= 1"),
        ({"train.val_episodes": 0}, r"^train\.val_episodes=0 must be positive when "),
        ({"train.eval_every": -5}, r"^train\.eval_every=-5: use 0 \(no validation\)"),
        ({"eval.episodes": 0}, r"^eval\.episodes=0 must be positive"),
        ({"eval.batch": 0}, r"^eval\.batch=0 must be positive"),
    ],
)
def test_bad_checkpoint_and_episode_counts(changes, message):
    c = config(**changes)
    assert c.train.eval_every != 0
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_no_validation_episodes_are_fine_without_validation():
    validate(config(**{"train.val_episodes": 0, "train.eval_every": 0}))


def test_checkpoint_keep_is_how_many_checkpoints_remain(tmp_path):
    """What checkpoint.keep=0 would do: orbax keeps no checkpoint at all (nothing to resume)."""
    from mtl_gbml.checkpointing import Checkpointer

    for keep, steps in [(0, []), (1, [2]), (2, [1, 2])]:
        ckpt = Checkpointer(str(tmp_path / str(keep)), keep)
        for step in (1, 2):
            ckpt.save(step, {"w": jnp.ones(2)})
        assert list(ckpt.manager.all_steps()) == steps
        ckpt.close()


# --- 5. checks that ran only after data loading or at evaluation ---


@pytest.mark.parametrize(
    "path, changes, message",
    [
        (
            "configs/omniglot/protonet.py",
            {"parallel.shard_head": True},
            r"^parallel\.shard_head=True with algorithm='protonet'.* algorithm='mtl' only",
        ),
        (
            "configs/omniglot/metaoptnet.py",
            {"algo.dual_ridge": 0.0},
            r"^algo\.dual_ridge=0\.0 must be > 0",
        ),
        (
            "configs/omniglot/metaoptnet.py",
            {"algo.dual_ridge": -1.0},
            r"^algo\.dual_ridge=-1\.0 must be > 0",
        ),
        (MTL, {"algo.head_init": "learned"}, r"^algo\.head_init='learned'; choose one of"),
        ("configs/omniglot/maml.py", {"algo.head_init": "zero"}, r"^algo\.head_init='zero'"),
        ("configs/omniglot/anil.py", {"algo.head_init": "normal"}, r"^algo\.head_init='normal'"),
        (
            "configs/omniglot/maml.py",
            {"algo.head_init": "learned", "eval.settings": ("5w1s", "20w1s")},
            r"^eval\.settings: setting '20w1s': 20 ways but algo\.head_init='learned' meta-learns "
            r"data\.ways=5 head rows",
        ),
        (
            "configs/omniglot/anil.py",
            {"algo.head_init": "learned", "train.eval_every": 1, "train.val_setting": "20w1s"},
            r"^train\.val_setting: setting '20w1s': 20 ways but algo\.head_init='learned'",
        ),
        (MTL, {"model.conv_impl": "im2col_last"}, r"^model\.conv_impl='im2col_last'; choose one"),
        (MTL, {"model.block": "fast"}, r"^model\.block='fast'; choose one of"),
        (MTL, {"model.dtype": "float33"}, r"^model\.dtype='float33' is not a floating-point"),
        (MTL, {"model.dtype": "int32"}, r"^model\.dtype='int32' is not a floating-point"),
        (
            "configs/omniglot/r2d2.py",
            {"algo.init_lambda": 0.0},
            r"^algo\.init_lambda=0\.0 must be positive",
        ),
        (
            "configs/omniglot/r2d2.py",
            {"algo.init_scale": -1.0},
            r"^algo\.init_scale=-1\.0 must be positive",
        ),
        (
            "configs/mini_imagenet/metaoptnet.py",
            {"optimizer.decay_factors": (0.06, 0.2)},
            r"^optimizer\.decay_factors=\(0\.06, 0\.2\): give one positive factor per decay step",
        ),
        (
            "configs/mini_imagenet/mtl.py",
            {"model.dropblock_ramp_steps": -1},
            r"^model\.dropblock_ramp_steps=-1: use 0",
        ),
        ("configs/mini_imagenet/mtl.py", {"model.drop_rate": 1.0}, r"^model\.drop_rate=1\.0"),
    ],
)
def test_late_checks_fail_in_validate(path, changes, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(path, **changes))


@pytest.mark.parametrize(
    "path, changes",
    [
        (MTL, {"parallel.shard_head": True}),
        ("configs/omniglot/maml.py", {"algo.head_init": "learned"}),  # 5-way, evaluated 5-way
        ("configs/mini_imagenet/mtl.py", {"model.conv_impl": "nope"}),  # a ResNet-12: unused
        (MTL, {"model.dtype": "bfloat16"}),
    ],
)
def test_what_the_late_checks_allow(path, changes):
    validate(config(path, **changes))


def test_mtl_head_inits_are_those_init_head_accepts():
    from mtl_gbml.algorithms.mtl import init_head

    for kind in MTL_HEAD_INITS:
        assert init_head(jax.random.PRNGKey(0), kind, 4, 3, 2).shape == (4, 3)
    with pytest.raises(ValueError, match="algo.head_init='learned'"):
        init_head(jax.random.PRNGKey(0), "learned", 4, 3, 2)
