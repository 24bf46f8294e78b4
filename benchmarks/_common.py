"""Shared pieces of the benchmarks: the workload, the real jitted train step, timing, the matmul
ceiling, and a worker run in a fresh subprocess per measurement (clean peak memory, own XLA flags).

Worker: ``python benchmarks/_common.py '<json spec>'`` prints one JSON line prefixed ``RESULT``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
WORKLOAD = {
    "name": "omniglot-20w1s",
    "image": "1x28x28",
    "backbone": "Conv4 width 64",
    "ways": 20,
    "shots": 1,
    "queries": 15,
    "tasks_per_step": 16,
}
ALGORITHMS = (
    "mtl",
    "protonet",
    "r2d2",
    "metaoptnet",
    "anil",
    "fomaml",
    "maml",
    "imaml",
    "minibatchprox",
)


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("MTL_GBML_DATA_DIR", "/work/shared/data")
    e.setdefault("TFDS_DATA_DIR", "/tmp/tfds")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def load_config(algorithm: str, variant: str | None = None):
    """The shipped Omniglot config of ``algorithm`` (configs/omniglot/<algorithm>.py)."""
    name = "mtl" if algorithm == "supervised" else algorithm
    path = os.path.join(ROOT, "configs", "omniglot", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def other_processes(min_cpu: float = 10.0) -> list[str]:
    """Other processes using CPU now (ps %CPU >= min_cpu): what else ran during a measurement."""
    out = subprocess.run(
        ["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True
    ).stdout.splitlines()[1:]
    me = {os.getpid(), os.getppid()}
    rows = []
    for line in out:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) in me or float(parts[1]) < min_cpu:
            continue
        if "ps -eo" in parts[3]:
            continue
        rows.append(f"pid {parts[0]} {parts[1]}% cpu: {parts[3][:140]}")
    return rows


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def matmul_gflops(n: int = 2048, reps: int = 10) -> tuple[float, float]:
    """float32 n x n matmul throughput (median of ``reps``), the machine's practical ceiling:
    (by wall time, by process CPU time / cores)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    flop = 2 * n**3 / 1e9
    return flop / float(np.median(ts)), flop / (float(np.median(cs)) / CORES)


CORES = os.cpu_count() or 1


def supervised_algorithm(model, num_classes: int):
    """The floor: the same backbone, one linear head over all training classes, plain softmax
    cross-entropy over every image of the step (no tasks, no inner loop)."""
    import jax
    import jax.numpy as jnp

    from mtl_gbml import models
    from mtl_gbml.algorithms.base import (
        Algorithm,
        accuracy,
        cross_entropy,
        flatten_tasks,
        merge_support_query,
    )

    def init(rng, example_tasks):
        x = example_tasks.support_x[0]
        params, state = models.init(model, rng, x)
        dim = models.forward(model, params, state, x, train=False)[0].shape[-1]
        head = jax.random.normal(rng, (num_classes, dim)) / jnp.sqrt(dim)
        return {"backbone": params, "head": head}, state

    def meta_loss(params, state, tasks, rng):
        x, y = merge_support_query(tasks)
        labels = jnp.take_along_axis(tasks.class_ids, y, axis=1).reshape(-1)  # global class ids
        feats, new_state = models.forward(
            model, params["backbone"], state, flatten_tasks(x), train=True, rng=rng
        )
        logits = feats @ params["head"].T
        return cross_entropy(logits, labels), (new_state, {"accuracy": accuracy(logits, labels)})

    return Algorithm("supervised", init, meta_loss, None, False)


def workload_config(algorithm: str, overrides: dict | None = None, shots: int = 1):
    c = load_config(algorithm)
    c.data.ways, c.data.shots, c.data.queries = 20, shots, 15
    c.data.tasks_per_step = 16
    for k, v in (overrides or {}).items():
        sec, key = k.split(".")
        c[sec][key] = v
    return c


