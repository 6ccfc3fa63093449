#!/usr/bin/env bash
# Test accuracy on the full IMDb test set (25,000 reviews) with the embedded MiniLM-L6.
#
#   bash bench/quality_imdb.sh gpu [ARCHIVE]   # the full recipe, configs/imdb-1gpu.yaml, one GPU (target >= 93.0%)
#   bash bench/quality_imdb.sh cpu [ARCHIVE]   # what 2 CPU cores manage: 1 epoch at max_length 128
#
# Prints the test metrics of the best model (train job's own test evaluation).
set -euo pipefail
mode=${1:-gpu}
archive=${2:-../shared/data/aclImdb_v1.tar.gz}
out=${OUT:-bertjob-imdb-$mode}
if [ "$mode" = gpu ]; then
  bertjob pipeline --config configs/imdb-1gpu.yaml --input "$archive" --output-dir "$out" --infer-input ""
else
  bertjob prepare --input "$archive" --output "$out/prepared" --max-length 128 --head-tokens 64
  bertjob train --data "$out/prepared" --output "$out/train" --epochs 1 --num-workers 2 --cpus-per-worker 1 \
    --batch-size 32 --lr 1e-4 --log-every-steps 50 --name imdb-cpu
fi
python - "$out/train/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
t = m["test"]
print(f"test accuracy {t['accuracy']:.4f}  f1 {t['f1']:.4f}  roc_auc {t['roc_auc']:.4f}  n {t['count']}")
print(f"best epoch {m['best_epoch'] + 1}, val accuracy {m['best_val_accuracy']:.4f}, {m['train_samples_per_s']} samples/s, {m['wall_s']} s")
PY
