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
