"""The Python API's raw-image preprocessing: each dataset gets its own builder's function (the
end-to-end API test, on a trained run, is in test_train.py)."""

import numpy as np
import pytest

from mtl_gbml import api
from mtl_gbml.data import datasets

# stored image shapes of the datasets, as published (Omniglot 28x28 grayscale after Vinyals et
# al.; mini- and tiered-ImageNet 84x84; CIFAR-FS and FC100 CIFAR's 32x32)
SHAPES = {
    "omniglot": (28, 28, 1),
    "mini_imagenet": (84, 84, 3),
    "tiered_imagenet": (84, 84, 3),
    "cifar_fs": (32, 32, 3),
    "fc100": (32, 32, 3),
}


def test_every_dataset_has_its_builders_preprocessing():
    assert set(SHAPES) == {"omniglot", *datasets.BUILDERS}  # a new dataset needs an entry
    raw = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    for name, shape in SHAPES.items():
        prep = api._preprocessor(name)
        module = datasets._module(name) if name in datasets.BUILDERS else None
        if module is not None and hasattr(module, "preprocess_image"):
            assert prep is module.preprocess_image, name
        out = prep(raw)
        assert out.shape == shape and out.dtype == np.uint8, name


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="'mnist'"):
        api._preprocessor("mnist")


def test_a_raw_omniglot_file_reads_the_same_as_a_path_pil_image_or_bool_array(tmp_path, data_dir):
    """Omniglot's PNGs are 1-bit: as an array they are bools. The path, the PIL image and the
    bool array all give what the builder stored for that file; the same image as 0/1 numbers is
    refused instead of preprocessed to near black."""
    import os
    import zipfile

    from PIL import Image

    from mtl_gbml.data import omniglot

    archive = os.path.join(data_dir, "omniglot", "images_evaluation.zip")
    with zipfile.ZipFile(archive) as z:
        name = next(n for n in z.namelist() if n.endswith(".png"))
        data = z.read(name)
    path = tmp_path / "char.png"
    path.write_bytes(data)
    stored = omniglot._decode(data, name)  # what the builder keeps for this file
    pil = Image.open(path)
    assert pil.mode == "1"
    prep = api._preprocessor("omniglot")
    bools = np.asarray(pil)
    assert bools.dtype == bool
    for im in (str(path), path, pil, bools, bools.astype(np.uint8) * 255):
        np.testing.assert_array_equal(prep(api.raw_image(im)), stored)
    with pytest.raises(ValueError, match="only 0 and 1"):
        api.raw_image(bools.astype(np.uint8))
