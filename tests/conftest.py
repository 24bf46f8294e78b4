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

# The suite is compile-bound: most tests compile a function and run it once on small shapes.
# XLA:CPU's LLVM optimisation level 0 compiles several times faster (the ResNet-12 bf16/remat
# test's compiles: 6.6-12.7 s each -> 1.3-2.0 s) and computes the same functions, so the pytest
# processes use it (the in-process test files: 449-492 s -> 263-288 s, README). The code it
# emits runs slower (that test's step: 0.02 -> 0.04 s), and processes the tests start (training
# runs, the notebook's kernel) run many steps and test the code as users run it, so
# `subprocess_env()` takes the flag back out. MTL_GBML_TEST_FULL_OPT=1 keeps XLA's default; an
# XLA_FLAGS that already sets the level wins.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
_ADDED = "_MTL_GBML_TEST_ADDED_XLA_FLAG"  # inherited by xdist workers, so they strip it too
_level_chosen = "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
if os.environ.get("MTL_GBML_TEST_FULL_OPT") != "1" and not _level_chosen:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()
    os.environ[_ADDED] = "1"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's, less the test-only XLA flag."""
    env = dict(os.environ)
    if env.pop(_ADDED, None):
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if f != TEST_XLA_FLAG]
        if flags:
            env["XLA_FLAGS"] = " ".join(flags)
        else:
            env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


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
