#!/usr/bin/env bash
# Every GPU step of mantissa-cuda, the same way each time.
#
#   bash scripts/gpu-check.sh build   # here (no CUDA needed): release build of the examples and the cuda tests,
#                                     # binaries copied (stripped) into .gpu/
#   bash scripts/gpu-check.sh perf    # on the GPU machine: step times with one switch flipped (PERF_ALT), PyTorch, per-op profile
#   bash scripts/gpu-check.sh run     # on the GPU machine, with .gpu/ carried over: nvidia-smi, every cuda test
#                                     # binary with --include-ignored, mnist on the cuda backend, the step timing.
#                                     # Logs go to $OUT (or ./gpu-out): nvidia-smi.txt, tests.log, mnist.log,
#                                     # timing.log, report.log, profile.log (nsys, if installed), bench.log,
#                                     # summary.txt. SKIP_BENCH=1 leaves out the criterion bench (~150 s).
#   bash scripts/gpu-check.sh tests   # on the GPU machine: every cuda test binary, then mnist's MLP on the mixed policies
#   bash scripts/gpu-check.sh ncu head_bwd_mma '^adamw8'   # on the GPU machine: Nsight Compute on those kernels
#   bash scripts/gpu-check.sh timeline [POLICY]  # on the GPU machine: every kernel of one step, in order, timed
#   bash scripts/gpu-check.sh ab FLAG POLICY...  # on the GPU machine: gpu_report with and without FLAG, alternating
#   bash scripts/gpu-check.sh sustained [POLICY [STEPS]]  # on the GPU machine: ~10 s of steps each, clocks sampled
#   bash scripts/gpu-check.sh floor [STEPS]      # on the GPU machine: the least a step can take with mantissa's GEMMs,
#                                                # against the step and PyTorch's
#   bash scripts/gpu-check.sh cold [STEPS]       # on the GPU machine: the same from a cold start, autotune off
set -uo pipefail
cd "$(dirname "$0")/.."

# The libraries on the GPU machine (../shared/GPU.md): cuBLAS in CUDA's lib64, NVRTC and NCCL from PyTorch's wheels.
gpu_env() {
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
}

