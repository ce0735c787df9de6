#!/usr/bin/env bash
# Creates .venv and installs anyquant with its test tools. Idempotent: re-running is quick.
# torch is installed first as the CPU build 2.13.0: letting pip resolve a bare `torch` would pull
# gigabytes of CUDA wheels. Every later install sees torch already satisfied. Everything is installed
# at the exact versions of constraints.txt, so a new release on the registry cannot change what a
# fresh machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.anyquant-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
  python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
  # The grammar engine for structured outputs, without its declared triton dependency (1 GB, used
  # only by its GPU path); its other requirements are already installed above.
  python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps \
    xgrammar apache-tvm-ffi
  python - <<'PY'
import torch, sys
if "+cpu" not in torch.__version__ and not torch.cuda.is_available():
    sys.exit(f"unexpected torch build {torch.__version__}")
PY
  echo "$want" > "$stamp"
fi
# Build the C++ CPU kernels now (cached under ~/.cache/anyquant, rebuilt only when their sources,
# flags or torch change), so tests and the first `generate` do not pay the compile. Not fatal: a
# failed build prints the reason and the pure-torch kernels serve.
python -m anyquant.quant.kernels.cpu_ext
