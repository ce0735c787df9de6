#!/usr/bin/env bash
# The main job: quantize the real trained stories260K model with `anyquant quantize` (GPTQ int4,
# group 32) and generate a story from the quantized checkpoint. Without ../shared, a tiny
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
anyquant quantize "$src" out/stories260K-gptq-int4 --format gptq --bits 4 --group-size 32 --sym --overwrite
anyquant inspect out/stories260K-gptq-int4
anyquant generate out/stories260K-gptq-int4 --prompt "${PROMPT:-Once upon a time}" --max-tokens "${MAX_TOKENS:-200}"
