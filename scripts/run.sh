#!/usr/bin/env bash
# The main job: quantize the real trained stories260K model with `anyquant quantize`
# (compressed-tensors W4A16, int4 groups of 32, as llm-compressor writes it) and generate a story
# from the quantized checkpoint. Without ../shared, a tiny
# random-weight Llama is built instead (and the output is gibberish, said so below).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
src=../shared/models/stories260K/hf
if [ ! -f "$src/config.json" ]; then
  echo "../shared/models/stories260K is absent: using a tiny RANDOM-WEIGHT Llama (expect gibberish)"
  src=out/random-llama
  python -m anyquant.utils.tiny_model "$src"
fi
dst=out/stories260K-w4a16-g32
anyquant quantize "$src" "$dst" --format compressed-tensors --scheme W4A16 --group-size 32 --overwrite
anyquant inspect "$dst"
anyquant generate "$dst" --prompt "${PROMPT:-Once upon a time}" --max-tokens "${MAX_TOKENS:-200}"
