"""Python API: ``FewShotLearner.from_workdir(dir).predict(support_images, support_labels, query_images)``.

Images are uint8 (or bool) arrays [H, W] or [H, W, C] of any size, PIL images or file paths, as the
raw dataset has them; they are preprocessed exactly as the dataset builder preprocessed the
training images.

A run with transductive BatchNorm (``model.bn_mode='transductive'``) normalises with the
statistics of the images of the call, so a query's prediction depends on the other queries
passed with it (as in the published transductive evaluations); pass a test episode's queries
together. Inductive runs predict each query on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_gbml.data.sampler import to_float
from mtl_gbml.run_loading import LoadedRun, load_run

_PREPROCESSORS = {
    "omniglot": "mtl_gbml.data.omniglot",
    "mini_imagenet": "mtl_gbml.data.mini_imagenet",
    "tiered_imagenet": "mtl_gbml.data.tiered_imagenet",
    "cifar_fs": "mtl_gbml.data.cifar100",
    "fc100": "mtl_gbml.data.cifar100",
}


def _preprocessor(dataset: str):
    """The dataset builder's own raw-image preprocessing (one source for training and the API)."""
    import importlib

    if dataset not in _PREPROCESSORS:
        raise ValueError(f"no raw-image preprocessing known for dataset {dataset!r}")
    return importlib.import_module(_PREPROCESSORS[dataset]).preprocess_image


def raw_image(im):
    """One image as the dataset's preprocessing takes it: a PIL image as it is (the raw files'
    own modes: Omniglot's PNGs are 1-bit, which an array would turn into bools or 0/1), a path
    opened with PIL, a bool array as 0/255, any other array as uint8. A uint8 array holding only
    0 and 1 is refused: it is a 1-bit image read as numbers, and would be preprocessed as almost
    black."""
    import os

    from PIL import Image

    if isinstance(im, (str, os.PathLike)):
        with Image.open(im) as f:
            f.load()
            return f.copy()
    if isinstance(im, Image.Image):
        return im
    arr = np.asarray(im)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8 and arr.size and arr.max() == 1:
        raise ValueError(
            "a uint8 image holding only 0 and 1 (a 1-bit image read as numbers): pass the PIL "
            "image or its path, a bool array, or the values scaled to 0..255"
        )
    return arr


class FewShotLearner:
    """Adapts a trained model to a new task from its support set, with the algorithm's own rule."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self._prep = _preprocessor(run.config.data.name)
        self._fns: dict[int, object] = {}

    @classmethod
    def from_workdir(cls, workdir: str, use_best: bool | None = None) -> FewShotLearner:
        return cls(load_run(workdir, use_best))

    def _images(self, images) -> jax.Array:
        arr = [self._prep(raw_image(im)) for im in images]
        return to_float(jnp.asarray(np.stack(arr)))

    def logits(self, support_images, support_labels, query_images) -> np.ndarray:
        """Scores [num_query, num_classes]; columns follow ``np.unique(support_labels)``."""
        labels = np.asarray(support_labels)
        classes, y = np.unique(labels, return_inverse=True)
        ways = len(classes)
        if ways < 2:
            raise ValueError("the support set needs at least two classes")
        if ways not in self._fns:
            r = self.run
            self._fns[ways] = jax.jit(
                lambda sx, sy, qx: r.algorithm.adapt_and_predict(
                    r.params, r.state, sx, sy, qx, ways, jax.random.PRNGKey(0)
                )
            )
        out = self._fns[ways](
            self._images(support_images), jnp.asarray(y, jnp.int32), self._images(query_images)
        )
        return np.asarray(out)

    def predict(self, support_images, support_labels, query_images) -> np.ndarray:
        """Predicted labels of the query images, in the label values of ``support_labels``."""
        classes = np.unique(np.asarray(support_labels))
        return classes[self.logits(support_images, support_labels, query_images).argmax(-1)]
