#!/usr/bin/env bash
# The one prepared GPU check of issue 7, for a lent GPU machine (one device call of at most
# 600 s holds some of its stages, not all: see the end of this header):
#   bash benchmarks/gpu_check.sh            # from the repository root; logs and JSON in $OUT
# 1. the card and the library versions, then the tests that have not yet run on a GPU
#    (FIRST_TESTS, under FIRST_TIMEOUT; see 7 for how they run);
# 2. benchmarks/train_mfu.py at a GPU size (D=1024, 12 layers, 16 heads, L=4096, bfloat16
#    outer matmuls, float32 inner state, the layer scan `scan_layers` so one block compiles),
#    MFU against the card's bf16 peak measured in the same process, one train_mfu call per
#    row of MFU_ROWS ("models|batch|extra arguments|VAR=value", rows separated by ";"; the
#    optional last field sets one environment variable for the row, e.g. XLA_FLAGS). The
#    default rows: hope at batch 4 with the chunk scan's carry kept every 8 of its 64 chunks
#    (`lm_grad_remat_every=8`: XLA:CPU plans 61 GiB of temporaries for it, against 199 GiB
#    for batch 4 without it, from `jit(...).lower().compile().memory_analysis()`; it held
#    62.0 GiB on an H100), then hope at batch 1 without it, the baseline of the same
#    machine (50.8 GiB on an H100 on 2026-11-26);
# 3. a profile of a 2-layer hope step (benchmarks/profile_step.py): kernel time by pass and
#    model part against the traced step's wall time, so idle device time shows;
# 4. the main job (`python -m hope_jax.train --config=experiments/base.py`) on the GPU, stopped
#    with SIGTERM once it logs step MAIN_STOP_AT (200), then the same command again, which
#    resumes from the checkpoint that SIGTERM saved and finishes the run (MAIN_JOB=0: skip);
# 5. the time to create a fresh train state (benchmarks/init_time.py: jitted, jitted with the
#    threefry random bits as one GPU kernel, eager), one call per row of INIT_ROWS
#    ("modes|arguments", rows separated by ";"; empty: none);
# 6. training runs of TRAIN_CONFIG (experiments/gpu_d1024.py), one per entry of TRAIN_RUNS
#    ("name|--config.x=... overrides", entries separated by ";"; empty, the default: none),
#    each for TRAIN_STEPS steps under TRAIN_TIMEOUT seconds, printing the step, evaluation
#    and health lines (e.g. the spec's memory_input_std against 0.005, which keeps the
#    fresh model calm on the default corpus); each run starts from an empty checkpoint folder;
# 7. the equivalence tests (chunked == per-token, fused == reference, streaming == parallel,
#    grouped == plain chunk scan) on the GPU, with float32 matmuls at 'highest' precision
#    (the GPU's default, TF32, is not what those tolerances are for), until DEADLINE
#    seconds after the start (570);
#    TEST_ENV=VAR=value sets one environment variable for the tests only (e.g. the XLA_FLAGS
#    of an MFU row, to check that it computes the same; tests/conftest.py adds its own
#    compile-time flags to an XLA_FLAGS, so the flags under test are the only change).
# Wheels under .whl/ (packages the machine lacks: ml_collections and tensorboardX; a flax
# that matches its jax) are installed first. Override the size for a CPU smoke run with
# MFU_SIZE, the rows with MFU_ROWS, the profile's arguments with PROFILE_ARGS (empty: no
# profile), the peak's matmul sizes with PEAK_SIZES, the tests run first with FIRST_TESTS
# (empty: none), and the time limits (seconds) with ROW_TIMEOUT (each MFU row, 150),
# TRAIN_TIMEOUT (each training run, 150),
# PROFILE_TIMEOUT (120), MAIN_TIMEOUT (each run of the main job, 150), INIT_TIMEOUT (each
# init row, 50) and FIRST_TIMEOUT (45). A device call (600 s at most) has room for the MFU
# rows, the profile and the tests, or for the main job, the init rows and the tests; skip
# the rest with MFU_ROWS="" PROFILE_ARGS="" or MAIN_JOB=0 INIT_ROWS="".
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/hope_jax_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/hope_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# JAX lets XLA use 75% of the card by default: hope at batch 4 (62 GiB) needs more.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
GPU_SIZE="--set=hidden_size=1024 --set=num_heads=16"
MFU_SIZE=${MFU_SIZE:-$GPU_SIZE --set=num_layers=12 --lengths=4096 --set=scan_layers=true}
MFU_ROWS=${MFU_ROWS-hope|4|--set=lm_grad_remat_every=8;hope|1|}
FIRST_TIMEOUT=${FIRST_TIMEOUT:-45}
DEADLINE=${DEADLINE:-570}
MAIN_JOB=${MAIN_JOB:-1}
MAIN_STOP_AT=${MAIN_STOP_AT:-200}
MAIN_TIMEOUT=${MAIN_TIMEOUT:-150}
INIT_TIMEOUT=${INIT_TIMEOUT:-50}
INIT_ROWS=${INIT_ROWS-jit,jit_kernel,eager|$GPU_SIZE --set=num_layers=4;jit_kernel,eager|$GPU_SIZE --set=num_layers=12}
ROW_TIMEOUT=${ROW_TIMEOUT:-150}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-120}
PEAK_SIZES=${PEAK_SIZES:-4096,8192}
TRAIN_CONFIG=${TRAIN_CONFIG:-experiments/gpu_d1024.py}
TRAIN_RUNS=${TRAIN_RUNS-}
TRAIN_STEPS=${TRAIN_STEPS:-60}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-150}
PROFILE_ARGS=${PROFILE_ARGS-$GPU_SIZE --set=num_layers=2 --set=dtype=bfloat16 --batch=1 --length=4096}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 \
  | tee "$OUT/device.txt"
