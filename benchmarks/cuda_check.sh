#!/usr/bin/env bash
# The GPU check in one call: the CUDA tests (tests/cuda) and the decode/prefill table of
# benchmarks/cuda_decode.py, with the GPU name and driver, a short summary printed last.
# Installs nothing. Needs a Python whose torch is a CUDA build that sees a GPU, plus anyquant's
# runtime dependencies (safetensors, tokenizers, jinja2, numpy) and pytest + transformers for the
# tests. The repository's .venv holds the CPU build of torch, so on a GPU machine the script looks
# for another interpreter first: $PYTHON, then python3, then .venv/bin/python.
# Logs and the JSON results go to $OUT when it is set (else out/cuda-check/).
# Budget: at most about 8 minutes on one H100 (tests 4 min at most, benchmark 3.5 min at most).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-out/cuda-check}
mkdir -p "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export ANYQUANT_EXTENSION_DIR=${ANYQUANT_EXTENSION_DIR:-/tmp/anyquant-ext-cuda-check}
export ANYQUANT_ENFORCE_EAGER=1  # CUDA graphs / compiled steps are not built for CUDA yet
# The tests' conftest sets torch's CPU threads from OMP_NUM_THREADS (1 by default, for CI): the CPU
# references and the quantization of the benchmark model want every core here.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 8)}

PY=""
for cand in ${PYTHON:-} python3 .venv/bin/python; do
  [ -n "$cand" ] || continue
  command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=$cand
    break
  fi
  echo "skipping $cand: $("$cand" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda, "sees no GPU")' 2>&1 | tail -1)"
done
if [ -z "$PY" ]; then
  echo "SUMMARY: nothing ran. No Python here has a CUDA build of torch that sees a GPU."
  echo "Needs: an NVIDIA driver (nvidia-smi), and torch built for CUDA (pip install torch from the"
  echo "download.pytorch.org/whl/cu12x index into the interpreter given as PYTHON=...); scripts/setup.sh"
  echo "installs the CPU build on purpose."
  exit 2
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["safetensors", "tokenizers", "jinja2", "numpy", "pytest", "transformers"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "SUMMARY: nothing ran. $PY lacks: $missing (pip install them into it; anyquant needs no other package here)"
  exit 2
fi

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$OUTDIR/nvidia_smi.txt"
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"python {__import__("sys").version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s), {p.name} sm{p.major}{p.minor}")'

echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda 2>&1 | tee "$OUTDIR/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E "passed|failed|error" "$OUTDIR/cuda_tests.log" | tail -1)
[ "$tests_rc" = 124 ] && tests_line="TIMED OUT after 240 s: $tests_line"

echo "== benchmark"
timeout 210 "$PY" benchmarks/cuda_decode.py --json "$OUTDIR/cuda_bench.json" 2>&1 | tee "$OUTDIR/cuda_bench.log"
bench_rc=${PIPESTATUS[0]}
bench_line=$(grep "^SUMMARY" "$OUTDIR/cuda_bench.log" | tail -1)
[ -n "$bench_line" ] || bench_line="benchmark failed (exit $bench_rc): $(tail -1 "$OUTDIR/cuda_bench.log")"

echo
echo "SUMMARY tests (exit $tests_rc): $tests_line"
echo "$bench_line"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
