"""Load a prepared split as a device-resident :class:`ImagePool` (preparing it on first use)."""

from __future__ import annotations

import functools
import os

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
        return getattr(_module(name), BUILDERS[name][1])(data_dir=tfds_dir or None)
    from mtl_gbml.data.omniglot import OmniglotFewShot

    return OmniglotFewShot(config=protocol, data_dir=tfds_dir or None)


def prepare(data_config: ml_collections.ConfigDict) -> None:
    """Build the TFDS dataset once (no-op when it is already prepared)."""
    import tensorflow_datasets as tfds

    from mtl_gbml.data.omniglot import check_archives

    builder = _builder(data_config.name, data_config.protocol, data_config.tfds_dir)
    if builder.is_prepared():
        return
    manual = os.path.join(raw_data_dir(data_config), data_config.name)
    if data_config.name in BUILDERS:
        prepare_from(data_config.name, manual, data_config.tfds_dir, data_config.protocol)
        return
    check_archives(manual)  # clear errors before TFDS starts
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))


def prepare_from(name: str, manual_dir: str, tfds_dir: str = "", protocol: str = "") -> bool:
    """Prepare dataset ``name`` from the raw files in ``manual_dir`` into ``tfds_dir`` ('' = TFDS's
    default). Returns False when it was already prepared. Missing or malformed files raise a
    :class:`DataError` naming the file before TFDS starts."""
    import tensorflow_datasets as tfds

    if name not in DATASETS:
        raise ValueError(f"dataset {name!r} is unknown; choose one of {DATASETS}")
    protocol = protocol or PROTOCOLS[name][0]
    builder = _builder(name, protocol, tfds_dir)
    if builder.is_prepared():
        return False
    if not os.path.isdir(manual_dir):
        raise DataError(f"manual directory {manual_dir} does not exist (the raw {name} files)")
    if name in BUILDERS:
        _module(name).check_files(manual_dir)
    else:
        from mtl_gbml.data.omniglot import check_archives

        check_archives(manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return True


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


@functools.lru_cache(maxsize=8)
def _load_arrays(name: str, protocol: str, tfds_dir: str, raw_dir: str, split: str):
    import tensorflow_datasets as tfds

    cfg = ml_collections.ConfigDict(
        {"name": name, "protocol": protocol, "tfds_dir": tfds_dir, "data_dir": raw_dir}
    )
    prepare(cfg)
    builder = _builder(name, protocol, tfds_dir)
    if name in BUILDERS:
        return _read_split(builder, split)
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int64)


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