def build_step(config, algorithm_name: str):
    """(compiled step, train state, pool, key) with the real ``make_train_step`` on real data."""
    import jax

    from mtl_gbml import algorithms, models, optim
    from mtl_gbml.data import datasets
    from mtl_gbml.data.sampler import prepare_tasks, sample_tasks
    from mtl_gbml.train import initial_state, make_mesh, make_train_step

    mesh = make_mesh()
    pool = jax.device_put(datasets.load_pool(config.data, "train"))
    model = models.build(config.model)
    if algorithm_name == "supervised":
        algorithm = supervised_algorithm(model, pool.num_classes)
    else:
        algorithm = algorithms.build(config.algorithm, model, config, pool.num_classes)
    tx = optim.make(config.optimizer, config.train.steps)
    key = jax.random.PRNGKey(0)
    d = config.data
    example = prepare_tasks(sample_tasks(pool, key, d.ways, d.shots, d.queries, 1), key, "none", 0)
    params, model_state = algorithm.init(key, example)
    ts = initial_state(params, model_state, tx.init(params))
    step = make_train_step(algorithm, tx, config, mesh)
    return step, ts, pool, key


def cost_gflop(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan"))) / 1e9


def static_memory_mb(compiled) -> float:
    """XLA's buffer assignment: arguments + outputs + temporaries - donated aliases (MB)."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    b = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return b / 2**20


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_step(spec: dict) -> dict:
    """Compile the train step of ``spec`` and time it: median over repeated steps after a warm-up."""
    import jax
    import numpy as np

    algorithm = spec["algorithm"]
    config = workload_config(algorithm, spec.get("overrides"), spec.get("shots", 1))
    step, ts, pool, key = build_step(config, algorithm)
    jax.block_until_ready((ts, pool))
    rss0 = rss_mb()
    t0 = time.perf_counter()
    compiled = step.lower(ts, pool, key).compile()
    compile_s = time.perf_counter() - t0
    ts = compiled(ts, pool, key)  # warm-up
    jax.block_until_ready(ts)
    times, cpu = [], []
    t_start = time.perf_counter()
    while len(times) < spec.get("max_steps", 5) and (
        len(times) < spec.get("min_steps", 2)
        or time.perf_counter() - t_start < spec.get("budget_s", 60)
    ):
        t, c = time.perf_counter(), time.process_time()
        ts = compiled(ts, pool, key)
        jax.block_until_ready(ts)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    gflop_own = cost_gflop(compiled)
    gflop = gflop_own
    from mtl_gbml.models import resolve_chunk_first

    chunked = resolve_chunk_first(config.model.get("chunk_first", 0)) > 0
    if config.model.name == "conv4" and chunked:
        # XLA's cost analysis counts a while loop's body once, not once per trip: the chunked
        # first block's FLOPs would be undercounted. Count the same function unchunked.
        plain = copy.deepcopy(config)
        plain.model.chunk_first = 0
        step0, ts0, pool0, key0 = build_step(plain, algorithm)
        gflop = cost_gflop(step0.lower(ts0, pool0, key0).compile())
        del step0, ts0, pool0
    step_s = float(np.median(times))
    cpu_s = float(np.median(cpu))
    return {
        "step_ms": 1e3 * step_s,
        "step_ms_all": [round(1e3 * t, 1) for t in times],
        # CPU time of the process (all threads) per step / cores: what the step would take alone
        # on this machine if it got every core; robust to other processes sharing the CPU
        "step_cpu_ms": 1e3 * cpu_s / CORES,
        "step_cpu_ms_all": [round(1e3 * c / CORES, 1) for c in cpu],
        "gflops_cpu": gflop / (cpu_s / CORES),
        "peak_mb": static_memory_mb(compiled),
        "rss_peak_delta_mb": peak_rss_mb() - rss0,
        "gflop": gflop,  # of the step's function (unchunked: see above)
        "gflop_xla_cost_analysis": gflop_own,
        "gflops": gflop / step_s,
        "compile_s": compile_s,
        "images_per_step": config.data.tasks_per_step * 20 * (config.data.shots + 15),
        "pool_last": bool(config.model.pool_last),
        "model": {
            k: config.model[k]
            for k in ("conv_impl", "block", "chunk_first", "dtype")
            if k in config.model
        },
        "finite": bool(np.isfinite(float(ts.loss_sum))),
    }


def layer_times(spec: dict) -> dict:
    """Per-block forward and gradient times of Conv4 (training mode) at batch ``spec['batch']``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mtl_gbml.models.conv4 import (
        Conv3x3,
        FusedBatchNormReluPool,
        chunked_first_block,
        max_pool_2x2,
    )

    class Block(nn.Module):
        impl: str
        block: str
        pool: bool = True

        @nn.compact
        def __call__(self, x):
            if self.block.startswith("chunk"):  # 'chunk64': the chunked first block
                kernel, bias = Conv3x3(64, impl="params")(x)
                return FusedBatchNormReluPool(use_running_average=False, features=64)(
                    None, lambda s: chunked_first_block(x, kernel, bias, s, int(self.block[5:]))
                )
            x = Conv3x3(64, impl=self.impl)(x)
            if self.block == "fused":
                return FusedBatchNormReluPool(use_running_average=False, pool=self.pool)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)(x))
            return max_pool_2x2(x) if self.pool else x

    def timed(f, *args, reps=3):  # ms by process CPU time / cores (robust to sharing)
        jax.block_until_ready(f(*args))
        cs = []
        for _ in range(reps):
            c = time.process_time()
            jax.block_until_ready(f(*args))
            cs.append(time.process_time() - c)
        return 1e3 * float(np.median(cs)) / CORES

    b = spec.get("batch", 5120)
    shapes = [(28, 1), (14, 64), (7, 64), (3, 64)]
    out = {}
    for i, (hw, cin) in enumerate(shapes):
        x = jax.random.normal(jax.random.PRNGKey(i), (b, hw, hw, cin))
        for impl, block in spec["variants"]:
            if block.startswith("chunk") and cin != 1:
                continue
            m = Block(impl, block)
            v = m.init(jax.random.PRNGKey(0), x)
            params, state = v["params"], {"batch_stats": v["batch_stats"]}

            def fwd(p, x, m=m, state=state):
                return m.apply({"params": p, **state}, x, mutable=["batch_stats"])[0]

            def loss(p, x, fwd=fwd):
                return jnp.sum(fwd(p, x) * 1e-3)

            wrt = (0,) if i == 0 else (0, 1)  # the first block needs no input gradient
            f_fwd = jax.jit(fwd)
            f_grad = jax.jit(jax.grad(loss, argnums=wrt))
            flop = cost_gflop(f_grad.lower(params, x).compile())
            if block.startswith("chunk"):  # XLA counts the loop body once: the fused block's count
                flop = out.get(f"block{i + 1} xla/fused", {}).get("grad_gflop", float("nan"))
            out[f"block{i + 1} {impl}/{block}"] = {
                "input": [b, hw, hw, cin],
                "fwd_ms": timed(f_fwd, params, x),
                "grad_ms": timed(f_grad, params, x),
                "grad_gflop": flop,
            }
    return out


