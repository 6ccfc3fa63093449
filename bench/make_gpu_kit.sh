#!/usr/bin/env bash
# Builds .gpukit/ (keep it out of git), what bench/gpu_run.py needs on a GPU machine that has torch and
# transformers but no Ray and no PyPI: Ray (../shared/device/make-ray-kit.sh) and the embedded MiniLM's
# config and tokenizer (the models there get random weights: speed only).
#
# usage: bash bench/make_gpu_kit.sh [MAKE_RAY_KIT]
set -euo pipefail
cd "$(dirname "$0")/.."
make_ray_kit=${1:-../shared/device/make-ray-kit.sh}
rm -rf .gpukit && mkdir -p .gpukit/minilm
bash "$make_ray_kit" .gpukit/raykit
python - <<'PY'
import os, shutil
from bertjob import models
src = models.resolve_model(models.EMBEDDED)
for name in ("config.json", *models.TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), ".gpukit/minilm/")
PY
du -sh .gpukit
