"""Shared test set-up: data locations (real Omniglot from ../shared/data) and small helpers."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

if not os.environ.get("MTL_GBML_DATA_DIR") and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["MTL_GBML_DATA_DIR"] = str(ROOT.parent / "shared" / "data")
# prepared TFDS data: a cache inside the checkout unless the caller chose a place
os.environ.setdefault("TFDS_DATA_DIR", str(ROOT / ".cache" / "tfds"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_config(path: str, arg: str | None = None):
    """``get_config(arg)`` of a config file, as the CLI would load it (locked)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config


@pytest.fixture(scope="session")
def data_dir() -> str:
    d = os.environ.get("MTL_GBML_DATA_DIR", "")
    if not d or not os.path.isdir(os.path.join(d, "omniglot")):
        pytest.fail("MTL_GBML_DATA_DIR must name a directory holding omniglot/ and splits/")
    return d


@pytest.fixture(autouse=True, scope="module")
def _x64_per_module(request):
    """float64 only for test modules that declare ``X64 = True``: a module-level
    ``jax.config.update`` runs at collection, before any test, and would leak into every test.
    Module scope, autouse: pytest sets it up before the module's other module-scoped fixtures,
    so arrays those fixtures build are float64 too (a function-scoped switch came too late)."""
    import jax

    jax.config.update("jax_enable_x64", bool(getattr(request.module, "X64", False)))
    yield
    jax.config.update("jax_enable_x64", False)
