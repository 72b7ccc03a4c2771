#!/usr/bin/env bash
# The fused ops on a fresh GPU machine, in one command, without network:
#
#   benchmarks/gpu_suite.sh OUTDIR [STEP ...]
#
# Steps, in order (default: all): env, install, native, tests, then one per benchmarks/bench_*.py
# (bench_dmd_target, bench_group_advantages, bench_clipped_policy_loss, ...). Name some steps to
# run only those, e.g. to stay under a per-command time limit: `gpu_suite.sh out install tests`,
# then `gpu_suite.sh out bench_dmd_target`.
#
#   env      nvidia-smi (summary and -q), python/torch/triton/CUDA versions, pip freeze, git state
#   install  pip install --no-index --no-deps from a folder of wheels, if there is one: $FASTDMD_WHEELS,
#            default .wheels/ at the repo root (git-ignored), filled beforehand, where PyPI is
#            reachable, by `bash benchmarks/gpu_wheels.sh` (diffusers, mlxtend, nvtx: what the image
#            lacks). Then `pip install --no-deps -e .` of this repo. The package is also put on
#            PYTHONPATH, so later steps run even if the editable install fails.
#   native   the optional native kernels with CUDA (cmake -DFASTDMD_CUDA=ON into build/native, where
#            fastdmd.ops.native and bench_native look), then ctest; needs nvcc (the CUDA toolkit)
#   onepass  the one-pass dmd_target kernel against the two-pass one (bit equality; its per-sample
#            barrier can only be tested on a GPU): alone and first, so that a hang costs its own short
#            timeout and no other step's results; JUnit in OUTDIR/junit_onepass.xml
#   tests    pytest -m "gpu or not slow" tests/test_ops_*.py on CUDA (TRITON_INTERPRET=0), but onepass,
#            JUnit XML in OUTDIR/junit_ops.xml
#   bench_*  the benchmark in full mode, results (.json, .csv) in OUTDIR
#   gputests every test marked gpu outside tests/test_ops_*.py (the tests step runs those): CUDA-graph
#            rollout equal to eager, ...; JUnit in OUTDIR/junit_gpu.xml
#   throughput  benchmarks/step_throughput.py at the anchor shape (SD3-medium MMDiT, 12 layers, batch 4,
#            512 px), one process, --profile: naive + optimized (reduce-overhead since 2026-11-26, session
#            13: 0.141 against 0.158 s/step for the default compile mode in one process; since session 14
#            with whole-call graphs for the rollout and scores: 0.133 s; since session 19 without the GELU
#            epilogue, which gained nothing: 0.127-0.128 s) + the A/B variants of $FASTDMD_AB_VARIANTS
#            (default optimized+perf.inductor_options=triton.multi_kernel=1,coordinate_descent_tuning=true,
#            not yet measured: inductor also builds persistent forms of its reductions, the adaLN layer
#            norms' among them, 9 ms of "red" kernels per step in session 14, and picks the faster by timing
#            both, and tunes the block sizes of its pointwise and reduction kernels; both options in one
#            variant, to be split if it gains; '' for none); 254 s for naive + optimized + one variant with
#            --profile in session 19; results in OUTDIR/step_throughput_sd3-medium-d12.{json,md}.
#   throughput_other  the same for flux-dev at depth 2 (~110 s, compile included) and digits (>40 s)
#   memplan  python -m fastdmd.memory_plan for the same SD3 shape, to set against the measured peak
#
# With this workplace's device tool (10 minutes a command, 15 minutes of device time in all, the
# start included, at most 8 files back from $OUT): fill .wheels/ here (benchmarks/gpu_wheels.sh) and
# name it in `carry` (forgetting it costs a rerun: no diffusers there). Step times seen on an H100
# (2026-11-26, four sessions): env + install 27-35 s, native 55-67 s, onepass 24-36 s, tests 32-41 s
# (-n 6; -k master_adamw alone 19 s), gputests 26-39 s (-n 3; 89 s with -n 4 since the reduce-overhead
# test), bench_dmd_target 89 s, bench_master_adamw 27-29 s, bench_group_advantages 18 s, bench_native
# 13 s, bench_clipped_policy_loss 28 s, throughput ~260 s (two processes with --profile; naive +
# optimized + optimized-default-mode in one process without --profile: ~170 s), throughput_other
# ~170 s, memplan 12 s (CPU only: run it here instead); a machine started in ~30 s and is given back
# after 30 s idle.
# The steps that time nothing can share the machine; the timed ones run alone. Plan for one call of
# ~590 s. Session 19 ran this recipe at 10771fe in 484 s on a fresh machine (gputests 100 s, throughput
# 254 s, bench_dmd_target 72 s; benchmarks/results/gpu_h100_2026-11-27_sixth.md). Unrun on a GPU since
# then: dmd_target's one-block chunks for a forward that saves the residual (cfa9a4d; onepass: the
# two-pass bits with that cut; bench_dmd_target: the `triton` forward+backward row, ~210 us expected,
# against triton_one_pass_two_block_chunks, ~228), the multi_kernel + coordinate-descent variant
# (throughput) and, since session 20, FSDP2 on CUDA (gputests: test_sd3.py::test_fsdp2_on_one_rank_of_the_
# devices_backend_resumes_as_an_uninterrupted_run[cuda] and test_flux.py::test_fsdp2_on_one_cuda_rank_trains_
# and_resumes_as_an_uninterrupted_run, one rank of nccl: sharded networks, bf16 policy, activation
# checkpointing, per-block compile, DCP save and resume; never run on a GPU before) and make_adamw's apex
# branch (test_perf.py, apex's interface from a stand-in). The same recipe covers them:
#   export PYTHON=python3; S=benchmarks/gpu_suite.sh; O=/tmp/r; timeout 578 bash -c "
#   FASTDMD_STEP_TIMEOUT=60 bash $S $O/a env install
#   FASTDMD_STEP_TIMEOUT=100 FASTDMD_PYTEST_ARGS='-n 6' bash $S $O/t tests &
#   FASTDMD_STEP_TIMEOUT=60 bash $S $O/o onepass &
#   FASTDMD_STEP_TIMEOUT=150 FASTDMD_PYTEST_ARGS='-n 4' bash $S $O/g gputests; wait
#   FASTDMD_STEP_TIMEOUT=320 bash $S $O/p throughput
#   FASTDMD_STEP_TIMEOUT=100 bash $S $O/d bench_dmd_target
#   FASTDMD_STEP_TIMEOUT=45 bash $S $O/m bench_master_adamw"; tar czf $OUT/r.tgz --exclude='*_trace*' -C /tmp r
#   cp $O/p/*optimized*_trace_kernels.json.gz $OUT/
# with timeout_s 590 and .wheels in carry. With the device time left (a second call, ~250 s), the next
# candidate for issue 6's 50% MFU (44.7% in session 19; 0.112 s/step needed): inductor's Triton matmul
# templates with their epilogues fused (bias + GELU, gate + residual: the 28.6 ms of compiled pointwise and
# norm kernels per step sit between matmuls), chosen by timing against cuBLAS, in the same process as
# the optimized step (no naive: its FLOP count, 44.56 TFLOP/step, is the one of call 1 and session 19):
#   timeout 240 python3 benchmarks/step_throughput.py --preset sd3-medium --depth 12 --batch 4 \
#     --resolution 512 --variants optimized optimized+perf.inductor_options=max_autotune_gemm=true \
#     --out $OUT/step_throughput_sd3-medium-d12_autotune
# Autotuning compiles many kernels (CPU-bound; 16 cores there): if it runs out of time, the optimized row
# is already written, and the time it took says what a longer call needs. Also never timed on this shape,
# where attention runs at 44% of the matmul peak (step_work_rate_sd3-medium-d12_h100_10771fe.md): torch's
# flash attention kernel in place of cuDNN's, optimized+perf.cudnn_attention=false (~85 s, no autotuning),
# e.g. as call 1's FASTDMD_AB_VARIANTS beside the default one. The tool brings back files of at most 16 MiB: the full
# Chrome traces stay there; the step_throughput files hold their summaries (device time per phase by
# kind of kernel, the calls into compiled code per phase, the copy kernels by the ops that launched
# them), and each profiled variant's trimmed trace (*_trace_kernels.json.gz: kernels, launches, phase
# ranges, host ops of 50 us or more) comes back on its own, outside the archive, for Perfetto or
# json here: its device-idle gaps and the host calls around them say where a step waits for the host
# (session 13 found MasterAdamW's host work that way: 8-11 ms per update with the GPU idle after the
# update's synchronization). Since session 14 each profiled variant also has a step profiled without
# the phase synchronization (*_free_trace_kernels.json.gz, and its idle time by host range in the .md):
# the timed step's own idle time (~15 ms of 133 in session 14's optimized step), which the
# synchronized step's gaps cannot show. Write everything under $OUT in the same call: a later call finds the
# machine given back after 30 s idle. Read the GPU tests' results before trusting the timings.
# FASTDMD_STEP_TIMEOUT=SECONDS bounds each step. Every step logs to OUTDIR/<step>.log. A failing
# step does not stop the others; the exit status
# is non-zero when any step failed, and OUTDIR/summary.txt lists each step's status and duration.
set -u -o pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR [STEP ...]" >&2
    exit 2
