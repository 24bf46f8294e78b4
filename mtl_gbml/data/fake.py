"""Tiny datasets in the exact distribution formats of the real ones, for tests and benchmarks.

Every image of global class ``g`` is filled with :func:`class_color` ``(g)`` (except a small
corner patch that makes images of a class distinct), so :func:`color_class` recovers the class of
any stored, sampled or augmented-free image, even after JPEG compression. Global class ids run over
all splits, so a class found in two splits would show.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tarfile

import numpy as np

SPLITS = ("train", "val", "test")


def class_color(g: int) -> tuple[int, int, int]:
    """A colour per global class id (0 <= g < 100), distinct by its red channel (steps of 2)."""
    return (20 + 2 * g, 250 - 2 * g, (40 + 7 * g) % 200)


def color_class(img: np.ndarray) -> int:
    """The global class id whose colour fills ``img`` (uint8 [H, W, 3]; read from the centre)."""
    h, w = img.shape[:2]
    centre = img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].astype(np.float64)
    r, g = np.median(centre[..., 0]), np.median(centre[..., 1])
    return int(np.floor(((r - 20) + (250 - g)) / 4 + 0.5))  # JPEG moves a channel by ~1


def make_image(g: int, j: int, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = class_color(g)
    img[:3, :3] = (j * 37) % 256  # image j of its class
    return img


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _counts(classes, per_class) -> dict[str, int]:
    if isinstance(classes, int):
        classes = {s: classes for s in SPLITS}
    return dict(classes), per_class


def write_mini_imagenet(
    manual_dir: str, layout: str = "pickle", classes=5, per_class: int = 4, size: int = 84
) -> dict[str, list[str]]:
    """mini-ImageNet in the pickle-cache layout or the images/ + CSV layout.

    Returns {split: [class names in global-id order]}; class ``names[s][i]`` has global id
    ``offset(s) + i`` where offsets follow SPLITS order.
    """
    classes, per_class = _counts(classes, per_class)
    os.makedirs(manual_dir, exist_ok=True)
    out, g = {}, 0
    for si, s in enumerate(SPLITS):
        names = [f"n{si}{i:07d}" for i in range(classes[s])]
        out[s] = names
        if layout == "pickle":
            data = np.stack(
                [make_image(g + i, j, size) for i in range(len(names)) for j in range(per_class)]
            )
            class_dict = {
                n: list(range(i * per_class, (i + 1) * per_class)) for i, n in enumerate(names)
            }
            with open(os.path.join(manual_dir, f"mini-imagenet-cache-{s}.pkl"), "wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
        elif layout == "jpeg":
            from PIL import Image

            img_dir = os.path.join(manual_dir, "images")
            os.makedirs(img_dir, exist_ok=True)
            with open(os.path.join(manual_dir, f"{s}.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["filename", "label"])
                for i, n in enumerate(names):
                    for j in range(per_class):
                        fname = f"{n}{j + 1:08d}.jpg"
                        # the raw images are larger than 84x84; the builder resizes them
                        big = np.asarray(
                            Image.fromarray(make_image(g + i, j, size)).resize((2 * size, size))
                        )
                        Image.fromarray(big).save(os.path.join(img_dir, fname), quality=95)
                        w.writerow([fname, n])
        else:
            raise ValueError(f"layout={layout!r}; 'pickle' or 'jpeg'")
        g += len(names)
    return out


def write_tiered_imagenet(
    manual_dir: str, classes=5, per_class: int = 4, size: int = 84, general: int = 2
) -> dict[str, list[str]]:
    """tiered-ImageNet: ``{split}_images_png.pkl`` (a list of PNG-encoded images: 1-D uint8 arrays
    for train as in the original Python 2 pickles, ``bytes`` for val/test) and
    ``{split}_labels.pkl`` (protocol 2, as old pickles are). Class ``i`` of a split has
    ``label_general = i % general``."""
    classes, per_class = _counts(classes, per_class)
    os.makedirs(manual_dir, exist_ok=True)
    out, g = {}, 0
    for si, s in enumerate(SPLITS):
        c = classes[s]
        names = [f"n{si}{i:07d}" for i in range(c)]
        out[s] = names
        images, spec = [], []
        # interleave the classes, as the real files are not sorted by class
        for j in range(per_class):
            for i in range(c):
                png = _png(make_image(g + i, j, size))
                images.append(np.frombuffer(png, np.uint8).copy() if s == "train" else png)
                spec.append(i)
        labels = {
            "label_specific": np.asarray(spec, np.int64),
            "label_general": np.asarray(spec, np.int64) % general,
            "label_specific_str": names,
            "label_general_str": [f"general_{k}" for k in range(general)],
        }
        with open(os.path.join(manual_dir, f"{s}_images_png.pkl"), "wb") as f:
            pickle.dump(images, f, protocol=2)
        with open(os.path.join(manual_dir, f"{s}_labels.pkl"), "wb") as f:
            pickle.dump(labels, f, protocol=2)
        g += c
    return out


def cifar100_names() -> tuple[list[str], list[str], dict[str, str]]:
    """(fine names, coarse names, fine -> coarse), alphabetical as in CIFAR-100's meta, from the
    packaged CIFAR-FS class lists (which cover all 100 fine classes)."""
    from mtl_gbml.data.cifar100 import SPLIT_DIR

    parent = {}
    for s in SPLITS:
        with open(os.path.join(SPLIT_DIR, "cifar_fs", f"{s}.json")) as f:
            parent.update({fine: sup for sup, fine in json.load(f)})
    return sorted(parent), sorted(set(parent.values())), parent


def write_cifar100(manual_dir: str, per_class_train: int = 3, per_class_test: int = 1) -> list[str]:
    """``cifar-100-python.tar.gz`` with ``train``/``test``/``meta`` pickles (protocol 2, ``data``
    rows in R, G, B plane order) holding every fine class; image colour = its fine label id.
    Returns the fine names (index = fine label = global class id)."""
    fine_names, coarse_names, parent = cifar100_names()
    os.makedirs(manual_dir, exist_ok=True)
    members = {}
    for part, n in (("train", per_class_train), ("test", per_class_test)):
        rows, fine, coarse = [], [], []
        for j in range(n):
            for k, name in enumerate(fine_names):
                img = make_image(k, j + (0 if part == "train" else per_class_train), 32)
                rows.append(img.transpose(2, 0, 1).reshape(-1))
                fine.append(k)
                coarse.append(coarse_names.index(parent[name]))
        members[part] = {
            "batch_label": f"{part} batch",
            "filenames": [f"img_{i}.png" for i in range(len(rows))],
            "data": np.stack(rows).astype(np.uint8),
            "fine_labels": fine,
            "coarse_labels": coarse,
        }
    members["meta"] = {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names}
    with tarfile.open(os.path.join(manual_dir, "cifar-100-python.tar.gz"), "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return fine_names
