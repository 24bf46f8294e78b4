"""Load a prepared split as a device-resident :class:`ImagePool` (preparing it on first use)."""

from __future__ import annotations

import functools
import os

import ml_collections
import numpy as np

from mtl_gbml.data.errors import DataError
from mtl_gbml.data.sampler import ImagePool, make_pool

DATASETS = ("omniglot",)
SPLITS = {"vinyals": ("train", "val", "test"), "lake": ("train", "test")}


def raw_data_dir(data_config: ml_collections.ConfigDict) -> str:
    d = data_config.data_dir or os.environ.get("MTL_GBML_DATA_DIR", "")
    if not d:
        raise DataError(
            "no data directory: set $MTL_GBML_DATA_DIR (or config data.data_dir) to a directory "
            "holding omniglot/ (the two archives) and splits/, laid out like ../shared/data"
        )
    return d


def splits_of(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return SPLITS[data_config.protocol]


def _builder(name: str, protocol: str, tfds_dir: str):
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF must never take the accelerator
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
    check_archives(manual)  # clear errors before TFDS starts
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))


@functools.lru_cache(maxsize=8)
def _load_arrays(name: str, protocol: str, tfds_dir: str, raw_dir: str, split: str):
    import tensorflow_datasets as tfds

    cfg = ml_collections.ConfigDict(
        {"name": name, "protocol": protocol, "tfds_dir": tfds_dir, "data_dir": raw_dir}
    )
    prepare(cfg)
    builder = _builder(name, protocol, tfds_dir)
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int64)


def load_arrays(
    data_config: ml_collections.ConfigDict, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [M, H, W, C], labels [M]) of one split."""
    if data_config.name not in DATASETS:
        raise ValueError(f"data.name={data_config.name!r} is unknown; choose one of {DATASETS}")
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