def run_worker(spec: dict, xla_flags: str = "", timeout: int = 1800) -> dict:
    """``time_step(spec)`` (or another worker mode) in a fresh Python process."""
    e = env()
    if xla_flags:
        e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-2000:]}


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, e.g. 'AMD EPYC (family 26, model 2), 2 cores, avx512'.
    This project's machine has changed host between sessions (Intel and AMD), and every ratio
    depends on it, so each benchmark's markdown names it."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    flags = info.get("flags", "").split()
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    amx = ", amx" if "amx_tile" in flags else ""
    return (
        f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, "
        f"model {info.get('model', '?')}), {os.cpu_count()} cores, {simd}{amx}"
    )


def write_md(name: str, lines: list[str]) -> str:
    """Write benchmarks/results/<name>.md; the line after the title names the CPU."""
    lines = list(lines)
    title = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), None)
    if title is not None:
        lines[title + 1 : title + 1] = ["", f"CPU: {cpu_model()}."]
    path = os.path.join(RESULTS, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def write_json(name: str, obj) -> str:
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def _main() -> None:
    spec = json.loads(sys.argv[1])
    mode = spec.get("mode", "step")
    if mode == "step":
        out = time_step(spec)
    elif mode == "layers":
        out = layer_times(spec)
    elif mode == "matmul":
        wall, cpu = matmul_gflops()
        out = {"matmul_gflops": wall, "matmul_gflops_cpu": cpu}
    else:
        raise ValueError(f"unknown worker mode {mode!r}")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _main()


def matmul_ceiling(ceiling: list[dict]) -> tuple[float, float]:
    """Mean matmul GFLOP/s (wall, CPU) of the ceiling workers run before and after a table; a
    failed worker stops the report with its error instead of a KeyError."""
    for c in ceiling:
        if "matmul_gflops" not in c:
            raise SystemExit(f"the float32 matmul ceiling worker failed:\n{c.get('error', c)}")
    n = len(ceiling)
    return (
        sum(c["matmul_gflops"] for c in ceiling) / n,
        sum(c["matmul_gflops_cpu"] for c in ceiling) / n,
    )