build() {
    set -e
    cargo build --release --features cuda --examples
    rm -rf .gpu && mkdir -p .gpu/tests
    # The test executables of mantissa-cuda, by target name (ops, train, timing, nvrtc, no_gpu).
    # The shared backend test bodies (tests/backends.rs), with their CUDA instantiation.
    cargo test --release --features cuda --test backends --no-run --message-format=json \
        | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "backends":
        print(m["executable"])
' | while read -r exe; do cp "$exe" .gpu/tests/backends; done
    cargo test --release -p mantissa-cuda --no-run --message-format=json \
        | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" ".gpu/tests/$name"; done
    for ex in mnist gpu_report precision_table loss_scaling; do cp "target/release/examples/$ex" ".gpu/$ex"; done
    # Fused (cuBLASLt epilogue) against composed GEMMs on the gpu-mlp shapes.
    cargo build --release -p mantissa-cuda --example lt_epilogue --example skinny --example adamw_layout --example floor
    for ex in lt_epilogue skinny adamw_layout floor; do cp "target/release/examples/$ex" ".gpu/$ex"; done
    # The CPU-vs-GPU criterion bench.
    cargo bench --features cuda --bench cpu_vs_gpu --no-run --message-format=json \
        | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cpu_vs_gpu":
        print(m["executable"])
' | while read -r exe; do cp "$exe" .gpu/cpu_vs_gpu; done
    strip .gpu/lt_epilogue .gpu/skinny .gpu/adamw_layout .gpu/floor .gpu/mnist .gpu/gpu_report .gpu/precision_table .gpu/loss_scaling .gpu/cpu_vs_gpu .gpu/tests/* 2>/dev/null || true
    ls -la .gpu .gpu/tests
    du -sh .gpu
}

# Every cuda test binary with --include-ignored (tests/backends: its GPU instantiation only; the CPU ones run in
# the test suite on the CPU machine), into $1/tests.log.
tests() {
    local out="$1" exe t filter
    : >"$out/tests.log"
    [ -x .gpu/tests/backends ] || echo "missing .gpu/tests/backends (run: bash scripts/gpu-check.sh build)" | tee -a "$out/tests.log"
    for exe in .gpu/tests/*; do
        t=$(basename "$exe")
        [ "$t" = timing ] && continue
        echo "=== $t" | tee -a "$out/tests.log"
        # tests/backends: only its GPU instantiation here (the CPU ones run in the test suite on the CPU machine).
        filter=()
        [ "$t" = backends ] && filter=(cuda:: device_paths)
        timeout 300 "$exe" --include-ignored --nocapture --test-threads=4 "${filter[@]}" >>"$out/tests.log" 2>&1
        echo "=== $t exit $?" | tee -a "$out/tests.log"
    done
}

# The tests alone, then the MNIST MLP on the mixed policies: what a change to GPU code needs before it lands.
#   bash scripts/gpu-check.sh tests
tests_only() {
    local out="${OUT:-gpu-out}" p
    mkdir -p "$out"
    gpu_env
    tests "$out" >/dev/null
    grep -E "^=== |^test result|^test .* (FAILED|ok)$|panicked" "$out/tests.log" | grep -vE " ok$"
    for p in mixed_bfloat16 mixed_float16; do
        echo "=== mnist --model mlp --policy $p"
        timeout 240 .gpu/mnist --backend cuda --data data --model mlp --policy "$p" 2>&1 | grep -E "^result:|^error|^note"
    done
}

run() {
    local out="${OUT:-gpu-out}"
    mkdir -p "$out"
    gpu_env
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>&1 | tee "$out/nvidia-smi.txt"

    tests "$out"

    : >"$out/mnist.log"
    for args in "--model mlp --policy float32" "--model mlp --policy mixed_bfloat16" "--model mlp --policy mixed_float16" \
        "--model cnn --policy mixed_bfloat16" "--model cnn --policy float32"; do
        echo "=== mnist $args" | tee -a "$out/mnist.log"
        # shellcheck disable=SC2086
        timeout 240 .gpu/mnist --backend cuda --data data $args >>"$out/mnist.log" 2>&1
        echo "=== exit $?" | tee -a "$out/mnist.log"
    done

    : >"$out/timing.log"
    if [ -x .gpu/tests/timing ]; then
        timeout 240 .gpu/tests/timing --include-ignored --nocapture --test-threads=1 >>"$out/timing.log" 2>&1
        echo "=== timing exit $?" >>"$out/timing.log"
    fi

    # Performance, mantissa and PyTorch in the same call (benches/README.md takes its GPU figures from here).
    : >"$out/report.log"
    echo "=== gpu_report" | tee -a "$out/report.log"
    timeout 300 .gpu/gpu_report >>"$out/report.log" 2>&1
    echo "=== gpu_report exit $?" >>"$out/report.log"
    echo "=== pytorch" | tee -a "$out/report.log"
    timeout 300 python3 benches/peers/pytorch_gpu.py >>"$out/report.log" 2>&1
    echo "=== pytorch exit $?" >>"$out/report.log"
    # The least a step can take with cuBLAS GEMMs (the five GEMMs + fused AdamW + the bytes no GEMM moves).
    echo "=== pytorch_floor" | tee -a "$out/report.log"
    (cd benches/peers && timeout 300 python3 pytorch_floor.py) >>"$out/report.log" 2>&1
    echo "=== pytorch_floor exit $?" >>"$out/report.log"
    echo "=== gpu_report (second pass)" | tee -a "$out/report.log"
    timeout 300 .gpu/gpu_report >>"$out/report.log" 2>&1
    echo "=== lt_epilogue" | tee -a "$out/report.log"
    timeout 120 .gpu/lt_epilogue >>"$out/report.log" 2>&1
    echo "=== skinny" | tee -a "$out/report.log"
    timeout 120 .gpu/skinny >>"$out/report.log" 2>&1
    echo "=== adamw_layout" | tee -a "$out/report.log"
    timeout 120 .gpu/adamw_layout >>"$out/report.log" 2>&1
    echo "=== precision_table" | tee -a "$out/report.log"
    timeout 300 .gpu/precision_table >>"$out/report.log" 2>&1
    echo "=== precision_table exit $?" >>"$out/report.log"
    # Where the time of a bf16 step goes, kernel by kernel (when Nsight Systems is installed there).
    if command -v nsys >/dev/null 2>&1; then
        timeout 180 nsys profile -o "$out/step" --force-overwrite true --cuda-graph-trace=node \
            .gpu/gpu_report --policy mixed_bfloat16 --mode graph --warmup 5 --steps 20 >"$out/profile.log" 2>&1
        timeout 120 nsys stats --report cuda_gpu_kern_sum --format csv "$out/step.nsys-rep" >>"$out/profile.log" 2>&1
        rm -f "$out/step.nsys-rep" "$out/step.sqlite"
    else
        echo "nsys not installed: no kernel profile" >"$out/profile.log"
    fi
    if [ -x .gpu/cpu_vs_gpu ] && [ -z "${SKIP_BENCH:-}" ]; then
        timeout 150 .gpu/cpu_vs_gpu --bench --warm-up-time 1 --measurement-time 2 >"$out/bench.log" 2>&1
        echo "=== cpu_vs_gpu exit $?" >>"$out/bench.log"
    fi

    {
        echo "--- tests"
        grep -E "^=== |^test result|^test .* (FAILED|ok)$|panicked" "$out/tests.log"
        echo "--- mnist"
        grep -E "^=== |^result:|^error|^note" "$out/mnist.log"
        echo "--- timing"
        grep -E "^timing:|panicked|=== timing" "$out/timing.log"
        echo "--- report"
        grep -E "^=== |^train:|^floor:|^lt_tune:|^fused:|^skinny:|^adamw_layout:|^\||^error|^#" "$out/report.log"
        echo "--- profile (bf16 step, kernels by total time)"
        head -40 "$out/profile.log"
        echo "--- bench"
        grep -E "^[a-z_0-9]+/|time:|thrpt:|skipped|=== " "$out/bench.log" 2>/dev/null
    } | tee "$out/summary.txt"
}

# SM clock, power, temperature and clock-event reasons every 100 ms into $1/smi.csv, to tell a slower pass from a
# GPU that ran slower at the time; `mark LABEL` starts a segment (in $1/marks.txt), and stop_sampler prints one
# `clocks:` line per segment (scripts/clock_segments.py).
start_sampler() {
    local out="$1" reasons=clocks_event_reasons.active
    : >"$out/marks.txt"
    nvidia-smi --query-gpu=$reasons --format=csv >/dev/null 2>&1 || reasons=clocks_throttle_reasons.active
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$reasons \
        --format=csv,noheader,nounits -lms 100 2>/dev/null |
        python3 -u -c '
import sys, datetime
for line in sys.stdin:
    f = line.split(",", 1)
    try:
        t = datetime.datetime.strptime(f[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        continue
    print(f"{t:.3f},{f[1].strip()}", flush=True)
' >"$out/smi.csv" &
    SAMPLER=$!
    MARKS="$out/marks.txt"
}
mark() { echo "mark $(date +%s.%N) $*" >>"$MARKS"; }
stop_sampler() {
    mark "end"
    sleep 0.3
    kill "$SAMPLER" 2>/dev/null
    pkill -f "nvidia-smi --query-gpu=timestamp" 2>/dev/null
    python3 scripts/clock_segments.py "$1/smi.csv" "$1/marks.txt"
}

# Performance only (no tests): per-op profiles of a step and the fused-backward choice, each measured twice.
perf() {
    local out="${OUT:-gpu-out}"
    mkdir -p "$out"
    gpu_env
    : >"$out/perf.log"
    start_sampler "$out"
    # The default against one switch flipped (PERF_ALT, default --no-fused-head; --no-autotune was the one
    # compared before), in both orders (clocks and L2 after the first runs could favour either).
    local alt="${PERF_ALT:---no-fused-head}"
    for pass in 1 2; do
        flags=("" "$alt")
        [ "$pass" = 2 ] && flags=("$alt" "")
        for flag in "${flags[@]}"; do
            echo "=== gpu_report --mode graph --warmup 30 $flag (pass $pass)" >>"$out/perf.log"
            mark "gpu_report $flag (pass $pass)"
            # shellcheck disable=SC2086
            timeout 120 .gpu/gpu_report --mode graph --warmup 30 $flag >>"$out/perf.log" 2>&1
        done
        echo "=== pytorch (pass $pass)" >>"$out/perf.log"
        mark "pytorch (pass $pass)"
        timeout 300 python3 benches/peers/pytorch_gpu.py >>"$out/perf.log" 2>&1
    done
    echo "=== gpu_report --profile" >>"$out/perf.log"
    mark "gpu_report --profile"
    timeout 120 .gpu/gpu_report --profile --steps 20 >>"$out/perf.log" 2>&1
    stop_sampler "$out" >>"$out/perf.log" 2>&1
    grep -E "^=== |^train:|^lt_tune:|^profile:|^clocks:|^error|step_ms|peak" "$out/perf.log" | tee "$out/perf-summary.txt"
}

# Nsight Compute on one launch (the third) of each kernel whose name matches one of the arguments (regular
# expressions), in a queued mixed_bfloat16 gpu-mlp step: speed of light, occupancy, memory, and why warps stall
# (average warps stalled per issued instruction, by reason). ncu locks the clocks lower than a normal run
# (1.3-1.5 GHz), so its durations are longer than the step's.
ncu_kernels() {
    gpu_env
    local st="" r k
    for r in long_scoreboard short_scoreboard mio_throttle lg_throttle wait math_pipe_throttle not_selected selected \
        dispatch_stall no_instruction drain membar barrier tex_throttle branch_resolving imc_miss; do
        st="$st,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
    done
    for k in "$@"; do
        echo "######## $k"
        timeout 200 ncu --kernel-name regex:"$k" --launch-skip 2 --launch-count 1 --section SpeedOfLight \
            --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats \
            --section ComputeWorkloadAnalysis --metrics "${st#,}" \
            .gpu/gpu_report --mode queued --policy mixed_bfloat16 --warmup 3 --steps 3 2>&1 |
            grep -vE "^ *$|^    (OPT|INF|WRN) |^          |^train:|^lt_tune"
    done
}

# Every kernel of a queued mixed_bfloat16 gpu-mlp step (the last of a few), one at a time, at the clocks and
# with the caches as they are (no locking, no flushing): names and durations in launch order, and their sum
# (scripts/kernel_timeline.py). GEMM autotune is off, so cuBLAS's default algorithms run.
timeline() {
    gpu_env
    local out="${OUT:-gpu-out}" policy="${1:-mixed_bfloat16}"
    mkdir -p "$out"
    MANTISSA_CUDA_AUTOTUNE=0 timeout 300 ncu --clock-control none --cache-control none \
        --metrics gpu__time_duration.sum --csv --print-units base \
        .gpu/gpu_report --mode queued --policy "$policy" --warmup 2 --steps 2 >"$out/timeline-$policy.csv" 2>&1
    python3 scripts/kernel_timeline.py "$out/timeline-$policy.csv"
}

# The step lines of one timed program, as the A/B and floor runs below compare them (graph mode, 30 warm-up
# steps; STEPS timed steps):
#   m_step POLICY STEPS [FLAG...]   mantissa's gpu_report
#   t_step POLICY STEPS             PyTorch's step (benches/peers/pytorch_gpu.py)
#   f_part DTYPE STEPS [ARG...]     floor.rs (its floor: lines)
m_step() {
    local p="$1" n="$2"
    shift 2
    timeout 120 .gpu/gpu_report --mode graph --warmup 30 --steps "$n" --policy "$p" "$@" 2>&1 | grep -E "^train:|^error"
}
t_step() {
    timeout 120 python3 benches/peers/pytorch_gpu.py --policy "$1" --warmup 30 --steps "$2" 2>&1 | grep -E "^train:|^error"
}
f_part() {
    local d="$1" n="$2"
    shift 2
    timeout 120 .gpu/floor --dtype "$d" --steps "$n" "$@" 2>&1 | grep -E "^floor:|^error"
}
# bf16 for mixed_bfloat16, f16 for mixed_float16.
dtype_of() { [ "$1" = mixed_bfloat16 ] && echo bf16 || echo f16; }

# One switch against the default, step time only: gpu_report --mode graph --warmup 30 with and without FLAG,
# REPEAT (default 4) pairs per policy in alternating order, then PyTorch once; every line goes to stdout.
#   bash scripts/gpu-check.sh ab --no-pdl mixed_bfloat16 mixed_float16
ab() {
    gpu_env
    local flag="$1" p i o
    shift
    for p in "$@"; do
        for i in $(seq 1 "${REPEAT:-4}"); do
            for o in $([ $((i % 2)) = 1 ] && echo "default flag" || echo "flag default"); do
                # shellcheck disable=SC2046
                m_step "$p" 50 $([ "$o" = flag ] && echo "$flag")
            done
        done
    done
    timeout 300 python3 benches/peers/pytorch_gpu.py 2>&1 | grep -E "^train:|^error"
}

# Sustained load, mantissa against PyTorch, one policy (default mixed_bfloat16): STEPS (default 6000) graph steps
# of gpu_report, then as many of PyTorch's, then both again in the other order, with the clock sampler on: the
# step times over ~10 s of load each and the clocks and power each ran at.
sustained() {
    gpu_env
    local out="${OUT:-gpu-out}" policy="${1:-mixed_bfloat16}" steps="${2:-6000}" who
    mkdir -p "$out"
    start_sampler "$out"
    for who in mantissa pytorch pytorch mantissa; do
        mark "$who $policy x$steps"
        if [ "$who" = mantissa ]; then m_step "$policy" "$steps"; else t_step "$policy" "$steps"; fi
    done
    stop_sampler "$out"
}

# The least a step can take with mantissa's own GEMMs (cuda/examples/floor.rs: the five GEMMs on their tuned
# algorithms, the fused AdamW, the bytes no GEMM can move for the element-wise passes, one graph; and the same
# with cuBLASLt's epilogues) against the step and PyTorch's step, in the same call: per mixed policy, floor,
# gpu_report and pytorch_gpu.py (graph, 30 warm-up steps, 50 timed), twice; then floor's `all` and `fused`,
# gpu_report and PyTorch for STEPS (default 6000) steps each, mixed_bfloat16.
# The clock sampler runs throughout.
floor() {
    gpu_env
    local out="${OUT:-gpu-out}" steps="${1:-6000}" pass p part
    mkdir -p "$out"
    start_sampler "$out"
    for pass in 1 2; do
        for p in mixed_bfloat16 mixed_float16; do
            mark "floor $(dtype_of "$p") (pass $pass)"
            timeout 120 .gpu/floor --dtype "$(dtype_of "$p")" 2>&1 | grep -E "^floor:|^floor |^lt_tune|^error"
            mark "gpu_report $p (pass $pass)"
            m_step "$p" 50
            mark "pytorch $p (pass $pass)"
            t_step "$p" 50
        done
    done
    for part in all fused; do
        mark "floor bf16 $part x$steps"
        f_part bf16 "$steps" --part "$part"
    done
    mark "gpu_report mixed_bfloat16 x$steps"
    m_step mixed_bfloat16 "$steps"
    mark "pytorch mixed_bfloat16 x$steps"
    t_step mixed_bfloat16 "$steps"
    stop_sampler "$out"
}

# The same comparison from a cold start: GEMM autotune off (its timing loop is a burst of full load right before
# the warm-up, which PyTorch's start does not have), a 5 s pause before each
# program; floor's `all` part, gpu_report and PyTorch per mixed policy, ROUNDS (default 3) times; then floor,
# gpu_report and PyTorch for STEPS (default 6000) steps each, mixed_float16. The clock sampler runs throughout.
cold() {
    gpu_env
    local out="${OUT:-gpu-out}" steps="${1:-6000}" round p
    mkdir -p "$out"
    start_sampler "$out"
    for round in $(seq 1 "${ROUNDS:-3}"); do
        for p in mixed_bfloat16 mixed_float16; do
            sleep 5
            mark "floor $(dtype_of "$p") all, cold (round $round)"
            MANTISSA_CUDA_AUTOTUNE=0 f_part "$(dtype_of "$p")" 50 --part all
            sleep 5
            mark "gpu_report $p --no-autotune, cold (round $round)"
            m_step "$p" 50 --no-autotune
            sleep 5
            mark "pytorch $p, cold (round $round)"
            t_step "$p" 50
        done
    done
    mark "floor f16 all x$steps"
    f_part f16 "$steps" --part all
    mark "gpu_report mixed_float16 x$steps"
    m_step mixed_float16 "$steps"
    mark "pytorch mixed_float16 x$steps"
    t_step mixed_float16 "$steps"
    stop_sampler "$out"
}

case "${1:-}" in
build) build ;;
cold)
    shift
    cold "$@"
    ;;
tests) tests_only ;;
floor)
    shift
    floor "$@"
    ;;
run) run ;;
perf) perf ;;
ab)
    shift
    ab "$@"
    ;;
timeline)
    shift
    timeline "$@"
    ;;
sustained)
    shift
    sustained "$@"
    ;;
ncu)
    shift
    ncu_kernels "$@"
    ;;
*)
    echo "usage: $0 build|run|tests|perf|ncu KERNEL_REGEX...|timeline [POLICY]|ab FLAG POLICY...|sustained [POLICY [STEPS]]|floor [STEPS]|cold [STEPS]" >&2
    exit 2
    ;;
esac
