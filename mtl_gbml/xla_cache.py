"""A guard against JAX's persistent compilation cache on CPU, which returns wrong results here.

With jax/jaxlib 0.5.3 (the pinned stack, ../shared/docs/DESIGN.md), an XLA:CPU executable loaded
from the persistent compilation cache (``JAX_COMPILATION_CACHE_DIR`` /
``jax_compilation_cache_dir``) runs its ``lax.while_loop`` zero times: the evaluator's
logistic-regression fit returns its initial zeros and takes 0 steps, so every episode is at chance
(found when the test suite ran with a shared cache: a rerun's 5w1s accuracy was exactly 20.00%;
``tests/test_xla_cache.py`` reproduces the cached fit). In the same check a cached runlocal
training run still reached the uncached run's parameters, but training programs hold loops too
(the chunked first block, MAML's inner steps), so nothing loaded from the cache is trusted: the
entry points (``train.train_and_evaluate``, ``run_loading.load_run``) call ``guard`` before they
compile anything, and on CPU it turns the cache off for the process and says so.
"""

from __future__ import annotations

import warnings

import jax


def guard() -> bool:
    """Turn JAX's persistent compilation cache off when the backend is CPU and a cache directory is
    set; returns whether it did (with a ``RuntimeWarning`` naming the reason and the variable)."""
    if not jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return False
    if jax.default_backend() != "cpu":
        return False
    from jax._src import compilation_cache  # reset_cache has no public alias in jax 0.5.3

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # forget whether the cache was in use; it is not from now on
    warnings.warn(
        "JAX's persistent compilation cache is set (jax_compilation_cache_dir="
        f"{jax.config.jax_compilation_cache_dir!r}) but turned off for this run: on CPU with jax "
        "0.5.3, a program loaded from it runs its while loops zero times (wrong results, see "
        "mtl_gbml/xla_cache.py); unset JAX_COMPILATION_CACHE_DIR to silence this",
        RuntimeWarning,
        stacklevel=2,
    )
    return True
