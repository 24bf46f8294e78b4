"""FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12 / 4 / 4 superclasses, i.e. the
60 / 20 / 20 fine classes under them, all 600 images of each class, 32x32 RGB, as a TFDS builder
prepared offline from ``cifar-100-python.tar.gz`` (see :mod:`mtl_gbml.data.cifar100`).

The superclass lists ship in the package: ``mtl_gbml/data/splits/fc100/{train,val,test}.json``.
Few-shot classes are the fine classes: ``label`` is a split-local index in sorted (superclass, fine
class) order, so a superclass's five classes are consecutive; ``class_name`` and ``superclass`` keep
the names.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_gbml.data import cifar100
from mtl_gbml.data.errors import DataError

IMAGE_SIZE = cifar100.IMAGE_SIZE
SPLITS = ("train", "val", "test")
SUPERCLASSES = {"train": 12, "val": 4, "test": 4}
SIZES = {s: 5 * n for s, n in SUPERCLASSES.items()}  # fine classes: 60 / 20 / 20
SPLIT_FORMAT = "a JSON list of CIFAR-100 superclass names"
preprocess_image = cifar100.preprocess_image


def split_superclasses(split: str, split_dir: str | None = None) -> list[str]:
    spec, path = cifar100.read_split_file("fc100", split, split_dir)
    if not isinstance(spec, list) or not all(isinstance(s, str) for s in spec):
        raise DataError(f"{path} is malformed; expected {SPLIT_FORMAT}")
    if len(spec) != SUPERCLASSES[split]:
        raise DataError(
            f"{path} lists {len(spec)} superclasses; FC100 {split} has {SUPERCLASSES[split]}"
        )
    return sorted(spec)


def check_files(manual_dir: str) -> None:
    cifar100.source(manual_dir)
    seen: dict[str, str] = {}
    for s in SPLITS:
        for sup in split_superclasses(s):
            if seen.setdefault(sup, s) != s:
                raise DataError(f"FC100 split files put {sup} in both {seen[sup]} and {s}")


class Fc100FewShot(tfds.core.GeneratorBasedBuilder):
    """FC100, CIFAR-100 split by superclass (12/4/4), 32x32 RGB, built offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From cifar-100-python.tar.gz and the packaged superclass lists."}
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
            homepage="https://github.com/ElementAI/TADAM",
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        check_files(manual)
        data = cifar100.read(manual)
        return {s: self._generate_examples(data, s) for s in SPLITS}

    def _generate_examples(self, data: cifar100.Cifar100, split: str):
        sups = split_superclasses(split)
        path = os.path.join(cifar100.SPLIT_DIR, "fc100", f"{split}.json")
        cifar100.check_names(data, sups, "coarse", path)
        classes = sorted(
            {
                (data.coarse_names[c], data.fine_names[f])
                for f, c in zip(data.fine, data.coarse, strict=True)
                if data.coarse_names[c] in sups
            }
        )
        for label, (sup, fine) in enumerate(classes):
            k = data.fine_names.index(fine)
            for i in np.flatnonzero(data.fine == k):
                yield (
                    data.keys[i],
                    {
                        "image": data.images[i],
                        "label": label,
                        "class_name": fine,
                        "superclass": sup,
                    },
                )
