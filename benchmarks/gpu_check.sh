#!/usr/bin/env bash
# The one prepared GPU check of issue 7, for a lent GPU machine (one call: 363 s on an H100):
#   bash benchmarks/gpu_check.sh            # from the repository root; logs and JSON in $OUT
# 1. the card and the library versions;
# 2. benchmarks/train_mfu.py at a GPU size (D=1024, 12 layers, 16 heads, L=4096, bfloat16
#    outer matmuls, float32 inner state), MFU against the card's bf16 peak measured in the
#    same process: transformer_pp, hope and hope with static CMS at batch 1 (hope's per-chunk
#    residuals hold every layer's fast weights: XLA:CPU plans 51 GiB of temporaries for this
#    step at batch 1 and 199 GiB at batch 4), with the layer scan (`scan_layers`): a
#    12-layer step then compiled in 14-63 s on an H100 (hope without it: 113 s on the CPU,
#    not tried on the GPU);
# 3. the equivalence tests (chunked == per-token, fused == reference, streaming == parallel)
#    on the GPU, with float32 matmuls at 'highest' precision (the GPU's default, TF32, is
#    not what those tolerances are for).
# Wheels under .whl/ (packages the machine lacks: ml_collections; a flax that matches its
# jax) are installed first. Override the size for a CPU smoke run with MFU_SIZE, the rows
# with MFU_MODELS, the batch with MFU_BATCH, the peak's matmul sizes with PEAK_SIZES, and the
# time limits with TEST_TIMEOUT / ROW_TIMEOUT.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/hope_jax_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/hope_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
MFU_SIZE=${MFU_SIZE:---set=hidden_size=1024 --set=num_layers=12 --set=num_heads=16 --lengths=4096 --set=scan_layers=true}
MFU_MODELS=${MFU_MODELS:-transformer_pp,hope,hope_static}
MFU_BATCH=${MFU_BATCH:-1}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
ROW_TIMEOUT=${ROW_TIMEOUT:-140}
PEAK_SIZES=${PEAK_SIZES:-4096,8192}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 \
  | tee "$OUT/device.txt"
python3 -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__,
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/device.txt"

echo "== train MFU (the headline numbers first: the tests take what time is left)"
# shellcheck disable=SC2086  # MFU_SIZE is a list of arguments.
python3 benchmarks/train_mfu.py --models="$MFU_MODELS" $MFU_SIZE --batch="$MFU_BATCH" \
  --dtype=bfloat16 --peak_sizes="$PEAK_SIZES" --steps=3 --timeout="$ROW_TIMEOUT" \
  --json="$OUT/gpu_mfu.json" 2> "$OUT/mfu.err"
echo "train_mfu: exit $?"
grep "^\[" "$OUT/mfu.err" | tail -12  # Stage timings of each row.
grep -iE "error|out of memory" "$OUT/mfu.err" | tail -3

echo "== equivalence tests on $(python3 -c 'import jax; print(jax.default_backend())')"
start=$SECONDS
# SIGINT at the limit: pytest stops its xdist workers and prints its summary (a plain TERM
# left the workers compiling on the GPU while the benchmark ran, on 2026-11-26).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s INT -k 20 "$TEST_TIMEOUT" python3 -m pytest -v -n 8 \
  -p no:cacheprovider tests/test_lm.py tests/test_titans_ops.py tests/test_titans_layer.py \
  tests/test_cms.py tests/test_decode.py > "$OUT/tests.log" 2>&1
echo "tests: exit $? after $((SECONDS - start)) s; $(grep -c PASSED "$OUT/tests.log") passed," \
  "$(grep -c FAILED "$OUT/tests.log") failed lines"
grep -E "FAILED|Error" "$OUT/tests.log" | head -20
tail -3 "$OUT/tests.log"; echo

