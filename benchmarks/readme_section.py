"""Assemble benchmarks/results/README_SECTION.md (the README's "Performance" section) from the
benchmark markdown files in benchmarks/results/, and put it in README.md in place of the section
there (from "## Performance" to the next "## " heading).

python benchmarks/readme_section.py [--no_readme]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

PARTS = [
    ("fast_backbone", "A fast Conv4 on CPU", "python benchmarks/fast_backbone.py"),
    (
        "step_cost",
        "Step cost: every algorithm against the supervised floor",
        "python benchmarks/step_cost.py",
    ),
    ("eval_throughput", "Evaluation throughput", "python benchmarks/eval_throughput.py"),
    (
        "eval_throughput_20w1s",
        "Evaluation throughput at 20-way 1-shot",
        "python benchmarks/eval_throughput.py --setting 20w1s --name eval_throughput_20w1s",
    ),
    (
        "metaoptnet_solver",
        "MetaOptNet's dual solver: tolerance stop against fixed steps",
        "python benchmarks/metaoptnet_solver.py",
    ),
    (
        "time_to_accuracy",
        "Time to accuracy",
        "python benchmarks/time_to_accuracy.py --budget_s 3600 --parallel 2",
    ),
]


def demote(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("# "):
            continue  # the part's own title is replaced by ours
        out.append("#" + line if line.startswith("#") else line)
    return out


def splice(readme: str, section: str) -> str:
    """``readme`` with its "## Performance" section (up to the next level-2 heading) replaced by
    ``section``."""
    start = readme.find("\n## Performance\n")
    if start < 0:
        raise SystemExit("README.md has no '## Performance' section to replace")
    end = readme.find("\n## ", start + 1)
    end = len(readme) if end < 0 else end
    return readme[: start + 1] + section.rstrip("\n") + "\n" + readme[end:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no_readme", action="store_true", help="write README_SECTION.md only")
    args = ap.parse_args()
    md = [
        "## Performance",
        "",
        "All numbers below were measured on this project's 2-core CPU machine. Its host has "
        "changed between sessions, and every ratio depends on the CPU, so each table's `CPU:` line "
        "names the one it ran on (findings from earlier hosts, such as an Intel Xeon, family 6 "
        "model 207, with AVX-512 and AMX-BF16, say so). The machine is shared, and its speed "
        "drifts by tens of percent within an hour, so each table quotes medians and ratios "
        "measured side by side in one run, and says what else was running; a ratio against a "
        "number from another run is not one. Every table starts with the command that "
        "produced it; the JSON next to each markdown file in `benchmarks/results/` has the raw "
        "numbers.",
        "",
    ]
    for name, title, cmd in PARTS:
        md += [f"### {title}", ""]
        path = os.path.join(C.RESULTS, f"{name}.md")
        if not os.path.exists(path):
            md += [f"Not measured yet: run `{cmd}`.", ""]
            continue
        lines = open(path).read().splitlines()
        lines = [
            ln.replace("](time_to_accuracy.png)", "](benchmarks/results/time_to_accuracy.png)")
            for ln in lines
        ]
        md += ["#" + ln if ln.startswith("## ") else ln for ln in demote(lines)]
        md.append("")
    path = C.write_md("README_SECTION", md)
    if not args.no_readme:
        readme = os.path.join(C.ROOT, "README.md")
        with open(readme) as f:
            text = f.read()
        with open(path) as f:
            text = splice(text, f.read())
        with open(readme, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
