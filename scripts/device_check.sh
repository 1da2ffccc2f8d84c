#!/usr/bin/env bash
# Device check of the fused Pallas kernels on an NVIDIA GPU, in at most 10 minutes.
#
# For a machine that already has JAX with CUDA; installs nothing. Runs from the repository
# root with it on PYTHONPATH:
#   1. tests/test_pallas.py on the GPU: the compiled kernels against float64 (forward and
#      backward, fp32 and bf16), plus the interpret-mode and lowering tests; and the
#      compiled kernels with closures, bias and dropout against the XLA engine;
#   2. a trimmed experiments/gpu.toml sweep (8k and 32k, head_dim 128; the full preset
#      takes longer), resumable: rerun to add the points a timeout left out;
#   3. its report (time, TFLOP/s, memory) and the environment,
# all under experiments/results/<device>/ (e.g. experiments/results/nvidia-h200/).
#
#   bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

DEVICE=$(python - <<'PY'
import re, jax
d = jax.devices()[0]
print(re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-") if d.platform == "gpu" else "")
PY
)
if [ -z "$DEVICE" ]; then
  echo "device_check.sh: no GPU visible to JAX (jax.devices()[0] is not a GPU)" >&2
  exit 1
fi
OUT="experiments/results/$DEVICE"
mkdir -p "$OUT"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || true
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
} > "$OUT/environment.txt"

echo "== 1/3 tests/test_pallas.py on $DEVICE"
timeout 200 python -m pytest tests/test_pallas.py -q -p no:cacheprovider -o addopts="" \
  tests/test_pallas_mods.py::test_compiled_closures_bias_dropout_on_the_accelerator \
  2>&1 | tee "$OUT/test_pallas.txt"
tests=${PIPESTATUS[0]}

echo "== 2/3 experiments/gpu.toml (trimmed: 8k and 32k, head_dim 128)"
timeout 330 python -m efficient_attn sweep experiments/gpu.toml --seq-lens 8192,32768 \
  --head-dim 128 --repeats 3 --timeout 60 --out "$OUT/gpu" --no-report
sweep=$?

echo "== 3/3 report"
python -m efficient_attn report "$OUT/gpu" && sed -n 1,200p "$OUT/gpu/report.md"

echo "tests exit $tests, sweep exit $sweep (124: the time limit; rerun to resume); results in $OUT"
[ "$tests" -eq 0 ]
