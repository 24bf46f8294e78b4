"""Check a config before anything loads or compiles; every error names the key and the fix."""

from __future__ import annotations

import difflib

import ml_collections

from mtl_gbml import algorithms, models, optim
from mtl_gbml.data import datasets

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


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and how to fix it."""


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def split_facts(config: ml_collections.ConfigDict, split: str) -> tuple[int, int]:
    """(classes, images per class) of a split, rotations included."""
    sizes, per_class = _FACTS[(config.data.name, config.data.protocol)]
    return sizes[split] * (4 if config.data.rotations else 1), per_class


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
        if not c.algo.solver_steps >= 1:
            raise ConfigError(f"algo.solver_steps={c.algo.solver_steps} must be >= 1")
        if not c.algo.solver_tol >= 0:
            raise ConfigError(
                f"algo.solver_tol={c.algo.solver_tol} must be >= 0 (0: always algo.solver_steps)"
            )
    if c.data.queries < 0 or c.eval.queries <= 0:
        raise ConfigError("data.queries must be >= 0 and eval.queries > 0")
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
    eval_settings = list(c.eval.settings)
    if c.train.val_setting:
        eval_settings.append(c.train.val_setting)
    eval_settings += list(c.train.get("val_extra_settings", ()))
    if c.eval.split not in splits:
        raise ConfigError(f"eval.split={c.eval.split!r}; protocol {c.data.protocol!r} has {splits}")
    from mtl_gbml.evaluation import parse_setting

    for s in eval_settings:
        try:
            ways, shots = parse_setting(s)
        except ValueError as e:
            raise ConfigError(f"eval.settings: {e}") from e
        n_cls, n_img = split_facts(c, c.eval.split)
        if ways > n_cls:
            raise ConfigError(
                f"eval setting {s}: {ways} ways but split {c.eval.split!r} has {n_cls} classes"
            )
        if shots + c.eval.queries > n_img:
            raise ConfigError(
                f"eval setting {s}: {shots} shots + eval.queries={c.eval.queries} exceed the "
                f"{n_img} images per class; lower eval.queries"
            )
    import jax

    n_dev = jax.device_count()
    if c.data.tasks_per_step % n_dev:
        raise ConfigError(
            f"data.tasks_per_step={c.data.tasks_per_step} is not divisible by the {n_dev} devices; "
            "make it a multiple of the device count"
        )
