"""What the op benchmarks (benchmarks/bench_<op>.py) share: command line, timing, copy bandwidth,
environment and result files.

Every bench_<op>.py takes --small / --full (default: full with CUDA, small without) and --out DIR
(default benchmarks/results), so benchmarks/gpu_suite.sh can run them all the same way. Each one
times, on the same inputs in one process, the PyTorch reference in eager mode, the reference under
torch.compile, and the Triton kernel; reports the median time, the achieved GB/s on the bytes the
op must move (formula in each script), and the ratio of that to the copy bandwidth measured in the
same run (dst.copy_(src) of a large tensor, counted as read + write). Results go to
<out>/<op>_<device>.json and .csv with the device name, versions, date and command line.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLEMENTATIONS = ("reference_eager", "reference_compiled", "triton")
ALL_GRAPHABLE = frozenset(IMPLEMENTATIONS)
# Interpreter timings measure Python, not the kernel: on CPU the Triton rows are skipped.
TRITON_ON_CPU_NOTE = ("triton: skipped on CPU (the Triton interpreter's timings are meaningless; "
                      "run on a CUDA device for kernel timings)")


def parse_args(doc: str) -> argparse.Namespace:
    """The benchmarks' shared options; --help describes the benchmark by its module docstring's first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help="small shapes, seconds on CPU (default without CUDA)")
    size.add_argument("--full", dest="small", action="store_false",
                      help="the real shapes (default with CUDA)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for .json and .csv")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median)")
    args = parser.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.small is None:
        args.small = args.device.type != "cuda"
    if args.device.type == "cpu":
        # One thread: on a shared CPU, OpenMP regions that wait for a descheduled thread turn
        # microseconds into milliseconds; one thread gives stable numbers.
        torch.set_num_threads(1)
    if args.repeats is None:
        args.repeats = 10 if args.small else 50
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 3,
                   min_sample_seconds: float = 1e-3) -> float:
    """Median over `repeats` samples of the time of one call, with warm-up and synchronization.

    Each sample runs the call enough times back to back to last at least `min_sample_seconds`,
    so that microsecond ops are not measured at the resolution of the clock.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    calls = max(1, int(min_sample_seconds / max(time.perf_counter() - start, 1e-9)))
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of dst.copy_(src) for a tensor of `nbytes`, counting its read and its write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=20)
    return 2 * src.numel() * 4 / seconds / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    return models[0].strip() if models else platform.processor() or "cpu"


def environment(device: torch.device, copy_gbs: float) -> dict:
    import triton

    return dict(
        device=device_name(device), device_type=device.type, torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu_threads=torch.get_num_threads(), command=shlex.join([sys.executable, *sys.argv]),
        copy_bandwidth_gbs=round(copy_gbs, 1))


def reference_compiled(fn):
    """torch.compile of a reference with static shapes; graph breaks are allowed (only the kernels
    must avoid them). One graph per shape, dtype and grad mode: the recompile limit is raised so
    that none of them silently falls back to eager."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    return torch.compile(fn, dynamic=False)


def cuda_graphed(fn):
    """fn captured once in a CUDA graph, returned as its replay: times the GPU work alone, without
    the Python and launch overhead of an eager call (what a captured training step pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(make_fn, device: torch.device, repeats: int, nbytes: int, copy_gbs: float) -> dict:
    """One result row: median time, GB/s on `nbytes`, fraction of the copy bandwidth; or the error
    (a variant that fails, e.g. a CUDA-graph capture of an op that synchronizes, is a result too)."""
    try:
        seconds = median_seconds(make_fn(), device, repeats)
    except Exception as error:
        return dict(median_us=None, gbs=None, fraction_of_copy=None,
                    error=f"{type(error).__name__}: {error}".splitlines()[0][:200])
    gbs = nbytes / seconds / 1e9
    return dict(median_us=round(seconds * 1e6, 2), gbs=round(gbs, 1),
                fraction_of_copy=round(gbs / copy_gbs, 3), error="")


def write_results(op: str, device: torch.device, env: dict, rows: list[dict], out_dir: Path,
                  notes: list[str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    # <op>_cpu, or <op>_cuda_<gpu name> (e.g. dmd_target_cuda_nvidia_h100_80gb_hbm3)
    name = "cpu" if device.type == "cpu" else f"cuda {env['device']}"
    stem = out_dir / f"{op}_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}"
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(dict(op=op, environment=env, notes=notes, rows=rows), indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), *env.keys()])
        writer.writeheader()
        writer.writerows(row | env for row in rows)
    return [json_path, csv_path]


def run_benchmark(args: argparse.Namespace, reference_fn, cases, notes: list[str],
                  kernel_variants: dict | None = None) -> None:
    """Time every case with each implementation of the op, print the table and write the files.

    `reference_fn` is the op's reference in fastdmd.ops.reference; the kernel is the function of
    the same name in fastdmd.ops.<op>_triton (CUDA only). `cases` yields (fields, call, nbytes,
    graphable): the row's descriptive columns, call(impl) -> a zero-argument function running one
    step with that implementation, the bytes the op must move, and the implementation names that
    a CUDA graph can capture (not those that synchronize with the host). Cases are generated one
    at a time, so only one case's inputs are alive. `kernel_variants` (CUDA only) adds rows for
    other settings of the kernel: name -> function of the kernel returning the variant.
    """
    op, device = reference_fn.__name__, args.device
    copy_gbs = copy_bandwidth(device, (128 if args.small else 1024) * 2**20)
    env = environment(device, copy_gbs)
    impls = dict(zip(IMPLEMENTATIONS[:2], (reference_fn, reference_compiled(reference_fn))))
    if device.type == "cuda":
        impls["triton"] = getattr(importlib.import_module(f"fastdmd.ops.{op}_triton"), op)
        impls |= {name: make(impls["triton"]) for name, make in (kernel_variants or {}).items()}
    else:
        notes = [*notes, TRITON_ON_CPU_NOTE]
    # On CUDA each implementation is timed as called (eager launches) and replayed from a CUDA graph.
    graph_modes = (False, True) if device.type == "cuda" else (False,)
    rows = []
    for fields, call, nbytes, graphable in cases:
        for name, impl in impls.items():
            for graphed in graph_modes:
                row = dict(**fields, impl=name, cuda_graph=graphed, bytes=nbytes)
                if graphed and name not in graphable:
                    # A failed capture can leave the CUDA context unusable: do not try.
                    rows.append(row | dict(median_us=None, gbs=None, fraction_of_copy=None,
                                           error="not capturable: synchronizes with the host"))
                    continue

                def make_fn(impl=impl, graphed=graphed):
                    return cuda_graphed(call(impl)) if graphed else call(impl)

                rows.append(row | measure(make_fn, device, args.repeats, nbytes, copy_gbs))
        # After every case, so that a run stopped by a time limit keeps what it measured.
        write_results(op, device, env, rows, args.out, notes)
    report(op, device, env, rows, args.out, notes)


def report(op: str, device: torch.device, env: dict, rows: list[dict], out_dir: Path,
           notes: list[str]) -> None:
    """Print the environment, the notes and the rows as a table, then write the result files."""
    print(f"# {op} on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"copy bandwidth {env['copy_bandwidth_gbs']} GB/s")
    for note in notes:
        print(f"# {note}")
    columns = list(rows[0].keys())
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    for path in write_results(op, device, env, rows, out_dir, notes):
        print(f"# wrote {path}")
