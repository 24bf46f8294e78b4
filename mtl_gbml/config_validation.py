"""Check a config before anything loads or compiles; every error names the key and the fix."""

from __future__ import annotations

import difflib

import jax.numpy as jnp
import ml_collections

from mtl_gbml import algorithms, models, optim
from mtl_gbml.algorithms.whole_network import HEAD_INITS
from mtl_gbml.data import datasets
from mtl_gbml.models.conv4 import BLOCKS, CONV_IMPLS

# classes (Omniglot: characters) per split and the fewest images per class, known without reading
# the data
_FACTS = {
    ("omniglot", "vinyals"): ({"train": 1028, "val": 172, "test": 423}, 20),
    ("omniglot", "lake"): ({"train": 964, "test": 659}, 20),
    ("mini_imagenet", "standard"): ({"train": 64, "val": 16, "test": 20}, 600),
    # ImageNet-1k training classes hold 732..1300 images
    ("tiered_imagenet", "standard"): ({"train": 351, "val": 97, "test": 160}, 732),
    ("cifar_fs", "standard"): ({"train": 64, "val": 16, "test": 20}, 600),
    ("fc100", "standard"): ({"train": 60, "val": 20, "test": 20}, 600),  # 12/4/4 superclasses
}
WHOLE_NETWORK = ("maml", "fomaml", "imaml", "minibatchprox")
# algorithms whose training loss is on the support and query merged (mtl: one set per task;
# minibatchprox: its inner solve and loss see all of a task's images), so they train with
# data.queries=0; every other one's loss is the query loss alone, a mean over no query examples
TRAIN_WITHOUT_QUERIES = ("mtl", "minibatchprox")
# the values mtl.init_head accepts (tests/test_config_validation.py keeps the two in step)
MTL_HEAD_INITS = ("official", "zeros", "normal")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and how to fix it."""


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def split_facts(config: ml_collections.ConfigDict, split: str) -> tuple[int, int]:
    """(classes, images per class) of a split, rotations included."""
    sizes, per_class = _FACTS[(config.data.name, config.data.protocol)]
    return sizes[split] * (4 if config.data.rotations else 1), per_class


def _parse_setting(key: str, setting: str) -> tuple[int, int]:
    """(ways, shots) of ``setting``, taken from config key ``key``."""
    from mtl_gbml.evaluation import parse_setting

    try:
        return parse_setting(setting)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e


def _check_setting(
    c: ml_collections.ConfigDict,
    key: str,
    setting: str,
    ways: int,
    shots: int,
    split: str,
    fix: str = "lower its ways",
) -> None:
    """An evaluation or validation setting (from config key ``key``) that runs on ``split``;
    ``fix``: how to lower its ways."""
    if ways < 2 or shots < 1:
        raise ConfigError(
            f"{key}: setting {setting!r} needs at least 2 ways (1-way accuracy is 100% whatever "
            "the learner) and 1 shot"
        )
    n_cls, n_img = split_facts(c, split)
    if ways > n_cls:
        raise ConfigError(
            f"{key}: setting {setting!r}: {ways} ways but split {split!r} has {n_cls} classes"
            f"{' (rotations included)' if c.data.rotations else ''}; {fix}"
        )
    if shots + c.eval.queries > n_img:
        raise ConfigError(
            f"{key}: setting {setting!r}: {shots} shots + eval.queries={c.eval.queries} exceed "
            f"the {n_img} images per class of split {split!r}; lower eval.queries or the shots"
        )
    learned = c.algo.get("head_init") == "learned"
    if c.algorithm in WHOLE_NETWORK + ("anil",) and learned and ways > c.data.ways:
        raise ConfigError(
            f"{key}: setting {setting!r}: {ways} ways but algo.head_init='learned' meta-learns "
            f"data.ways={c.data.ways} head rows; {fix} or use algo.head_init='zeros'"
        )


def validate(config: ml_collections.ConfigDict) -> None:
    c = config
    if c.algorithm not in algorithms.NAMES:
        raise ConfigError(
            f"algorithm={c.algorithm!r} is unknown{suggest(c.algorithm, algorithms.NAMES)}; "
            f"choose one of {list(algorithms.available())}"
        )
    if c.model.name not in models.names():
        raise ConfigError(
            f"model.name={c.model.name!r} is unknown{suggest(c.model.name, models.names())}; "
            f"choose one of {list(models.names())}"
        )
    if c.model.bn_mode not in models.BN_MODES:
        raise ConfigError(f"model.bn_mode={c.model.bn_mode!r}; choose one of {models.BN_MODES}")
    if c.model.get("chunk_first", 0) < -1:
        raise ConfigError(
            f"model.chunk_first={c.model.chunk_first}: use -1 (64 on CPU, off on GPU/TPU), 0 (off) "
            "or a positive number of images per chunk"
        )
    if c.data.name not in datasets.DATASETS:
        raise ConfigError(
            f"data.name={c.data.name!r} is unknown{suggest(c.data.name, datasets.DATASETS)}; "
            f"choose one of {list(datasets.DATASETS)}"
        )
    if c.data.protocol not in datasets.SPLITS:
        raise ConfigError(
            f"data.protocol={c.data.protocol!r}; choose one of {list(datasets.SPLITS)}"
        )
    if (c.data.name, c.data.protocol) not in _FACTS:
        protocols = [p for n, p in _FACTS if n == c.data.name]
        raise ConfigError(
            f"data.protocol={c.data.protocol!r} does not exist for data.name={c.data.name!r}; "
            f"choose one of {protocols}"
        )
    if c.optimizer.name not in optim.OPTIMIZERS:
        raise ConfigError(f"optimizer.name={c.optimizer.name!r}; choose one of {optim.OPTIMIZERS}")
    if c.optimizer.schedule not in optim.SCHEDULES:
        raise ConfigError(
            f"optimizer.schedule={c.optimizer.schedule!r}; choose one of {optim.SCHEDULES}"
        )
    for key, value in [
        ("train.steps", c.train.steps),
        ("train.log_every", c.train.log_every),
        ("checkpoint.every", c.checkpoint.every),
        ("data.ways", c.data.ways),
        ("data.shots", c.data.shots),
        ("data.tasks_per_step", c.data.tasks_per_step),
        ("eval.episodes", c.eval.episodes),
        ("eval.batch", c.eval.batch),
        ("eval.logreg_steps", c.eval.logreg_steps),
        ("eval.logreg_c", c.eval.logreg_c),
    ]:
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    if c.optimizer.schedule == "step":
        try:
            optim.decay_factors(c.optimizer)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if c.model.name == "resnet12":
        try:
            models.check_resnet12(c.model)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if not c.checkpoint.keep >= 1:
        raise ConfigError(
            f"checkpoint.keep={c.checkpoint.keep} must be >= 1: it is how many of the latest "
            "checkpoints are kept (orbax's max_to_keep); 0 keeps none, so a rerun cannot resume "
            "and the best-validation parameters, saved with the state, are lost"
        )
    if c.train.eval_every < 0:
        raise ConfigError(
            f"train.eval_every={c.train.eval_every}: use 0 (no validation) or a positive "
            "number of steps"
        )
    if c.train.eval_every and not c.train.val_episodes > 0:
        raise ConfigError(
            f"train.val_episodes={c.train.val_episodes} must be positive when "
            f"train.eval_every={c.train.eval_every} (validation runs); raise train.val_episodes "
            "or set train.eval_every=0"
        )
    if not c.eval.logreg_tol >= 0:
        raise ConfigError(
            f"eval.logreg_tol={c.eval.logreg_tol} must be >= 0 (0: always eval.logreg_steps steps)"
        )
    if not c.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr={c.optimizer.lr} must be positive")
    vmapped = c.algo.get("tasks_vmapped", 0)
    if vmapped < 0 or (vmapped and c.data.tasks_per_step % vmapped):
        raise ConfigError(
            f"algo.tasks_vmapped={vmapped} must be 0 (all tasks) or a divisor of "
            f"data.tasks_per_step={c.data.tasks_per_step}"
        )
    if c.algorithm == "imaml":
        if not c.algo.lam > 0:
            raise ConfigError(f"algo.lam={c.algo.lam} must be positive (iMAML's proximal strength)")
        for key in ("cg_steps", "cg_damping", "lam_damping"):
            if not c.algo[key] >= 0:
                raise ConfigError(f"algo.{key}={c.algo[key]} must be >= 0")
    if c.algorithm == "metaoptnet":
        if not c.algo.dual_ridge > 0:
            raise ConfigError(
                f"algo.dual_ridge={c.algo.dual_ridge} must be > 0: the implicit gradient's CG "
                "system is positive definite only for a strongly convex dual"
            )
        if not c.algo.solver_steps >= 1:
            raise ConfigError(f"algo.solver_steps={c.algo.solver_steps} must be >= 1")
        if not c.algo.solver_tol >= 0:
            raise ConfigError(
                f"algo.solver_tol={c.algo.solver_tol} must be >= 0 (0: always algo.solver_steps)"
            )
    if c.algorithm == "r2d2":
        for key in ("init_lambda", "init_scale"):
            if not c.algo[key] > 0:
                raise ConfigError(
                    f"algo.{key}={c.algo[key]} must be positive (R2D2 learns its logarithm)"
                )
    if c.algorithm in ("metaoptnet", "protonet") and not c.algo.init_scale > 0:
        raise ConfigError(
            f"algo.init_scale={c.algo.init_scale} must be positive (the logit scale is learned "
            "as its logarithm)"
        )
    if "label_smoothing" in c.algo and not 0.0 <= c.algo.label_smoothing < 1.0:
        raise ConfigError(
            f"algo.label_smoothing={c.algo.label_smoothing}: use a value in [0, 1) (0: none)"
        )
    head_inits = {"mtl": MTL_HEAD_INITS, "anil": HEAD_INITS}
    head_inits.update(dict.fromkeys(WHOLE_NETWORK, HEAD_INITS))
    if c.algorithm in head_inits and c.algo.head_init not in head_inits[c.algorithm]:
        raise ConfigError(
            f"algo.head_init={c.algo.head_init!r}; choose one of {head_inits[c.algorithm]}"
        )
    if c.get("parallel", {}).get("shard_head", False) and c.algorithm != "mtl":
        raise ConfigError(
            f"parallel.shard_head=True with algorithm={c.algorithm!r}: it splits the MTL head "
            "table over the devices and applies to algorithm='mtl' only; set "
            "parallel.shard_head=False"
        )
    if c.model.name == "conv4":
        if c.model.conv_impl not in CONV_IMPLS:
            raise ConfigError(f"model.conv_impl={c.model.conv_impl!r}; choose one of {CONV_IMPLS}")
        if c.model.get("block", "reference") not in BLOCKS:
            raise ConfigError(f"model.block={c.model.block!r}; choose one of {BLOCKS}")
    try:
        floating = jnp.issubdtype(jnp.dtype(c.model.dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ConfigError(
            f"model.dtype={c.model.dtype!r} is not a floating-point dtype; use e.g. 'float32' or "
            "'bfloat16'"
        )
    if c.data.queries < 0:
        raise ConfigError(f"data.queries={c.data.queries} must be >= 0")
    if c.data.queries < 1 and c.algorithm not in TRAIN_WITHOUT_QUERIES:
        raise ConfigError(
            f"data.queries={c.data.queries} but algorithm={c.algorithm!r} trains on the loss of "
            "the query examples (a mean over none: training fails at its first step); set "
            f"data.queries >= 1 (only {list(TRAIN_WITHOUT_QUERIES)}, which merge support and "
            "query into one training set, train with 0)"
        )
    if c.eval.queries <= 0:
        raise ConfigError(
            f"eval.queries={c.eval.queries}: need eval.queries > 0 (the query images per class "
            "of each evaluation and validation episode)"
        )
    from mtl_gbml.data.sampler import AUGMENTS

    if c.data.augment not in AUGMENTS:
        raise ConfigError(f"data.augment={c.data.augment!r}; choose one of {AUGMENTS}")
    if c.train.nonfinite not in ("raise", "skip"):
        raise ConfigError(f"train.nonfinite={c.train.nonfinite!r}; choose 'raise' or 'skip'")
    splits = datasets.SPLITS[c.data.protocol]
    classes, per_class = split_facts(c, "train")
    if c.data.ways > classes:
        raise ConfigError(
            f"data.ways={c.data.ways} but split 'train' has {classes} classes; lower data.ways"
        )
    if c.data.shots + c.data.queries > per_class:
        raise ConfigError(
            f"data.shots + data.queries = {c.data.shots + c.data.queries} but classes have "
            f"{per_class} images; lower data.queries"
        )
    if c.train.eval_every:
        if c.train.val_split not in splits:
            raise ConfigError(
                f"train.val_split={c.train.val_split!r} does not exist for protocol "
                f"{c.data.protocol!r} (splits {splits}); choose one or set train.eval_every=0"
            )
    if c.eval.split not in splits:
        raise ConfigError(f"eval.split={c.eval.split!r}; protocol {c.data.protocol!r} has {splits}")
    default_val = f"{c.data.ways}w{c.data.shots}s"
    val_key = (
        "train.val_setting"
        if c.train.val_setting
        else f"train.val_setting='' (the default: data.ways={c.data.ways} and "
        f"data.shots={c.data.shots}, {default_val!r})"
    )
    val_fix = (
        "lower its ways"
        if c.train.val_setting
        else "set train.val_setting to a setting with fewer ways, or lower data.ways"
    )
    # (key, setting, split it runs on, None: parsed only, as validation is off; the ways' fix)
    val_split = c.train.val_split if c.train.eval_every else None
    settings = [("eval.settings", s, c.eval.split, "lower its ways") for s in c.eval.settings]
    settings.append((val_key, c.train.val_setting or default_val, val_split, val_fix))
    extra = c.train.get("val_extra_settings", ())
    settings += [("train.val_extra_settings", s, val_split, "lower its ways") for s in extra]
    for key, setting, split, fix in settings:
        ways, shots = _parse_setting(key, setting)
        if split is not None:
            _check_setting(c, key, setting, ways, shots, split, fix)
    import jax

    n_dev = jax.device_count()
    if c.data.tasks_per_step % n_dev:
        raise ConfigError(
            f"data.tasks_per_step={c.data.tasks_per_step} is not divisible by the {n_dev} devices; "
            "make it a multiple of the device count"
        )