fi
outdir=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
cd "$repo" || exit 2

python=${PYTHON:-python}
wheels=${FASTDMD_WHEELS:-$repo/.wheels}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# The kernels must be compiled for the GPU, not interpreted: 0 rather than unset, since the tests
# choose the interpreter where they find no /dev/nvidia0 (setdefault keeps this value).
export TRITON_INTERPRET=0

benches=()
for path in benchmarks/bench_*.py; do
    [[ -e $path ]] && benches+=("$(basename "$path" .py)")
done
if [[ $# -gt 0 ]]; then
    steps=("$@")
else
    steps=(env install native onepass tests "${benches[@]}" gputests throughput throughput_other memplan)
fi

step_env() {
    nvidia-smi > "$outdir/nvidia-smi.txt" 2>&1
    local smi=$?
    nvidia-smi -q > "$outdir/nvidia-smi-q.txt" 2>&1
    "$python" - > "$outdir/versions.txt" 2>&1 <<'EOF'
import platform, sys
import torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("triton", triton.__version__)
print("cuda available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print("device", i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
EOF
    local versions=$?
    cat "$outdir/versions.txt"
    "$python" -m pip freeze > "$outdir/pip-freeze.txt" 2>&1
    { git rev-parse HEAD; git status --short; } > "$outdir/git.txt" 2>&1
    return $((smi || versions))
}

step_install() {
    local status=0
    if compgen -G "$wheels/*.whl" > /dev/null; then
        echo "installing the wheels in $wheels"
        # --no-deps: the folder holds what the image lacks, not their dependencies, which the
        # image has (benchmarks/gpu_wheels.sh fills it); a resolver with no index would fail.
        "$python" -m pip install --no-index --no-deps --disable-pip-version-check "$wheels"/*.whl || status=1
    else
        echo "no wheels in $wheels: using what the image has"
    fi
    # --no-build-isolation: use the installed setuptools instead of fetching one.
    # Not needed by the steps (they run with PYTHONPATH=$repo), so a failure here is only reported.
    "$python" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check \
        -e "$repo" || echo "editable install failed (see above); the steps use PYTHONPATH=$repo"
    "$python" -c "import fastdmd, pytest, diffusers, mlxtend; print('fastdmd from', fastdmd.__file__)" || status=1
    return $status
}

step_native() {
    command -v nvcc || echo "nvcc not on PATH; CMake looks for the CUDA toolkit itself (CUDAToolkit_ROOT)"
    rm -rf build/native
    cmake -S . -B build/native -DPython_EXECUTABLE="$(command -v "$python")" -DFASTDMD_CUDA=ON &&
        cmake --build build/native -j8 && ctest --test-dir build/native --output-on-failure
}

# FASTDMD_PYTEST_ARGS: extra pytest arguments for tests and gputests, e.g. "-n 8" (pytest-xdist,
# in the image: compiles the kernel variants in parallel) and --ignore=tests/test_ops_native.py
# while the native step builds the library in parallel (its own ctest runs those tests).
onepass_test=tests/test_ops_dmd_target.py::test_one_pass_kernel_gives_the_two_pass_bits

step_onepass() {
    "$python" -m pytest "$onepass_test" -rs -v --junitxml="$outdir/junit_onepass.xml"
}

step_tests() {
    "$python" -m pytest -m "gpu or not slow" tests/test_ops_*.py -rs --deselect "$onepass_test" \
        --junitxml="$outdir/junit_ops.xml" --durations=15 ${FASTDMD_PYTEST_ARGS:-}
}

step_gputests() {
    "$python" -m pytest -m gpu tests/ -rs --ignore-glob='tests/test_ops_*.py' --junitxml="$outdir/junit_gpu.xml" \
        --durations=15 ${FASTDMD_PYTEST_ARGS:-}
}

step_throughput() {
    # The anchor shape: naive, optimized, then the A/B variants of $FASTDMD_AB_VARIANTS (default: optimized
    # without the option most recently added to it, so its gain is measured in the same process; none with
    # FASTDMD_AB_VARIANTS=''). One process: a CUDA error would leave its context unusable for the variants
    # after it, so the optimized step comes first.
    local ab=${FASTDMD_AB_VARIANTS-optimized+perf.inductor_options=triton.multi_kernel=1,coordinate_descent_tuning=true}
    # shellcheck disable=SC2086  # the A/B variants are words
    "$python" benchmarks/step_throughput.py --preset sd3-medium --depth 12 --batch 4 --resolution 512 \
        --variants naive optimized $ab --profile --out "$outdir/step_throughput_sd3-medium-d12"
}

step_throughput_other() {  # the other presets: FLUX's shape at depth 2, the digits default
    local status=0
    "$python" benchmarks/step_throughput.py --preset flux-dev --depth 2 --batch 1 --resolution 512 \
        --out "$outdir/step_throughput_flux-dev-d2" || status=1
    "$python" benchmarks/step_throughput.py --preset digits --out "$outdir/step_throughput_digits" || status=1
    return $status
}

step_memplan() {  # naive's plan, then the optimized variants' (rollout on a bf16 copy)
    "$python" -m fastdmd.memory_plan --preset sd3-medium --depth 12 --batch 4 --resolution 512 --gpu-memory 80 &&
        "$python" -m fastdmd.memory_plan --preset sd3-medium --depth 12 --batch 4 --resolution 512 --gpu-memory 80 \
            --rollout-weights bf16
}

step_bench() {
    "$python" "benchmarks/$1.py" --full --out "$outdir"
}

# FASTDMD_STEP_TIMEOUT=N stops any one step after N seconds (exit 124 in summary.txt), so a slow
# step cannot use up a machine lent for a fixed time; 0 (default) sets no limit.
step_timeout=${FASTDMD_STEP_TIMEOUT:-0}
export python outdir repo wheels onepass_test
export -f $(compgen -A function step_)

failed=()
: > "$outdir/summary.txt"
for step in "${steps[@]}"; do
    case $step in
        env | install | native | onepass | tests | gputests | throughput | throughput_other | memplan) command=(step_"$step") ;;
        bench_*) command=(step_bench "$step") ;;
        *) echo "$step: unknown step; expected env, install, native, onepass, tests, gputests, throughput, throughput_other, memplan or one of: ${benches[*]}" |
               tee -a "$outdir/summary.txt"
           failed+=("$step"); continue ;;
    esac
    echo "== $step (log: $outdir/$step.log)"
    start=$SECONDS
    if [[ $step_timeout -gt 0 ]]; then
        timeout --kill-after=10 "$step_timeout" bash -c '"$@"' _ "${command[@]}" > "$outdir/$step.log" 2>&1
    else
        "${command[@]}" > "$outdir/$step.log" 2>&1
    fi
    status=$?
    tail -n 25 "$outdir/$step.log"
    if [[ $status -eq 0 ]]; then result=ok; else result="FAILED (exit $status)"; failed+=("$step"); fi
    echo "$step: $result in $((SECONDS - start)) s" | tee -a "$outdir/summary.txt"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed steps: ${failed[*]}" | tee -a "$outdir/summary.txt"
    exit 1
fi
echo "all steps passed" | tee -a "$outdir/summary.txt"
