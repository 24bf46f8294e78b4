"""mini-ImageNet (Vinyals et al. 2016; the Ravi & Larochelle split: 64 / 16 / 20 classes of 600
images, 84x84 RGB) as a TFDS builder, prepared offline from a manual directory holding either

- the widely used pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``: each a dict with
  ``image_data`` (uint8 [N, 84, 84, 3]) and ``class_dict`` ({class name: [indices into
  image_data]}); read with a restricted unpickler (:mod:`mtl_gbml.data.safe_pickle`), or
- the folder-of-JPEGs layout: ``images/<filename>`` and ``{train,val,test}.csv`` with the header
  ``filename,label`` (one row per image; ``label`` is the class, e.g. ``n01532829``); images that
  are not 84x84 are resized with antialiasing (PIL LANCZOS).

The pickle caches are used when all three are present. ``label`` is a split-local class index in
sorted class-name order; ``class_name`` keeps the name.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import tensorflow_datasets as tfds

from mtl_gbml.data import imageio, safe_pickle
from mtl_gbml.data.errors import DataError, claim_classes

IMAGE_SIZE = 84
SPLITS = ("train", "val", "test")
SIZES = {"train": 64, "val": 16, "test": 20}  # classes of the standard split (600 images each)
PICKLE = "mini-imagenet-cache-{}.pkl"
PICKLE_FORMAT = (
    "a pickled dict {'image_data': uint8 array [N, 84, 84, 3], "
    "'class_dict': {class name: [indices into image_data]}}"
)
CSV_FORMAT = "a CSV file with the header 'filename,label' and one row per image in images/"


def preprocess_image(img) -> np.ndarray:
    """A raw image (PIL image or uint8 array, any size) as stored: RGB uint8 [84, 84, 3]."""
    return imageio.preprocess_rgb(img, IMAGE_SIZE)


def read_csv(path: str) -> list[tuple[str, str]]:
    """[(filename, label)] of a split CSV; :class:`DataError` naming the file if malformed."""
    if not os.path.exists(path):
        raise DataError(f"missing file {path}; expected {CSV_FORMAT}")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is unreadable ({e}); expected {CSV_FORMAT}") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path} has no 'filename,label' header; expected {CSV_FORMAT}")
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {i} is {row!r}; expected {CSV_FORMAT}")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path} lists no images; expected {CSV_FORMAT}")
    return out


def layout(manual_dir: str) -> str:
    """'pickle' or 'jpeg', whichever complete layout ``manual_dir`` holds; else a DataError."""
    pkls = [os.path.join(manual_dir, PICKLE.format(s)) for s in SPLITS]
    if all(os.path.exists(p) for p in pkls):
        return "pickle"
    csvs = [os.path.join(manual_dir, f"{s}.csv") for s in SPLITS]
    images = os.path.join(manual_dir, "images")
    if all(os.path.exists(p) for p in csvs) and os.path.isdir(images):
        return "jpeg"
    missing_pkl = [p for p in pkls if not os.path.exists(p)]
    missing_jpg = [p for p in csvs + [images] if not os.path.exists(p)]
    raise DataError(
        f"mini-ImageNet not found in {manual_dir}. Expected either the pickle caches "
        f"{', '.join(PICKLE.format(s) for s in SPLITS)} (each {PICKLE_FORMAT}; missing: "
        f"{', '.join(missing_pkl)}), or the folder-of-JPEGs layout images/ + "
        f"{{train,val,test}}.csv (each {CSV_FORMAT}; missing: {', '.join(missing_jpg)})."
    )


def check_files(manual_dir: str) -> str:
    """Cheap checks before preparation (the layout exists; the CSVs parse, name existing images and
    no class is in two splits; the pickles' classes are checked as they are read). Returns the
    layout."""
    kind = layout(manual_dir)
    if kind == "jpeg":
        seen: dict[str, str] = {}
        for s in SPLITS:
            path = os.path.join(manual_dir, f"{s}.csv")
            for fname, label in read_csv(path):
                img = os.path.join(manual_dir, "images", fname)
                if not os.path.exists(img):
                    raise DataError(f"{path} names {fname}, but {img} does not exist")
                claim_classes(seen, [label], s, path)
    else:
        for s in SPLITS:
            path = os.path.join(manual_dir, PICKLE.format(s))
            if os.path.getsize(path) == 0:
                raise DataError(f"{path} is empty; expected {PICKLE_FORMAT}")
    return kind


def read_cache(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(image_data, {class name: indices}) of a pickle cache, validated."""
    obj = safe_pickle.load(path, PICKLE_FORMAT)
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}; expected {PICKLE_FORMAT}")
    obj = safe_pickle.str_keys(obj)
    if "image_data" not in obj or "class_dict" not in obj:
        raise DataError(f"{path} has keys {sorted(obj)}; expected {PICKLE_FORMAT}")
    data, classes = obj["image_data"], obj["class_dict"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 4
        or data.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
    ):
        desc = f"{data.dtype}{list(data.shape)}" if isinstance(data, np.ndarray) else type(data)
        raise DataError(f"{path}: image_data is {desc}; expected {PICKLE_FORMAT}")
    if not isinstance(classes, dict) or not classes:
        raise DataError(f"{path}: class_dict is empty or not a dict; expected {PICKLE_FORMAT}")
    out = {}
    for name, idx in classes.items():
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            idx = np.asarray(idx, np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: class_dict[{name!r}] is not a list of indices") from e
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(data):
            raise DataError(
                f"{path}: class_dict[{name!r}] has indices outside image_data's {len(data)} rows "
                f"(or none); expected {PICKLE_FORMAT}"
            )
        out[name] = idx
    return data, out


class MiniImagenetFewShot(tfds.core.GeneratorBasedBuilder):
    """mini-ImageNet (Ravi & Larochelle split), 84x84 RGB, built offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From the pickle caches or the images/ + CSV layout."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place mini-imagenet-cache-{train,val,test}.pkl, or images/ and {train,val,test}.csv "
        "(Ravi & Larochelle split), in the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.Scalar(np.int64),
                    "class_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/twitter/meta-learning-lstm",
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        kind = check_files(manual)
        seen: dict[str, str] = {}  # class -> split, filled as the splits are generated in turn
        return {s: self._generate_examples(manual, kind, s, seen) for s in SPLITS}

    def _generate_examples(self, manual: str, kind: str, split: str, seen: dict | None = None):
        if kind == "pickle":
            path = os.path.join(manual, PICKLE.format(split))
            data, classes = read_cache(path)
            claim_classes({} if seen is None else seen, classes, split, path)
            for label, name in enumerate(sorted(classes)):
                for i in classes[name]:
                    yield f"{name}/{i}", {"image": data[i], "label": label, "class_name": name}
            return
        path = os.path.join(manual, f"{split}.csv")
        rows = read_csv(path)
        labels = {c: i for i, c in enumerate(sorted({lab for _, lab in rows}))}
        fix = f"replace the file (named by {path})"
        for fname, name in rows:
            img = imageio.decode_file(os.path.join(manual, "images", fname), IMAGE_SIZE, fix)
            yield fname, {"image": img, "label": labels[name], "class_name": name}
