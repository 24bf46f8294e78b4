"""Load a prepared split as a device-resident :class:`ImagePool` (preparing it on first use)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import tempfile

import ml_collections
import numpy as np

from mtl_gbml.data.errors import DataError
from mtl_gbml.data.sampler import ImagePool, make_pool

DATASETS = ("omniglot", "mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100")
SPLITS = {
    "vinyals": ("train", "val", "test"),
    "lake": ("train", "test"),
    "standard": ("train", "val", "test"),  # the published split of the RGB datasets
}
PROTOCOLS = {name: ("standard",) for name in DATASETS} | {"omniglot": ("vinyals", "lake")}
# module and TFDS builder class of each RGB dataset (Omniglot: mtl_gbml.data.omniglot)
BUILDERS = {
    "mini_imagenet": ("mini_imagenet", "MiniImagenetFewShot"),
    "tiered_imagenet": ("tiered_imagenet", "TieredImagenetFewShot"),
    "cifar_fs": ("cifar_fs", "CifarFsFewShot"),
    "fc100": ("fc100", "Fc100FewShot"),
}


def raw_data_dir(data_config: ml_collections.ConfigDict) -> str:
    d = data_config.data_dir or os.environ.get("MTL_GBML_DATA_DIR", "")
    if not d and data_config.name != "omniglot":
        raise DataError(
            f"{data_config.name} is not prepared and there is no data directory: prepare it once "
            f"with python -m mtl_gbml.data.prepare --dataset {data_config.name} --manual_dir DIR "
            "(see the builder's docstring for the files DIR must hold), or set "
            f"$MTL_GBML_DATA_DIR (config data.data_dir) to a directory holding {data_config.name}/"
        )
    if not d:
        raise DataError(
            "no data directory: set $MTL_GBML_DATA_DIR (or config data.data_dir) to a directory "
            "holding omniglot/ (the two archives) and splits/, laid out like ../shared/data"
        )
    return d


def splits_of(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return SPLITS[data_config.protocol]


def _module(name: str):
    """The builder module of a dataset (``mtl_gbml.data.<module>``)."""
    import importlib

    return importlib.import_module(f"mtl_gbml.data.{BUILDERS[name][0]}")


def _builder(name: str, protocol: str, tfds_dir: str):
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF must never take the accelerator
    if name in BUILDERS:
        if protocol not in PROTOCOLS[name]:
            raise ValueError(f"data.protocol={protocol!r} for {name}; use {PROTOCOLS[name]}")
        cls, kwargs = getattr(_module(name), BUILDERS[name][1]), {}
    else:
        from mtl_gbml.data.omniglot import OmniglotFewShot as cls

        kwargs = {"config": protocol}
    info = os.path.join(_version_dir(name, protocol, tfds_dir), "dataset_info.json")
    with contextlib.nullcontext() if os.path.exists(info) else _scratch_tempdir():
        return cls(data_dir=tfds_dir or None, **kwargs)


@contextlib.contextmanager
def _scratch_tempdir():
    """``tempfile``'s directory redirected to a scratch directory, removed on exit.

    A TFDS builder constructed before its dataset is prepared makes a directory with
    ``tempfile.mkdtemp("tfds")`` for metadata from Google Cloud Storage
    (``DatasetInfo.initialize_from_bucket``) and never removes it, even when GCS is off: two empty
    ``/tmp/tmp*tfds`` directories were left behind by every preparation.
    """
    scratch = tempfile.mkdtemp(prefix="mtl_gbml_tfds_")
    previous, tempfile.tempdir = tempfile.tempdir, scratch
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


LOCK_FILE = ".mtl_gbml_prepare.lock"


@contextlib.contextmanager
def _prepare_lock(tfds_dir: str):
    """An exclusive lock per TFDS data directory, across processes of this machine: two runs (two
    pytest workers, ``time_to_accuracy.py --parallel 2`` on a fresh machine) must not both build
    the same dataset, whose TFDS temporary directories and final rename would collide. The lock
    file lives in the data directory itself, so it goes wherever that directory goes."""
    root = os.path.abspath(
        tfds_dir
        or os.environ.get("TFDS_DATA_DIR")
        or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )
    path = os.path.join(root, LOCK_FILE)
    try:
        os.makedirs(root, exist_ok=True)
        f = open(path, "a")
    except OSError as e:
        raise DataError(
            f"cannot prepare a dataset in the TFDS data directory {root}: {e}. Set data.tfds_dir "
            "(or $TFDS_DATA_DIR) to a writable directory"
        ) from e
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, a crash included
        yield


def prepare(data_config: ml_collections.ConfigDict) -> None:
    """Build the TFDS dataset once (no-op when it is already prepared)."""
    manual = os.path.join(raw_data_dir(data_config), data_config.name)
    prepare_from(data_config.name, manual, data_config.tfds_dir, data_config.protocol)


def prepare_from(name: str, manual_dir: str, tfds_dir: str = "", protocol: str = "") -> bool:
    """Prepare dataset ``name`` from the raw files in ``manual_dir`` into ``tfds_dir`` ('' = TFDS's
    default). Returns False when it was already prepared. Missing or malformed files raise a
    :class:`DataError` naming the file before TFDS starts."""

    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is unknown; choose one of {DATASETS}")
    protocol = protocol or PROTOCOLS[name][0]
    if _builder(name, protocol, tfds_dir).is_prepared():
        return False
    with _prepare_lock(tfds_dir):
        builder = _builder(name, protocol, tfds_dir)  # another process may have built it meanwhile
        if builder.is_prepared():
            return False
        _build(builder, name, manual_dir)
    return True


def _build(builder, name: str, manual_dir: str) -> None:
    import tensorflow_datasets as tfds

    if name in BUILDERS:
        if not os.path.isdir(manual_dir):
            raise DataError(f"manual directory {manual_dir} does not exist (the raw {name} files)")
        _module(name).check_files(manual_dir)
    else:  # names the missing archive and where to get it
        from mtl_gbml.data.omniglot import check_archives

        check_archives(manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a prepared split, filled batch by batch into preallocated arrays (a
    tiered-ImageNet split is ~10 GB: never hold it twice)."""
    import tensorflow_datasets as tfds

    n = builder.info.splits[split].num_examples
    shape = builder.info.features["image"].shape
    images = np.empty((n,) + tuple(shape), np.uint8)
    labels = np.empty((n,), np.int64)
    i = 0
    ds = builder.as_dataset(split=split, batch_size=1024, shuffle_files=False)
    for batch in tfds.as_numpy(ds.map(lambda e: (e["image"], e["label"]))):
        b = len(batch[1])
        images[i : i + b], labels[i : i + b] = batch
        i += b
    if i != n:
        raise DataError(f"prepared {builder.name}/{split} holds {i} examples, its metadata {n}")
    return images, labels


