"""The six methods side by side on digits: run each recipe `digits-<method>` with
`python -m fastdmd.train` (DMD2 first: DrPO starts from its student), then tabulate the final
student's FD, class accuracy, rewards (classifier log-prob of the label, JPEG score) and wall time
against the teacher. Writes benchmarks/results/methods_digits.{json,md} and methods_digits_samples.png
(one panel per method: 8 samples of each digit from its final student, the same noise seed for all).

    python benchmarks/methods_digits.py                       # all methods, seed 0
    python benchmarks/methods_digits.py --methods dmd2 gndm --extra --trainer.steps 100
    python benchmarks/methods_digits.py --jobs 2 --extra --threads 1   # two runs at a time (2 cores)

With --jobs N the runs go N at a time (DMD2 first, alone or beside the others, since DrPO starts from
its student); each run's wall time is then measured while N - 1 others share the machine.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
import os
import platform
import shlex
import sys
from datetime import datetime, timezone

import torch

from _runs import run_training
from fastdmd.config import METHODS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_method(method: str, root: str, seed: int, extra: list[str]) -> dict:
    run_dir = os.path.join(root, method)
    cmd = [sys.executable, "-m", "fastdmd.train", "--recipe", f"digits-{method}", "--trainer.seed", str(seed),
           "--run_dir", run_dir, *extra]
    if method == "drpo":
        cmd += ["--model.init_generator", os.path.join(root, "dmd2")]
    wall, summary = run_training(cmd, run_dir, method)
    return {"method": method, "command": shlex.join(cmd), "wall_time_s": round(wall, 1), "summary": summary}


def table(runs: list[dict]) -> str:
    def row(name, r, wall="-"):
        rw = r.get("rewards", {})
        return (f"| {name} | {r['fd']:.4f} | {r['accuracy']:.3f} | {rw.get('classifier_log_prob', float('nan')):.3f} "
                f"| {rw.get('jpeg', float('nan')):.3f} | {wall} |")

    lines = ["| sampler | FD (lower is better) | class accuracy | log p(label) | JPEG score | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    samplers = runs[0]["summary"]["samplers"]
    names = list(samplers)
    for name in names[:2]:
        lines.append(row(name, samplers[name]))
    for run in runs:
        student = next(n for n in run["summary"]["samplers"] if n.startswith("student"))
        lines.append(row(f"{run['method']} ({student}, {run['summary']['steps']} steps)",
                         run["summary"]["samplers"][student], f"{run['wall_time_s']:.0f}"))
    lines.append(row(names[-1], samplers[names[-1]]))
    return "\n".join(lines)


def sample_grid(runs: list[dict], root: str, path: str, per_class: int = 8, seed: int = 0) -> None:
    """One panel per method, the same labels and noise seed, through fastdmd.generate's loader."""
    from fastdmd.generate import load_generator, sample
    from fastdmd.plot import save_grids

    panels = {}
    for run in runs:
        gen = load_generator(os.path.join(root, run["method"]))
        panels[run["method"]] = sample(gen, list(range(10)), per_class, list(gen.sigmas), seed)
    save_grids(panels, path, per_class=per_class)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-root", default="runs/methods")
    p.add_argument("--out", default=os.path.join(RESULTS, "methods_digits"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each run is its own process)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every fastdmd.train run")
    args = p.parse_args()
    methods = sorted(args.methods, key=lambda m: m != "dmd2")  # DrPO needs the DMD2 student first
    if "drpo" in methods and "dmd2" not in methods and not os.path.isdir(os.path.join(args.runs_root, "dmd2")):
        raise SystemExit(f"drpo starts from the DMD2 run {args.runs_root}/dmd2: include dmd2 in --methods")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        first = [m for m in methods if m != "drpo"]
        futures = {m: pool.submit(run_method, m, args.runs_root, args.seed, args.extra) for m in first}
        if "drpo" in methods:
            def drpo_after_dmd2() -> dict:  # DrPO starts from the DMD2 student: wait for it
                if "dmd2" in futures:
                    futures["dmd2"].result()
                return run_method("drpo", args.runs_root, args.seed, args.extra)
            futures["drpo"] = pool.submit(drpo_after_dmd2)
        runs = [futures[m].result() for m in methods]
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": shlex.join([sys.executable, *sys.argv]),
        "seed": args.seed,
        "jobs": args.jobs,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=2)
    text = (f"# The methods on digits, seed {args.seed}\n\n{record['date']}, {record['device']}, torch {record['torch']}; "
            f"command: `{record['command']}`\n\nEach row is the final (EMA) student of `python -m fastdmd.train "
            f"--recipe digits-<method>`, scored on 1,000 samples against the held-out digits; wall time is the "
            f"whole run including evaluation, {args.jobs} run(s) at a time.\n\n{table(runs)}\n")
    with open(args.out + ".md", "w") as f:
        f.write(text)
    sample_grid(runs, args.runs_root, args.out + "_samples.png")
    print(text)


if __name__ == "__main__":
    main()
