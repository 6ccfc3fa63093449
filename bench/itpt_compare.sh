#!/usr/bin/env bash
# Within-task pre-training (ITPT), controlled: the same fine-tuning recipe from the embedded MiniLM-L6
# with and without a short `bertjob pretrain` on the same data, each scored on the same held-out reviews.
#
#   bash bench/itpt_compare.sh [ARCHIVE]          # full IMDb on CPU: ~1 h of pre-training + 2 fine-tunings
#   SCALE=toy bash bench/itpt_compare.sh          # rehearsal on the shipped sample: a few steps of each
#
# Data: the corpus is prepared twice with the same seed: at max_length 512 (head+tail) as text for
# pre-training (unsup + train: ~90% of IMDb's tokens survive truncation) and at 128 (head 64) for
# fine-tuning. Same ids, same seed, so both hold the same validation rows, which the script checks;
# pre-training never reads validation or test. Both fine-tunings score the same test split (the train
# job's own evaluation of its best model). Knobs: PT_STEPS, FT_EPOCHS, FT_STEPS (a cap), OUT.
set -euo pipefail
archive=${1:-../shared/data/aclImdb_v1.tar.gz}
scale=${SCALE:-full}
out=${OUT:-bertjob-itpt-compare-$scale}
if [ "$scale" = toy ]; then
  archive=imdb-sample
  pt_steps=${PT_STEPS:-4}
  ft=(--max-steps "${FT_STEPS:-6}" --batch-size 16 --log-every-steps 2)  # scores all 1,000 test reviews
  pt_extra=(--log-every-steps 2 --checkpoint-every-steps 0)
else
  pt_steps=${PT_STEPS:-3000}  # x 32 sequences of 128 tokens: ~0.6 epoch of IMDb's unsup + train
  ft=(--epochs "${FT_EPOCHS:-1}" ${FT_STEPS:+--max-steps "$FT_STEPS"} --batch-size 32 --log-every-steps 50)
  pt_extra=(--log-every-steps 50 --checkpoint-every-steps 500)
fi
# One worker with both cores: on 2 cores it beats two 1-core DDP workers (README, train bench).
workers=(--num-workers 1 --cpus-per-worker 2)
finetune=(train --lr 1e-4 --layer-lr-decay 0.95 --warmup-ratio 0.1 "${workers[@]}" "${ft[@]}")
pretrain=(pretrain --max-length 128 --max-steps "$pt_steps" --batch-size 32 --lr 1e-4
  --warmup-ratio 0.06 "${workers[@]}" "${pt_extra[@]}")

bertjob prepare --input "$archive" --output "$out/prepared-512" --max-length 512
bertjob prepare --input "$archive" --output "$out/prepared-128" --max-length 128 --head-tokens 64
python - "$out" <<'PY'
import sys, pyarrow.parquet as pq
ids = [set(pq.read_table(f"{sys.argv[1]}/prepared-{n}/validation", columns=["id"]).column("id").to_pylist()) for n in (512, 128)]
assert ids[0] == ids[1], "the two prepared copies hold different validation rows"
print(f"same {len(ids[0])} validation rows in both prepared copies")
PY

bertjob "${finetune[@]}" --data "$out/prepared-128" --model minilm --output "$out/baseline" --name baseline
bertjob "${pretrain[@]}" --data "$out/prepared-512" --model minilm --output "$out/itpt" --name itpt
bertjob "${finetune[@]}" --data "$out/prepared-128" --model "$out/itpt/model" --output "$out/itpt-finetuned" --name itpt-ft

python - "$out" "$(printf '%q ' bertjob "${finetune[@]}")" "$(printf '%q ' bertjob "${pretrain[@]}")" <<'PY'
import json, os, platform, sys
out, ft_cmd, pt_cmd = sys.argv[1:]
sys.path.insert(0, "bench")  # run from the repository root
from common import machine

base = json.load(open(f"{out}/baseline/metrics.json"))
pre = json.load(open(f"{out}/itpt/metrics.json"))
cand = json.load(open(f"{out}/itpt-finetuned/metrics.json"))
assert base["test"]["count"] == cand["test"]["count"]
rows = [("fine-tuning only", base), ("ITPT, then the same fine-tuning", cand)]
print(f"\nITPT comparison on {machine()}")
print(f"pre-training: {pre['steps']} steps, {pre['samples_seen']} sequences of <= {pre['max_length']} tokens "
      f"from {pre['splits']}, MLM loss {pre['history'][0]['loss']:.3f} -> {pre['final_mlm_loss']:.3f} "
      f"(perplexity {pre['final_perplexity']:.1f}), {pre['train_time_s']} s")
for name, m in rows:
    t = m["test"]
    print(f"{name:34s} test accuracy {t['accuracy']:.4f}  f1 {t['f1']:.4f}  roc_auc {t['roc_auc']:.4f}  "
          f"n {t['count']}  val {m['validation']['accuracy']:.4f}  {m['train_time_s']} s")
print(f"difference {cand['test']['accuracy'] - base['test']['accuracy']:+.4f}")
print(f"recipes:\n  fine-tune: {ft_cmd}\n  pretrain:  {pt_cmd}")
json.dump({"machine": machine(), "python": platform.python_version(), "pretrain": {k: pre[k] for k in ("steps", "samples_seen", "final_mlm_loss", "final_perplexity", "train_time_s", "splits", "config")},
           "baseline": {"test": base["test"], "config": base["config"]}, "itpt": {"test": cand["test"], "config": cand["config"]},
           "finetune_command": ft_cmd, "pretrain_command": pt_cmd}, open(f"{out}/itpt_compare.json", "w"), indent=2, default=str)
PY