# Decoded splits up to this size are also kept as .npy files beside the prepared TFDS data, so a
# later process reads them directly (no TensorFlow import, no tf.data decoding: ~10 s a process
# for Omniglot on 2 CPU cores). Larger splits (tiered-ImageNet) are read from TFDS every time.
ARRAY_CACHE_MAX_BYTES = 2 * 2**30
_CACHE_PREFIX = "mtl_gbml_arrays"


def _version_dir(name: str, protocol: str, tfds_dir: str) -> str:
    """Where TFDS keeps the prepared ``name``/``protocol`` (computed without building it)."""
    if name in BUILDERS:
        cls = getattr(_module(name), BUILDERS[name][1])
    else:
        from mtl_gbml.data.omniglot import OmniglotFewShot as cls
    root = (
        tfds_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )
    # TFDS names a config directory only for builders with configs (Omniglot's protocols); the RGB
    # builders have none and keep their data in <root>/<name>/<version>
    parts = (cls.name, protocol) if cls.BUILDER_CONFIGS else (cls.name,)
    return os.path.join(root, *parts, str(cls.VERSION))


def _cache_paths(version_dir: str, split: str) -> tuple[str, str]:
    base = os.path.join(version_dir, f"{_CACHE_PREFIX}.{split}")
    return base + ".images.npy", base + ".labels.npy"


def _read_cache(version_dir: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    paths = _cache_paths(version_dir, split)
    if not all(os.path.exists(p) for p in paths):
        return None
    try:
        images, labels = (np.load(p, allow_pickle=False) for p in paths)
    except (OSError, ValueError):  # a torn or foreign file: fall back to TFDS (and rewrite it)
        return None
    if images.dtype != np.uint8 or len(images) != len(labels):
        return None
    return images, labels


def _write_cache(version_dir: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    if images.nbytes > ARRAY_CACHE_MAX_BYTES or not os.path.isdir(version_dir):
        return
    for path, arr in zip(_cache_paths(version_dir, split), (images, labels), strict=True):
        tmp = f"{path}.tmp{os.getpid()}.npy"
        try:
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
        except OSError:  # a read-only data directory: no cache, nothing else changes
            if os.path.exists(tmp):
                os.remove(tmp)
            return


@functools.lru_cache(maxsize=8)
def _load_arrays(name: str, protocol: str, tfds_dir: str, raw_dir: str, split: str):
    import tensorflow_datasets as tfds

    version_dir = _version_dir(name, protocol, tfds_dir)
    cached = _read_cache(version_dir, split)
    if cached is not None:
        return cached
    cfg = ml_collections.ConfigDict(
        {"name": name, "protocol": protocol, "tfds_dir": tfds_dir, "data_dir": raw_dir}
    )
    prepare(cfg)
    builder = _builder(name, protocol, tfds_dir)
    if name in BUILDERS:
        images, labels = _read_split(builder, split)
    else:
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int64)
    _write_cache(str(builder.data_dir), split, images, labels)
    return images, labels


def load_arrays(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [M, H, W, C], labels [M]) of one split."""
    if data_config.name not in DATASETS:
        raise ValueError(f"data.name={data_config.name!r} is unknown; choose one of {DATASETS}")
    if data_config.protocol not in PROTOCOLS[data_config.name]:
        raise ValueError(
            f"data.protocol={data_config.protocol!r} does not exist for {data_config.name}; "
            f"choose one of {PROTOCOLS[data_config.name]}"
        )
    if split not in splits_of(data_config):
        raise ValueError(
            f"split {split!r} does not exist for {data_config.name}/{data_config.protocol}; "
            f"it has {splits_of(data_config)}"
        )
    raw = data_config.data_dir or os.environ.get("MTL_GBML_DATA_DIR", "")
    return _load_arrays(data_config.name, data_config.protocol, data_config.tfds_dir, raw, split)


def load_pool(data_config: ml_collections.ConfigDict, split: str, device=None) -> ImagePool:
    images, labels = load_arrays(data_config, split)
    return make_pool(images, labels, rotations=data_config.rotations, device=device)


def class_count(data_config: ml_collections.ConfigDict, split: str) -> int:
    """Number of classes of a split (rotations included), from the prepared metadata."""
    _, labels = load_arrays(data_config, split)
    return len(np.unique(labels)) * (4 if data_config.rotations else 1)
