"""Omniglot through TFDS: the Vinyals split's sizes, image format, and clear errors on bad files."""

import os
import shutil
import zipfile

import numpy as np
import pytest

from mtl_gbml.base_config import get_config
from mtl_gbml.data import datasets
from mtl_gbml.data.errors import DataError
from mtl_gbml.data.omniglot import check_archives, find_split_dir, read_split


@pytest.fixture(scope="module")
def omniglot_config(data_dir):
    c = get_config("mtl").data
    c.data_dir = data_dir
    return c


def test_vinyals_split_sizes_and_images(omniglot_config):
    sizes = {}
    chars = {}
    for split in ("train", "val", "test"):
        images, labels = datasets.load_arrays(omniglot_config, split)
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
        counts = np.bincount(labels)
        assert np.all(counts == 20)  # 20 drawers per character
        sizes[split] = len(counts)
        chars[split] = {
            tuple(x)
            for x in read_split(
                find_split_dir(os.path.join(omniglot_config.data_dir, "omniglot")), split
            )
        }
        # strokes bright on a dark background, antialiased (grey levels between 0 and 255)
        assert images.mean() < 60 and len(np.unique(images[:50])) > 10
    assert sizes == {"train": 1028, "val": 172, "test": 423}
    assert not (chars["train"] & chars["val"]) and not (chars["train"] & chars["test"])
    pool = datasets.load_pool(omniglot_config, "test")
    assert pool.num_classes == 4 * 423  # rotations are new classes


def test_decoded_split_cache_matches_tfds_and_survives_a_torn_file(omniglot_config):
    """The .npy cache beside the prepared data holds exactly what TFDS decodes; a torn cache
    file is ignored (read from TFDS again) and rewritten."""
    import tensorflow_datasets as tfds

    c = omniglot_config
    images, labels = datasets.load_arrays(c, "val")
    vdir = datasets._version_dir(c.name, c.protocol, c.tfds_dir)
    builder = datasets._builder(c.name, c.protocol, c.tfds_dir)
    assert os.path.samefile(vdir, str(builder.data_dir))  # computed without building it
    ref = tfds.as_numpy(builder.as_dataset(split="val", batch_size=-1))
    cached = datasets._read_cache(vdir, "val")
    assert cached is not None
    np.testing.assert_array_equal(cached[0], ref["image"])
    np.testing.assert_array_equal(cached[1], ref["label"])
    np.testing.assert_array_equal(images, ref["image"])
    img_path, _ = datasets._cache_paths(vdir, "val")
    with open(img_path, "r+b") as f:
        f.truncate(100)
    assert datasets._read_cache(vdir, "val") is None
    datasets._load_arrays.cache_clear()
    again, _ = datasets.load_arrays(c, "val")
    np.testing.assert_array_equal(again, ref["image"])
    assert datasets._read_cache(vdir, "val") is not None


def test_decoded_split_cache_refuses_mismatched_or_foreign_files(tmp_path):
    """A cache whose two files disagree in length, whose images are not uint8, or that misses a
    file is not used (the split is read from TFDS again); a consistent pair round-trips."""
    vdir = str(tmp_path)
    img_path, lbl_path = datasets._cache_paths(vdir, "val")
    images, labels = np.arange(24, dtype=np.uint8).reshape(3, 2, 2, 2), np.array([0, 1, 1])
    datasets._write_cache(vdir, "val", images, labels)
    got = datasets._read_cache(vdir, "val")
    np.testing.assert_array_equal(got[0], images)
    np.testing.assert_array_equal(got[1], labels)
    np.save(lbl_path, labels[:2])  # one label short (a cache written by two different runs)
    assert datasets._read_cache(vdir, "val") is None
    np.save(lbl_path, labels)
    np.save(img_path, images.astype(np.float32))
    assert datasets._read_cache(vdir, "val") is None
    os.remove(img_path)
    assert datasets._read_cache(vdir, "val") is None


def _copy_data(src, dst):
    os.makedirs(os.path.join(dst, "omniglot"))
    for f in ("images_background.zip", "images_evaluation.zip", "SHA256SUMS"):
        shutil.copy(os.path.join(src, "omniglot", f), os.path.join(dst, "omniglot", f))
    shutil.copytree(os.path.join(src, "splits"), os.path.join(dst, "splits"))
    for root, dirs, files in os.walk(dst):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o755 if n in dirs else 0o644)


