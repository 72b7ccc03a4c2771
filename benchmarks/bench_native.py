"""Benchmark of the native kernels (kernels/, fastdmd.ops.backend = "native") beside the reference
in eager mode and, on CUDA, the Triton kernels, on the inputs of bench_dmd_target.py and
bench_group_advantages.py (same shapes, dtypes, modes and byte counts: see those files).

The library must be built first (CMakeLists.txt; with its CUDA kernels for a GPU run):

    cmake -S . -B build/native -DPython_EXECUTABLE="$(python -c 'import sys; print(sys.executable)')"
    cmake --build build/native -j2
    python benchmarks/bench_native.py            # --full with CUDA, --small without

On CPU the benchmarks run on one thread (see _bench_common.parse_args), so the native kernels'
at::parallel_for does not help them here. Results: <out>/native_<device>.json and .csv.
"""

import importlib

import bench_dmd_target
import bench_group_advantages
from _bench_common import (TRITON_ON_CPU_NOTE, copy_bandwidth, cuda_graphed, environment, measure,
                           parse_args, report)
from fastdmd.ops import native, reference

OPS = {"dmd_target": bench_dmd_target, "group_advantages": bench_group_advantages}
# The columns that describe a case, over both ops (blank where an op has no such column).
CASE_COLUMNS = ("shape", "dtype", "mode", "layout")


def implementations(op: str, device) -> dict:
    impls = {"reference_eager": getattr(reference, op), "native": getattr(native, op)}
    if device.type == "cuda":
        impls["triton"] = getattr(importlib.import_module(f"fastdmd.ops.{op}_triton"), op)
    return impls


def main() -> None:
    args = parse_args(__doc__)
    device = args.device
    try:
        native.load()
    except RuntimeError as error:
        raise SystemExit(f"bench_native: {error}") from None
    if device.type not in native.devices():
        has = ", ".join(sorted(native.devices()))
        raise SystemExit(f"bench_native: the library {native.library_path()} has no {device.type} "
                         f"kernels (it has: {has}); rebuild it with -DFASTDMD_CUDA=ON")
    copy_gbs = copy_bandwidth(device, (128 if args.small else 1024) * 2**20)
    env = environment(device, copy_gbs) | dict(native_library=str(native.library_path()))
    notes = ["dmd_target bytes = 6 E n (forward), 8 E n (forward+backward); E = element size, "
             "n = x0.numel()",
             "group_advantages bytes = N K E + 5 N + 8 G K (rewards in; advantages, valid, group "
             "mean/std out)"]
    if device.type != "cuda":
        notes.append(TRITON_ON_CPU_NOTE)
    # On CUDA each implementation is timed as called and replayed from a CUDA graph; the native
    # kernels can be captured wherever the Triton ones can (neither synchronizes there).
    graph_modes = (False, True) if device.type == "cuda" else (False,)
    rows = []
    for op, module in OPS.items():
        impls = implementations(op, device)
        for fields, call, nbytes, graphable in module.cases(args):
            assert set(fields) <= set(CASE_COLUMNS), f"new case columns: {set(fields)}"
            graphable = set(graphable) | ({"native"} if "triton" in graphable else set())
            for name, impl in impls.items():
                for graphed in graph_modes:
                    row = dict(op=op, **{c: fields.get(c, "") for c in CASE_COLUMNS}, impl=name,
                               cuda_graph=graphed, bytes=nbytes)
                    if graphed and name not in graphable:
                        rows.append(row | dict(median_us=None, gbs=None, fraction_of_copy=None,
                                               error="not capturable: synchronizes with the host"))
                        continue

                    def make_fn(impl=impl, graphed=graphed, call=call):
                        return cuda_graphed(call(impl)) if graphed else call(impl)

                    rows.append(row | measure(make_fn, device, args.repeats, nbytes, copy_gbs))
    report("native", device, env, rows, args.out, notes)


if __name__ == "__main__":
    main()
