"""The default job's bar: run `python -m fastdmd.train` (recipe digits-dmd2) for several seeds, each as
its own process timed end to end, and check the student against the teacher at the same guidance g:

    student 4-step FD <= 1.5 x teacher many-step FD  and  <= 0.5 x teacher 4-step Euler FD

on the means over seeds of the final weights. Writes benchmarks/results/digits_dmd2.{json,md}.

    python benchmarks/digits_default.py                 # seeds 0 1 2
    python benchmarks/digits_default.py --seeds 0 --extra --trainer.steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone

import torch

from _runs import run_training

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs-root", default="runs/digits-bar")
    p.add_argument("--out", default=os.path.join(RESULTS, "digits_dmd2"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for fastdmd.train")
    args = p.parse_args()

    per_seed = []
    for seed in args.seeds:
        run_dir = os.path.join(args.runs_root, f"seed{seed}")
        cmd = [sys.executable, "-m", "fastdmd.train", "--trainer.seed", str(seed), "--run_dir", run_dir, *args.extra]
        wall, summary = run_training(cmd, run_dir, f"seed {seed}")
        per_seed.append({"seed": seed, "wall_time_s": round(wall, 1), "summary": summary})

    names = list(per_seed[0]["summary"]["samplers"])
    mean = {n: {k: sum(r["summary"]["samplers"][n][k] or 0.0 for r in per_seed) / len(per_seed)
                for k in ("fd", "accuracy", "samples_per_s")} for n in names}
    teacher_many, teacher_few, student = names[0], names[1], names[2]
    fd = {n: mean[n]["fd"] for n in names}
    bar = {
        "student_vs_teacher_many_step": {"ratio": fd[student] / fd[teacher_many], "limit": 1.5},
        "student_vs_teacher_4_step": {"ratio": fd[student] / fd[teacher_few], "limit": 0.5},
        "wall_time_s_max": {"value": max(r["wall_time_s"] for r in per_seed), "limit": 600},
    }
    for b in bar.values():
        b["met"] = (b.get("ratio", b.get("value")) <= b["limit"])
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "python": platform.python_version(),
        "guidance_scale": per_seed[0]["summary"]["guidance_scale"],
        "mean_over_seeds": mean, "bar": bar, "per_seed": per_seed,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=2)
    lines = [f"# digits-dmd2: the default job, mean of seeds {args.seeds}", "",
             f"{record['date']}, {record['device']}, torch {record['torch']}; command: `{record['command']}`", "",
             f"| sampler (g = {record['guidance_scale']}) | FD | class accuracy | samples/s |", "|---|---:|---:|---:|"]
    for n in names:
        speed = "-" if n.startswith("real") else f"{mean[n]['samples_per_s']:.0f}"
        lines.append(f"| {n} | {mean[n]['fd']:.4f} | {mean[n]['accuracy']:.3f} | {speed} |")
    lines += ["", "| check | value | limit | met |", "|---|---:|---:|---|"]
    for name, b in bar.items():
        lines.append(f"| {name} | {b.get('ratio', b.get('value')):.3f} | {b['limit']} | {'yes' if b['met'] else 'NO'} |")
    lines += ["", "| seed | student FD | teacher many-step FD | teacher 4-step FD | wall time (s) |", "|---:|---:|---:|---:|---:|"]
    for r in per_seed:
        s = r["summary"]["samplers"]
        lines.append(f"| {r['seed']} | {s[student]['fd']:.4f} | {s[teacher_many]['fd']:.4f} | {s[teacher_few]['fd']:.4f} | {r['wall_time_s']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
