"""tiered-ImageNet (Ren et al. 2018: 351 / 97 / 160 classes under 20 / 6 / 8 high-level categories,
779,165 images of 84x84 RGB) as a TFDS builder, prepared offline from the standard distribution
files in a manual directory:

- ``{train,val,test}_images_png.pkl``: a pickled list of PNG-encoded images (each ``bytes`` or a
  1-D uint8 array of the encoded file, as the original Python 2 pickles hold them);
- ``{train,val,test}_labels.pkl``: a pickled dict with ``label_specific`` (class of each image),
  ``label_general`` (its high-level category) and optionally ``label_specific_str`` /
  ``label_general_str`` (their names).

Both are read with a restricted unpickler (:mod:`mtl_gbml.data.safe_pickle`). Images are decoded
lazily, one at a time while TFDS writes them, and each encoded entry is released once written, so
memory holds one split's encoded PNGs, never the decoded split. ``label`` is a split-local class
index in sorted ``label_specific`` order; ``class_name`` and ``general_label`` keep the rest.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_gbml.data import imageio, safe_pickle
from mtl_gbml.data.errors import DataError, claim_classes

IMAGE_SIZE = 84
SPLITS = ("train", "val", "test")
SIZES = {"train": 351, "val": 97, "test": 160}
MIN_PER_CLASS = 732  # ImageNet-1k training classes hold 732..1300 images
IMAGES = "{}_images_png.pkl"
LABELS = "{}_labels.pkl"
IMAGES_FORMAT = "a pickled list of PNG-encoded images (bytes or 1-D uint8 arrays)"
LABELS_FORMAT = (
    "a pickled dict with 'label_specific' (one class id per image) and 'label_general' "
    "(optionally 'label_specific_str', 'label_general_str': the names)"
)


def preprocess_image(img) -> np.ndarray:
    """A raw image (PIL image or uint8 array, any size) as stored: RGB uint8 [84, 84, 3]."""
    return imageio.preprocess_rgb(img, IMAGE_SIZE)


def check_files(manual_dir: str) -> None:
    """Every split's two files exist and are non-empty (their content is checked when read)."""
    for s in SPLITS:
        for pattern, fmt in ((IMAGES, IMAGES_FORMAT), (LABELS, LABELS_FORMAT)):
            path = os.path.join(manual_dir, pattern.format(s))
            if not os.path.exists(path):
                raise DataError(
                    f"tiered-ImageNet file missing: {path}; expected {fmt} (the standard "
                    "distribution of Ren et al. 2018: {train,val,test}_images_png.pkl and "
                    "{train,val,test}_labels.pkl)"
                )
            if os.path.getsize(path) == 0:
                raise DataError(f"{path} is empty; expected {fmt}")


def read_labels(path: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(label_specific [N], label_general [N] or -1s, specific names or None), validated."""
    obj = safe_pickle.load(path, LABELS_FORMAT)
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}; expected {LABELS_FORMAT}")
    obj = safe_pickle.str_keys(obj)
    if "label_specific" not in obj:
        raise DataError(f"{path} has keys {sorted(obj)}; expected {LABELS_FORMAT}")
    try:
        spec = np.asarray(obj["label_specific"]).astype(np.int64).reshape(-1)
        gen = np.asarray(obj.get("label_general", np.full(len(spec), -1))).astype(np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: labels are not integers ({e}); expected {LABELS_FORMAT}") from e
    if gen.shape != spec.shape:
        raise DataError(
            f"{path}: label_general has {gen.size} entries, label_specific {spec.size}; "
            f"expected {LABELS_FORMAT}"
        )
    names = obj.get("label_specific_str")
    if names is not None:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if spec.size and spec.max() >= len(names):
            raise DataError(
                f"{path}: label_specific_str names {len(names)} classes but label_specific uses "
                f"id {spec.max()}; expected {LABELS_FORMAT}"
            )
    return spec, gen, names


def read_images(path: str) -> list:
    obj = safe_pickle.load(path, IMAGES_FORMAT)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        obj = list(obj)
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path} holds a {type(obj).__name__}; expected {IMAGES_FORMAT}")
    return list(obj)


class TieredImagenetFewShot(tfds.core.GeneratorBasedBuilder):
    """tiered-ImageNet (Ren et al. 2018), 84x84 RGB, built offline, decoded lazily."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From {split}_images_png.pkl + {split}_labels.pkl."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place {train,val,test}_images_png.pkl and {train,val,test}_labels.pkl (Ren et al. 2018) "
        "in the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.Scalar(np.int64),
                    "class_name": tfds.features.Text(),
                    "general_label": tfds.features.Scalar(np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/renmengye/few-shot-ssl-public",
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        check_files(manual)
        seen: dict[str, str] = {}  # class name -> split, filled as the splits are generated in turn
        return {s: self._generate_examples(manual, s, seen) for s in SPLITS}

    def _generate_examples(self, manual: str, split: str, seen: dict | None = None):
        lpath = os.path.join(manual, LABELS.format(split))
        ipath = os.path.join(manual, IMAGES.format(split))
        spec, gen, names = read_labels(lpath)
        if names is not None:  # ids are split-local in the distribution; names are global
            used = [names[c] for c in np.unique(spec)]
            claim_classes({} if seen is None else seen, used, split, lpath)
        images = read_images(ipath)  # encoded PNGs only: decoded one at a time below
        if len(images) != len(spec):
            raise DataError(
                f"{ipath} holds {len(images)} images but {lpath} labels {len(spec)}; the two "
                "files must be of the same split and complete"
            )
        ids = np.unique(spec)
        local = {int(c): i for i, c in enumerate(ids)}
        fix = f"{ipath} is damaged; replace it"
        for i in range(len(images)):
            img = imageio.decode_rgb(images[i], IMAGE_SIZE, f"{ipath} entry {i}", fix)
            images[i] = None  # release the encoded bytes once decoded
            c = int(spec[i])
            yield (
                str(i),
                {
                    "image": img,
                    "label": local[c],
                    "class_name": names[c] if names is not None else str(c),
                    "general_label": int(gen[i]),
                },
            )
