"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's 100 fine classes split 64 / 16 / 20, all 600
images of each class (train and test files together), 32x32 RGB, as a TFDS builder prepared offline
from ``cifar-100-python.tar.gz`` (see :mod:`mtl_gbml.data.cifar100`) in a manual directory.

The class lists ship in the package: ``mtl_gbml/data/splits/cifar_fs/{train,val,test}.json``, each
a list of ``[superclass, fine class]``. ``label`` is a split-local class index in sorted fine-name
order; ``class_name`` and ``superclass`` keep the names.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_gbml.data import cifar100
from mtl_gbml.data.errors import DataError

IMAGE_SIZE = cifar100.IMAGE_SIZE
SPLITS = ("train", "val", "test")
SIZES = {"train": 64, "val": 16, "test": 20}
SPLIT_FORMAT = "a JSON list of [superclass, fine class] pairs"
preprocess_image = cifar100.preprocess_image


def split_classes(split: str, split_dir: str | None = None) -> list[tuple[str, str]]:
    """[(superclass, fine class)] of a CIFAR-FS split, sorted by fine class."""
    spec, path = cifar100.read_split_file("cifar_fs", split, split_dir)
    if not isinstance(spec, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in spec
    ):
        raise DataError(f"{path} is malformed; expected {SPLIT_FORMAT}")
    if len(spec) != SIZES[split]:
        raise DataError(f"{path} lists {len(spec)} classes; CIFAR-FS {split} has {SIZES[split]}")
    return sorted(((s, f) for s, f in spec), key=lambda p: p[1])


def check_files(manual_dir: str) -> None:
    cifar100.source(manual_dir)
    seen: dict[str, str] = {}
    for s in SPLITS:
        for _, fine in split_classes(s):
            if seen.setdefault(fine, s) != s:
                raise DataError(f"CIFAR-FS split files put {fine} in both {seen[fine]} and {s}")


class CifarFsFewShot(tfds.core.GeneratorBasedBuilder):
    """CIFAR-FS, 64/16/20 CIFAR-100 fine classes, 32x32 RGB, built offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From cifar-100-python.tar.gz and the packaged class lists."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) in the "
        "manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.Scalar(np.int64),
                    "class_name": tfds.features.Text(),
                    "superclass": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/bertinetto/r2d2",
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        check_files(manual)
        data = cifar100.read(manual)
        return {s: self._generate_examples(data, s) for s in SPLITS}

    def _generate_examples(self, data: cifar100.Cifar100, split: str):
        classes = split_classes(split)
        path = os.path.join(cifar100.SPLIT_DIR, "cifar_fs", f"{split}.json")
        cifar100.check_names(data, [f for _, f in classes], "fine", path)
        cifar100.check_names(data, [s for s, _ in classes], "coarse", path)
        for label, (sup, fine) in enumerate(classes):
            k = data.fine_names.index(fine)
            idx = np.flatnonzero(data.fine == k)
            if len(idx) and data.coarse_names[data.coarse[idx[0]]] != sup:
                raise DataError(
                    f"{path} puts {fine} under {sup}, but CIFAR-100 puts it under "
                    f"{data.coarse_names[data.coarse[idx[0]]]}"
                )
            for i in idx:
                yield (
                    data.keys[i],
                    {
                        "image": data.images[i],
                        "label": label,
                        "class_name": fine,
                        "superclass": sup,
                    },
                )
