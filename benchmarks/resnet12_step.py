"""Time one MTL training step of the official ResNet-12 recipe per dataset config, on this machine.

    nice -n 15 python benchmarks/resnet12_step.py [--configs mini_imagenet:5shot,...] [--steps 2]

Each config's own step (sampling from a device-resident pool, crop/flip/jitter augmentation, the
full-width ResNet-12 forward and backward over all its tasks' images, RAdam update) runs on fake
uint8 data of the dataset's image size and class count (the timing does not depend on the pixels).
A step over more than ``--max_images`` images (memory on a small CPU machine) is timed with fewer
tasks (or, for one task over the limit, fewer queries per class) and scaled linearly in the
number of images to the recipe's step; the output says which.
Writes ``benchmarks/results/datasets/resnet12_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtl_gbml import algorithms, models, optim
from mtl_gbml.data.sampler import make_pool, prepare_tasks, sample_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "datasets")
IMAGE_SIZE = {"mini_imagenet": 84, "tiered_imagenet": 84, "cifar_fs": 32, "fc100": 32}
CLASSES = {"mini_imagenet": 64, "tiered_imagenet": 351, "cifar_fs": 64, "fc100": 60}
ALL = [f"{d}:{s}" for d in IMAGE_SIZE for s in ("5shot", "1shot")]


def load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(
        "cfg", os.path.join(ROOT, "configs", name, "mtl.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def time_config(name: str, arg: str, steps: int, max_images: int) -> dict:
    c = load_config(name, arg)
    d = c.data
    per_task = d.ways * (d.shots + d.queries)
    tasks = d.tasks_per_step
    timed_tasks = max(1, min(tasks, max_images // per_task))
    # one task over the limit (tiered-ImageNet: 200 images): time fewer queries per class
    timed_queries = d.queries
    if per_task > max_images:
        timed_queries = max(1, max_images // d.ways - d.shots)
    timed_per_task = d.ways * (d.shots + timed_queries)
    size, num_classes = IMAGE_SIZE[name], CLASSES[name]
    per_class = d.shots + d.queries
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    pool = make_pool(images, labels)
    model = models.build(c.model)
    alg = algorithms.build("mtl", model, c, num_classes)
    tx = optim.make(c.optimizer, c.train.steps)
    key = jax.random.PRNGKey(0)
    example = prepare_tasks(sample_tasks(pool, key, d.ways, d.shots, d.queries, 1), key, "none", 0)
    params, state = alg.init(key, example)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, state, opt_state, k):
        k1, k2, k3 = jax.random.split(k, 3)
        t = sample_tasks(pool, k1, d.ways, d.shots, timed_queries, timed_tasks)
        t = prepare_tasks(t, k2, d.augment, d.shift)
        (loss, (state, _)), g = jax.value_and_grad(alg.meta_loss, has_aux=True)(
            params, state, t, k3
        )
        updates, opt_state = tx.update(g, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), state, opt_state, loss

    t0 = time.perf_counter()
    params, state, opt_state, loss = step(params, state, opt_state, key)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0  # compile + one step
    times, cpu = [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        params, state, opt_state, loss = step(params, state, opt_state, jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    step_s, cpu_s = float(np.median(times)), float(np.median(cpu))
    scale = tasks * per_task / (timed_tasks * timed_per_task)  # linear in images
    return {
        "config": f"configs/{name}/mtl.py:{arg}",
        "image_size": size,
        "tasks_per_step": tasks,
        "images_per_step": tasks * per_task,
        "timed_tasks": timed_tasks,
        "timed_images": timed_tasks * timed_per_task,
        "first_call_s": round(first, 2),
        "step_s_measured": round(step_s, 3),
        "step_s": round(step_s * scale, 3),
        "step_cpu_s_measured": round(cpu_s, 3),
        "step_cpu_s": round(cpu_s * scale, 3),
        "extrapolated": timed_tasks * timed_per_task != tasks * per_task,
        "steps_timed": steps,
        "loss_finite": bool(np.isfinite(float(loss))),
        "steps_per_epoch": c.train.eval_every,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def write(rows: list[dict], env: dict) -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "resnet12_step.json"), "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=2)
    lines = [
        "# One MTL training step, ResNet-12 (64-160-320-640), official recipe, CPU",
        "",
        f"Machine: {env['machine']}; {env['cpus']} CPUs; jax {env['jax']} on {env['backend']}. "
        "The machine was shared with long training runs (1-minute load average in the table, on "
        "2 cores) and this ran under `nice -n 15`, so wall times are several times an idle "
        "machine's; the CPU seconds the step consumed (process time, both cores' threads "
        "summed) depend much less on the load and are the number to compare. Each row's command "
        "is in resnet12_step.json. A step timed on fewer images than the recipe's (memory: fewer "
        "tasks, or fewer queries per class) is scaled linearly in images to the recipe's step.",
        "",
        "| config | image | tasks/step | images/step | step, CPU s (all threads) | step, wall s "
        "| first call incl. compile, wall s | CPU-hours per 1600-task epoch | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" (timed {r['timed_images']} images, scaled)" if r["extrapolated"] else ""
        epoch_h = r["step_cpu_s"] * r["steps_per_epoch"] / 3600
        lines.append(
            f"| `{r['config']}` | {r['image_size']}x{r['image_size']} | {r['tasks_per_step']} | "
            f"{r['images_per_step']} | {r['step_cpu_s']:.1f}{note} | {r['step_s']:.1f} | "
            f"{r['first_call_s']:.0f} | {epoch_h:.1f} | {r.get('load_avg_1min', '')} |"
        )
    lines.append("")
    with open(os.path.join(OUT, "resnet12_step.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(ALL), help="dataset:variant,...")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the first call")
    p.add_argument("--max_images", type=int, default=200, help="images per timed step, at most")
    p.add_argument("--append", action="store_true", help="keep other configs' rows in the json")
    p.add_argument("--md_only", action="store_true", help="rewrite the .md from the .json")
    args = p.parse_args()
    if args.md_only:
        d = json.load(open(os.path.join(OUT, "resnet12_step.json")))
        write(d["results"], d["environment"])
        return
    env = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "load_start": round(os.getloadavg()[0], 2),
        "command": "nice -n 15 python benchmarks/resnet12_step.py "
        f"--steps {args.steps} --max_images {args.max_images}",
    }
    rows, path = [], os.path.join(OUT, "resnet12_step.json")
    if args.append and os.path.exists(path):
        rows = json.load(open(path))["results"]
    for item in args.configs.split(","):
        name, arg = item.split(":")
        r = time_config(name, arg, args.steps, args.max_images)
        print(json.dumps(r), flush=True)
        r["command"] = (
            f"nice -n 15 python benchmarks/resnet12_step.py --configs {item} "
            f"--steps {args.steps} --max_images {args.max_images}"
        )
        rows = [x for x in rows if x["config"] != r["config"]] + [r]
        rows.sort(
            key=lambda x: ALL.index(x["config"].split("/")[1] + ":" + x["config"].split(":")[1])
        )
        env["load_end"] = round(os.getloadavg()[0], 2)
        write(rows, env)  # keep what is measured even if a later config fails


if __name__ == "__main__":
    main()