python3 -c "import sys, jax, flax, optax; from importlib.metadata import version
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, 'orbax-checkpoint', version('orbax-checkpoint'), jax.devices())" 2>&1 \
  | tee -a "$OUT/device.txt"

# The tests that have not yet run on a GPU first, then (last stage) the whole set in the time
# left. SIGINT at the limit: pytest stops its xdist workers and prints its summary (a plain
# TERM left the workers compiling on the GPU while the benchmark ran, on 2026-11-26).
FIRST_TESTS=${FIRST_TESTS-tests/test_titans_layer.py::test_unrolled_chunk_scan_equals_the_loop}
run_tests() {  # run_tests NAME SECONDS PYTEST_ARGS...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  env ${TEST_ENV:+"$TEST_ENV"} JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout -s INT -k 20 "$limit" python3 -m pytest -v -n 8 \
    -p no:cacheprovider "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s; $(grep -c PASSED "$OUT/$name.log") passed," \
    "$(grep -c FAILED "$OUT/$name.log") failed lines"
  grep -E "FAILED|Error" "$OUT/$name.log" | head -20
  tail -3 "$OUT/$name.log"; echo
}
if [ -n "$FIRST_TESTS" ]; then
  echo "== tests not yet run on a GPU"
  # shellcheck disable=SC2086  # FIRST_TESTS is a list of test ids.
  run_tests tests_first "$FIRST_TIMEOUT" --dist load $FIRST_TESTS  # Not grouped by file.
fi

echo "== train MFU (the headline numbers first: the profile and tests take what time is left)"
row=0
IFS=';' read -ra rows <<< "$MFU_ROWS"
for spec in "${rows[@]}"; do
  IFS='|' read -r models batch extra envvar <<< "$spec"
  row=$((row + 1))
  # shellcheck disable=SC2086  # MFU_SIZE and extra are lists of arguments.
  env ${envvar:+"$envvar"} python3 benchmarks/train_mfu.py --models="$models" $MFU_SIZE $extra \
    --batch="$batch" --dtype=bfloat16 --peak_sizes="$PEAK_SIZES" --steps=3 \
    --timeout="$ROW_TIMEOUT" --json="$OUT/gpu_mfu_$row.json" 2> "$OUT/mfu_$row.err"
  echo "train_mfu row $row ($models, batch $batch, $extra${envvar:+, $envvar}): exit $?"
  grep "^\[" "$OUT/mfu_$row.err" | tail -6  # Stage timings of the row.
  grep -iE "error|out of memory" "$OUT/mfu_$row.err" | tail -3
done