def test_missing_archive_names_the_file(tmp_path, data_dir):
    _copy_data(data_dir, tmp_path)
    os.remove(tmp_path / "omniglot" / "images_evaluation.zip")
    with pytest.raises(DataError, match="images_evaluation.zip"):
        check_archives(str(tmp_path / "omniglot"))


def test_checksum_mismatch_names_the_file(tmp_path, data_dir):
    _copy_data(data_dir, tmp_path)
    with open(tmp_path / "omniglot" / "images_background.zip", "ab") as f:
        f.write(b"garbage")
    with pytest.raises(DataError, match="checksum mismatch for .*images_background.zip"):
        check_archives(str(tmp_path / "omniglot"))


def test_truncated_zip_names_the_file(tmp_path, data_dir):
    _copy_data(data_dir, tmp_path)
    os.remove(tmp_path / "omniglot" / "SHA256SUMS")  # no checksums: the zip check must catch it
    p = tmp_path / "omniglot" / "images_background.zip"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="images_background.zip"):
        check_archives(str(tmp_path / "omniglot"))


def test_corrupt_member_names_the_file(tmp_path, data_dir):
    _copy_data(data_dir, tmp_path)
    os.remove(tmp_path / "omniglot" / "SHA256SUMS")
    p = tmp_path / "omniglot" / "images_evaluation.zip"
    with zipfile.ZipFile(p) as z:
        info = z.infolist()[5]
    data = bytearray(p.read_bytes())
    off = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    data[off] ^= 0xFF  # flip a byte inside the compressed data of one member
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="images_evaluation.zip"):
        check_archives(str(tmp_path / "omniglot"))


def test_missing_split_files_are_named(tmp_path, data_dir):
    _copy_data(data_dir, tmp_path)
    shutil.rmtree(tmp_path / "splits")
    with pytest.raises(DataError, match="omniglot_vinyals"):
        find_split_dir(str(tmp_path / "omniglot"))


def test_no_data_dir_is_a_clear_error(monkeypatch):
    c = get_config("mtl").data
    monkeypatch.delenv("MTL_GBML_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="MTL_GBML_DATA_DIR"):
        datasets.raw_data_dir(c)


def _tiny_archive(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _png(value=0):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((105, 105), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_unreadable_image_and_empty_class_are_named(tmp_path):
    from mtl_gbml.data.omniglot import OmniglotFewShot

    stem = "images_background"
    _tiny_archive(
        tmp_path / f"{stem}.zip",
        {
            f"{stem}/Alpha/character01/0001_01.png": _png(),
            f"{stem}/Alpha/character02/0002_01.png": b"this is not a png",
        },
    )
    builder = OmniglotFewShot(config="lake", data_dir=str(tmp_path / "tfds"))
    gen = builder._generate_examples(str(tmp_path), [(stem, "Alpha", "character01")])
    assert len(list(gen)) == 1  # a good image decodes
    gen = builder._generate_examples(str(tmp_path), [(stem, "Alpha", "character02")])
    with pytest.raises(DataError, match=r"unreadable image images_background.zip:.*0002_01.png"):
        list(gen)
    # a class the split names but whose directory holds no images
    gen = builder._generate_examples(str(tmp_path), [(stem, "Alpha", "character03")])
    with pytest.raises(DataError, match=r"no images for Alpha/character03"):
        list(gen)


def test_preprocess_inverts_and_resizes_to_28():
    """Omniglot's dark strokes on white become bright strokes on 0 (closed form on flat images);
    the prepared cache would hide a change here from the split tests until it is rebuilt."""
    from mtl_gbml.data.omniglot import preprocess_image

    white, black = np.full((105, 105), 255, np.uint8), np.zeros((105, 105), np.uint8)
    assert preprocess_image(white).shape == (28, 28, 1)
    assert preprocess_image(white).max() == 0 and preprocess_image(black).min() == 255
    bar = white.copy()
    bar[:, 45:60] = 0  # a vertical stroke through the middle
    out = preprocess_image(bar)[..., 0].astype(int)
    assert out[:, 13].min() > 200 and out[:, :8].max() == 0 and out[:, 20:].max() == 0


def test_a_split_the_protocol_lacks_is_refused(omniglot_config):
    lake = omniglot_config.copy_and_resolve_references()
    lake.protocol = "lake"
    with pytest.raises(ValueError, match="split 'val' does not exist for omniglot/lake"):
        datasets.load_arrays(lake, "val")
