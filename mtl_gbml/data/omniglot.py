"""Omniglot (Lake et al., Science 2015) as a TFDS builder, prepared offline from the two original
archives ``images_background.zip`` and ``images_evaluation.zip`` in a manual directory.

Protocols (builder configs):
- ``vinyals``: train/val/test = 1028/172/423 characters from the split files
  ``omniglot_vinyals/{train,val,test}.json`` (looked for in ``<manual>/splits``,
  ``<manual>/../splits``). Rotated classes are added by the image pool, not stored.
- ``lake``: train = background (964 characters), test = evaluation (659 characters).

Images are resized from 105x105 to 28x28 with antialiasing (PIL LANCZOS) and inverted so that
strokes are bright on a zero background. ``label`` is a split-local character index in sorted
(alphabet, character) order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from mtl_gbml.data.errors import DataError

ARCHIVES = ("images_background.zip", "images_evaluation.zip")
IMAGE_SIZE = 28
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_archives(manual_dir: str) -> None:
    """Raise :class:`DataError` naming the file if an archive is missing, corrupt or mismatched."""
    sums = {}
    sums_path = os.path.join(manual_dir, "SHA256SUMS")
    if os.path.exists(sums_path):
        for line in open(sums_path):
            if line.strip():
                digest, name = line.split()
                sums[name.lstrip("*")] = digest
    for name in ARCHIVES:
        path = os.path.join(manual_dir, name)
        if not os.path.exists(path):
            raise DataError(
                f"Omniglot archive missing: {path}. Put the original {name} from "
                "https://github.com/brendenlake/omniglot/tree/master/python there, or point "
                "$MTL_GBML_DATA_DIR (config data.data_dir) at a directory holding omniglot/."
            )
        if name in sums and _sha256(path) != sums[name]:
            raise DataError(
                f"checksum mismatch for {path}: its sha256 differs from {sums_path}. "
                "The file is corrupt or not the expected archive; replace it."
            )
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{path} is not a readable zip archive ({e}); replace it.") from e
        if bad is not None:
            raise DataError(f"{path} is corrupt: member {bad} fails its CRC check; replace it.")


def find_split_dir(manual_dir: str) -> str:
    candidates = [
        os.path.join(manual_dir, "splits", "omniglot_vinyals"),
        os.path.join(os.path.dirname(os.path.abspath(manual_dir)), "splits", "omniglot_vinyals"),
    ]
    for c in candidates:
        if all(os.path.exists(os.path.join(c, f"{s}.json")) for s in VINYALS_SIZES):
            return c
    raise DataError(
        "Vinyals split files {train,val,test}.json not found in any of: "
        + ", ".join(candidates)
        + ". They ship in ../shared/data/splits/omniglot_vinyals (or torchmeta's omniglot assets)."
    )


def read_split(split_dir: str, split: str) -> list[tuple[str, str, str]]:
    """[(archive stem, alphabet, character)] of a Vinyals split file."""
    path = os.path.join(split_dir, f"{split}.json")
    try:
        spec = json.load(open(path))
        out = [
            (f"images_{part}", alpha, ch)
            for part in sorted(spec)
            for alpha in sorted(spec[part])
            for ch in sorted(spec[part][alpha])
        ]
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise DataError(
            f"{path} is malformed ({e}); expected "
            '{"background"|"evaluation": {alphabet: [character, ...]}}'
        ) from e
    if len(out) != VINYALS_SIZES[split]:
        raise DataError(
            f"{path} lists {len(out)} characters; the Vinyals {split} split has "
            f"{VINYALS_SIZES[split]}"
        )
    return out


def preprocess_image(img) -> np.ndarray:
    """A raw Omniglot image (PIL image or uint8 array, any size, dark strokes on white) as stored:
    grayscale, 28x28 with antialiasing (LANCZOS), inverted (bright strokes), uint8 [28, 28, 1]."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {arr.dtype}")
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    img = img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    return (255 - np.asarray(img, np.uint8))[..., None]


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(
            f"unreadable image {where} ({e}); the archive is damaged, replace it."
        ) from e
    return preprocess_image(img)


def _index_archive(path: str) -> dict[tuple[str, str], list[str]]:
    """{(alphabet, character): [member names]} of one archive."""
    index: dict[tuple[str, str], list[str]] = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                index.setdefault((parts[1], parts[2]), []).append(name)
    return index


class OmniglotFewShot(tfds.core.GeneratorBasedBuilder):
    """Omniglot for few-shot learning (Vinyals or Lake protocol), built offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "28x28 antialiased, inverted; Vinyals and Lake protocols."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="vinyals", description="1028/172/423 characters"),
        tfds.core.BuilderConfig(name="lake", description="background 964 / evaluation 659"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place images_background.zip and images_evaluation.zip (and optionally SHA256SUMS) in the "
        "manual directory, and the Vinyals split files in <manual>/../splits/omniglot_vinyals."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                    "label": tfds.features.Scalar(np.int64),
                    "character": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/brendenlake/omniglot",
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        check_archives(manual)
        if self.builder_config.name == "vinyals":
            split_dir = find_split_dir(manual)
            chars = {s: read_split(split_dir, s) for s in VINYALS_SIZES}
        else:
            chars = {}
            for split, stem in (("train", "images_background"), ("test", "images_evaluation")):
                index = _index_archive(os.path.join(manual, f"{stem}.zip"))
                chars[split] = [(stem, a, c) for a, c in sorted(index)]
        return {s: self._generate_examples(manual, c) for s, c in chars.items()}

    def _generate_examples(self, manual: str, characters: list[tuple[str, str, str]]):
        indices = {
            stem: _index_archive(os.path.join(manual, f"{stem}.zip"))
            for stem in {c[0] for c in characters}
        }
        zips = {stem: zipfile.ZipFile(os.path.join(manual, f"{stem}.zip")) for stem in indices}
        for label, (stem, alpha, ch) in enumerate(characters):
            members = sorted(indices[stem].get((alpha, ch), []))
            if not members:
                raise DataError(
                    f"{os.path.join(manual, stem + '.zip')} has no images for {alpha}/{ch} "
                    "(named by the split file): the archive is incomplete or the split is wrong."
                )
            for m in members:
                yield (
                    m,
                    {
                        "image": _decode(zips[stem].read(m), f"{stem}.zip:{m}"),
                        "label": label,
                        "character": f"{alpha}/{ch}",
                    },
                )
