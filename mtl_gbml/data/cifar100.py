"""CIFAR-100 from its python distribution, the source of CIFAR-FS and FC100.

Reads ``cifar-100-python.tar.gz`` (members ``cifar-100-python/{train,test,meta}``) without
extracting it, or an already extracted ``cifar-100-python/`` folder. ``train``/``test`` are pickled
dicts with ``data`` (uint8 [N, 3072], each row 32x32 R, G then B planes), ``fine_labels`` and
``coarse_labels``; ``meta`` holds ``fine_label_names`` and ``coarse_label_names``. All are read with
the restricted unpickler (:mod:`mtl_gbml.data.safe_pickle`).

The split class lists of CIFAR-FS and FC100 ship in the package (``mtl_gbml/data/splits``).
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import NamedTuple

import numpy as np

from mtl_gbml.data import imageio, safe_pickle
from mtl_gbml.data.errors import DataError

IMAGE_SIZE = 32
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
PARTS = ("train", "test")
DATA_FORMAT = (
    "a pickled dict with 'data' (uint8 [N, 3072]), 'fine_labels' and 'coarse_labels' (N ints each)"
)
META_FORMAT = "a pickled dict with 'fine_label_names' (100 names) and 'coarse_label_names' (20)"
SPLIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")


class Cifar100(NamedTuple):
    images: np.ndarray  # uint8 [N, 32, 32, 3], train then test images
    fine: np.ndarray  # int64 [N]
    coarse: np.ndarray  # int64 [N]
    fine_names: list[str]
    coarse_names: list[str]
    keys: list[str]  # 'train/<i>' | 'test/<i>'


def preprocess_image(img) -> np.ndarray:
    """A raw image (PIL image or uint8 array, any size) as stored: RGB uint8 [32, 32, 3]."""
    return imageio.preprocess_rgb(img, IMAGE_SIZE)


def source(manual_dir: str) -> str:
    """Path of the archive (preferred) or extracted folder; a DataError naming both if neither."""
    archive = os.path.join(manual_dir, ARCHIVE)
    folder = os.path.join(manual_dir, FOLDER)
    if os.path.exists(archive):
        return archive
    if all(os.path.exists(os.path.join(folder, p)) for p in PARTS + ("meta",)):
        return folder
    raise DataError(
        f"CIFAR-100 not found: expected {archive} (the python version from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, holding cifar-100-python/{train,test,meta}) "
        f"or the extracted folder {folder}/ with train, test and meta"
    )


def _read_member(src: str, name: str, fmt: str):
    if os.path.isdir(src):
        return safe_pickle.load(os.path.join(src, name), fmt)
    where = f"{src}:{FOLDER}/{name}"
    try:
        with tarfile.open(src, "r:*") as tar:
            try:
                f = tar.extractfile(f"{FOLDER}/{name}")
            except KeyError:
                f = None
            if f is None:
                raise DataError(f"{src} has no member {FOLDER}/{name}; expected {fmt}")
            return safe_pickle.load_fileobj(f, where, fmt)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(
            f"{src} is not a readable tar.gz archive ({e}); expected the python version of "
            "CIFAR-100 (cifar-100-python.tar.gz)"
        ) from e


def _names(obj, key: str, where: str, count: int) -> list[str]:
    names = obj.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise DataError(f"{where}: {key} is not a list of {count} names; expected {META_FORMAT}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read(manual_dir: str) -> Cifar100:
    """All 60,000 images (or however many the files hold) with fine and coarse labels."""
    src = source(manual_dir)
    where = lambda n: os.path.join(src, n) if os.path.isdir(src) else f"{src}:{FOLDER}/{n}"
    meta = _read_member(src, "meta", META_FORMAT)
    if not isinstance(meta, dict):
        raise DataError(f"{where('meta')} holds a {type(meta).__name__}; expected {META_FORMAT}")
    meta = safe_pickle.str_keys(meta)
    fine_names = _names(meta, "fine_label_names", where("meta"), 100)
    coarse_names = _names(meta, "coarse_label_names", where("meta"), 20)
    images, fine, coarse, keys = [], [], [], []
    for part in PARTS:
        d = _read_member(src, part, DATA_FORMAT)
        if not isinstance(d, dict):
            raise DataError(f"{where(part)} holds a {type(d).__name__}; expected {DATA_FORMAT}")
        d = safe_pickle.str_keys(d)
        if not all(k in d for k in ("data", "fine_labels", "coarse_labels")):
            raise DataError(f"{where(part)} has keys {sorted(d)}; expected {DATA_FORMAT}")
        x = d["data"]
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            desc = f"{x.dtype}{list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise DataError(f"{where(part)}: data is {desc}; expected {DATA_FORMAT}")
        try:
            f = np.asarray(d["fine_labels"], np.int64).reshape(-1)
            c = np.asarray(d["coarse_labels"], np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"{where(part)}: labels are not integers; expected {DATA_FORMAT}"
            ) from e
        if len(f) != len(x) or len(c) != len(x):
            raise DataError(
                f"{where(part)}: {len(x)} images but {len(f)} fine / {len(c)} coarse labels; "
                f"expected {DATA_FORMAT}"
            )
        if len(x) and (f.min() < 0 or f.max() >= 100 or c.min() < 0 or c.max() >= 20):
            raise DataError(f"{where(part)}: labels out of range; expected {DATA_FORMAT}")
        images.append(x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fine.append(f)
        coarse.append(c)
        keys += [f"{part}/{i}" for i in range(len(x))]
    fine_a, coarse_a = np.concatenate(fine), np.concatenate(coarse)
    for k in np.unique(fine_a):  # every fine class lies in exactly one superclass
        cs = np.unique(coarse_a[fine_a == k])
        if len(cs) != 1:
            raise DataError(
                f"{src}: fine class {fine_names[k]} has images in superclasses "
                f"{[coarse_names[i] for i in cs]}; the files are inconsistent"
            )
    return Cifar100(
        np.ascontiguousarray(np.concatenate(images)),
        fine_a,
        coarse_a,
        fine_names,
        coarse_names,
        keys,
    )


def read_split_file(dataset: str, split: str, split_dir: str | None = None):
    """The JSON class list of ``dataset`` ('cifar_fs' | 'fc100') for ``split``."""
    path = os.path.join(split_dir or SPLIT_DIR, dataset, f"{split}.json")
    if not os.path.exists(path):
        raise DataError(f"split file missing: {path} (it ships with the mtl_gbml package)")
    try:
        with open(path) as f:
            return json.load(f), path
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e})") from e


def check_names(data: Cifar100, names: list[str], kind: str, path: str) -> None:
    known = data.fine_names if kind == "fine" else data.coarse_names
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise DataError(
            f"{path} names {kind} classes {unknown} that CIFAR-100's meta does not list; the split "
            "file or the CIFAR-100 meta file is wrong"
        )
