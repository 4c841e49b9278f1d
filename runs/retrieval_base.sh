#!/usr/bin/env bash
# A small model that retrieves needles at its trained length (256), from scratch on a CPU, for runs/long_context.sh
# to extend: the demo model cannot copy from its context at all, so it has nothing to extend (docs/long_context.md).
#
#   bash runs/retrieval_base.sh                  # writes runs/retrieval_base/ (each stage resumes)
#   OUT=/tmp/rb RETRIEVAL_STEPS=1000 bash runs/retrieval_base.sh
#   OUT=runs/retrieval_base4 LAYERS=4 RETRIEVAL_STEPS=250 bash runs/retrieval_base.sh   # make demo-long's deeper base
#   bash runs/retrieval_base.sh && BASE=$(ls -d runs/retrieval_base/retrieval/checkpoints/step-* | tail -1) \
#     RETRIEVAL_STEPS=0 FREEZE_LATENTS=1000000 EXTEND_STEPS=200 EXTEND_BATCH=2 TRIALS=4 bash runs/long_context.sh
#
# The model: `small`'s recipe at 2 layers of width 128 (4 heads, dense FFN, 1.5M parameters) with latents as wide
# as the hidden state, held orthogonal throughout (--freeze-latents): the lever that lets MLA learn to copy at this
# size (docs/ablations.md section 5). Three stages, constant learning rate 1e-3, one thread each:
# 1. copy: random spans of 256 palette tokens, each written 4 times (seq 128): the induction pattern forms (loss
#    falls from 4.8 at step 900 to 3.1 at 1,000), but only for strings of random symbols, not inside text;
# 2. mixed copy: palette spans of letters and digits amid windows of corpus text (--copy-source mixed, seq 256): the
#    same pattern where a needle sits;
# 3. retrieval: half key-value retrieval sequences (needles in corpus text, then their questions and answers), half
#    mixed copy sequences (dsv2 extend --rope none --seq-len 256: no scaling, the trained length).
# Each stage ends with `dsv2 eval niah` at 256 (NIAH accuracy, copy check after bos and inside text).
set -euo pipefail
cd "$(dirname "$0")/.."
DSV2=${DSV2:-.venv/bin/dsv2}
OUT=${OUT:-runs/retrieval_base}
COPY_STEPS=${COPY_STEPS:-1500}
MIXED_STEPS=${MIXED_STEPS:-1000}
RETRIEVAL_STEPS=${RETRIEVAL_STEPS:-1500}
LAYERS=${LAYERS:-2}  # decoder layers (all with a dense FFN)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
latest() { ls -d "$1"/checkpoints/step-* 2>/dev/null | sort | tail -1 || true; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
mkdir -p "$OUT"
cat > "$OUT/model.toml" <<EOF
[model]
hidden_size = 128
num_hidden_layers = $LAYERS
num_attention_heads = 4
q_lora_rank = 128
kv_lora_rank = 128
qk_nope_head_dim = 32
qk_rope_head_dim = 8
v_head_dim = 32
intermediate_size = 256
first_k_dense_replace = $LAYERS
EOF
COMMON=(--max-steps 100000 --schedule constant --lr 1e-3 --batch-size 16 --max-bytes 5000000 --eval-every 250
        --save-every 250 --eval-batches 1 --log-every 25 --keep-last 2 --seed 0 --no-progress --freeze-latents 1000000)
stage() {  # dir, steps, command...: runs the stage to `steps` (resuming one cut off), then checks it
  local dir=$1 steps=$2 last; shift 2
  last=$(latest "$dir")
  if [ -z "$last" ] || [ "$((10#${last##*step-}))" -lt "$steps" ]; then
    stamp "$dir: to step $steps"
    $DSV2 "$@" --stop-after "$steps" --out "$dir" "${COMMON[@]}" ${last:+--resume}
  fi
  stamp "$dir: $(latest "$dir")"
  $DSV2 eval niah --model "$(latest "$dir")" --lengths 256 --depths 50 --trials 8 --max-model-len 300 \
    --out "$dir/eval" --no-progress | grep -E "^accuracy|copy check"
}

stage "$OUT/copy" "$COPY_STEPS" pretrain --preset small --config "$OUT/model.toml" --init-std 0.02 \
  --tokenizer-max-bytes 5000000 --copy-fraction 1.0 --seq-len 128 --warmup-steps 10
stage "$OUT/mixed" "$MIXED_STEPS" pretrain --init-from "$OUT/copy/checkpoints/step-$(printf %08d "$COPY_STEPS")" \
  --copy-fraction 1.0 --copy-source mixed --copy-vocab 36 --seq-len 256 --warmup-steps 10
stage "$OUT/retrieval" "$RETRIEVAL_STEPS" extend \
  --init-from "$OUT/mixed/checkpoints/step-$(printf %08d "$MIXED_STEPS")" --rope none --seq-len 256 \
  --kv-fraction 0.5 --copy-fraction 0.5 --copy-source mixed --copy-vocab 36 --val-fraction 0.005 --warmup-steps 5
stamp "base for runs/long_context.sh: BASE=$(latest "$OUT/retrieval")"