if [ -n "$PROFILE_ARGS" ]; then
  echo "== profile of one hope step"
  # shellcheck disable=SC2086
  timeout -k 10 "$PROFILE_TIMEOUT" python3 benchmarks/profile_step.py --model=hope $PROFILE_ARGS --top=20 \
    --out=/tmp/hope_jax_prof > "$OUT/profile.txt" 2> "$OUT/profile.err"
  echo "profile_step: exit $?"
  cat "$OUT/profile.txt"
  tail -3 "$OUT/profile.err"
fi

if [ "$MAIN_JOB" = 1 ]; then
  echo "== the main job: SIGTERM at step $MAIN_STOP_AT, then the same command again"
  main=(python3 -m hope_jax.train --config=experiments/base.py
        --config.training.checkpoint_dir=/tmp/hope_jax_main --config.training.progress_bar=false)
  rm -rf /tmp/hope_jax_main
  start=$SECONDS
  "${main[@]}" > "$OUT/main_1.log" 2>&1 &
  pid=$!
  until grep -q "step $MAIN_STOP_AT/" "$OUT/main_1.log" || ! kill -0 $pid 2>/dev/null \
      || [ $((SECONDS - start)) -ge "$MAIN_TIMEOUT" ]; do sleep 0.2; done
  kill -TERM $pid 2>/dev/null
  stopped=$SECONDS  # It should save and stop within a step; KILL it after MAIN_TIMEOUT.
  while kill -0 $pid 2>/dev/null && [ $((SECONDS - stopped)) -lt "$MAIN_TIMEOUT" ]; do
    sleep 0.2
  done
  kill -KILL $pid 2>/dev/null
  wait $pid
  echo "first run: exit $? after $((SECONDS - start)) s (143: stopped by SIGTERM)"
  grep -E "Model:|step [0-9]+/|eval|SIGTERM|Interrupted|Error" "$OUT/main_1.log" | sed 's/^.*\] //' \
    | tail -12
  start=$SECONDS
  timeout -k 10 "$MAIN_TIMEOUT" "${main[@]}" > "$OUT/main_2.log" 2>&1
  echo "second run: exit $? after $((SECONDS - start)) s"
  grep -E "Latest|Resum|remain|step [0-9]+/|eval|Done|Error" "$OUT/main_2.log" \
    | sed 's/^.*\] //' | tail -25
fi

IFS=';' read -ra rows <<< "$INIT_ROWS"
for spec in "${rows[@]}"; do
  IFS='|' read -r modes extra <<< "$spec"
  echo "== fresh train state: $modes, $extra"
  # shellcheck disable=SC2086  # extra is a list of arguments.
  python3 benchmarks/init_time.py --modes="$modes" $extra --timeout="$INIT_TIMEOUT" 2>&1 | tail -6
done

IFS=';' read -ra rows <<< "$TRAIN_RUNS"
for spec in "${rows[@]}"; do
  IFS='|' read -r name extra <<< "$spec"
  echo "== training run $name: $TRAIN_CONFIG, $TRAIN_STEPS steps, $extra"
  start=$SECONDS
  rm -rf "/tmp/hope_jax_train_$name"  # A warm machine keeps the last call's: no quiet resume.
  # shellcheck disable=SC2086  # extra is a list of arguments.
  timeout -k 10 "$TRAIN_TIMEOUT" python3 -m hope_jax.train --config="$TRAIN_CONFIG" \
    --config.training.num_steps="$TRAIN_STEPS" --config.training.progress_bar=false \
    --config.training.checkpoint_dir="/tmp/hope_jax_train_$name" $extra > "$OUT/train_$name.log" 2>&1
  echo "training run $name: exit $? after $((SECONDS - start)) s"
  grep -E "Model:|step [0-9]+/|eval|health|Done|Error" "$OUT/train_$name.log" | sed 's/^.*\] //' \
    | tail -30
done

echo "== equivalence tests on $(python3 -c 'import jax; print(jax.default_backend())')"
left=$((DEADLINE - SECONDS))
if [ "$left" -ge 30 ]; then
  run_tests tests "$left" tests/test_lm.py tests/test_titans_ops.py tests/test_titans_layer.py \
    tests/test_cms.py tests/test_decode.py
else
  echo "no time left for the whole set ($left s before DEADLINE)"
fi
