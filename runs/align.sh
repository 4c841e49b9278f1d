#!/usr/bin/env bash
# Alignment in miniature, on a CPU: the demo's pretrained `small` -> SFT on worked arithmetic solutions -> GRPO
# with the math reward (stage 1, reasoning) -> optionally GRPO on preference rewards (stage 2) -> a chat answer.
#
#   runs/align.sh                      # OUT=runs/align; every stage resumes, so running it again continues
#   STAGE2=1 runs/align.sh             # also: a reward model on the task's preference pairs, then stage 2
#   OUT=/tmp/a GRPO_STEPS=20 runs/align.sh
#
# GRPO clearly above SFT (docs/grpo.md): `make demo-full` runs this script with its knobs set (BASE: a model that
# copies numbers from its prompt, from runs/retrieval_base.sh; TASK_ARGS: SFT data where most solutions skip the
# working; FREEZE_LATENTS, SFT_STEPS, GRPO_*).
#
# Stage 1 prints held-out accuracy (greedy, EVAL_N=100 unseen problems) before GRPO (= the SFT model) and after it; the
# figures are in $OUT/grpo/metrics.jsonl (eval_accuracy at step 0 and at the end) and $OUT/grpo/reward.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/align}
DSV2=${DSV2:-.venv/bin/dsv2}
SFT_STEPS=${SFT_STEPS:-50}      # sized for a 2-core CPU shared with other work; more of each helps
GRPO_STEPS=${GRPO_STEPS:-20}
GRPO_BATCH=${GRPO_BATCH:-32}    # completions per rollout batch (G = 8 per prompt)
GRPO_LR=${GRPO_LR:-1e-4}
EVAL_N=${EVAL_N:-100}
EVAL_EVERY=${EVAL_EVERY:-10}
TASK_ARGS=${TASK_ARGS:---n-train 1000 --n-test 200 --steps 2 --max-number 10}
FREEZE=(${FREEZE_LATENTS:+--freeze-latents "$FREEZE_LATENTS"})  # keep a base's latents frozen, as it was trained
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # small models on a shared CPU: one thread per op is fastest
latest() { ls -d "$1"/checkpoints/step-* 2>/dev/null | tail -1; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

BASE=${BASE:-$(latest runs/demo)}
if [ -z "$BASE" ]; then
  stamp "no pretrained demo checkpoint: pretraining one (dsv2 demo, ~13 min)"
  $DSV2 demo
  BASE=$(latest runs/demo)
fi
stamp "base model: $BASE"

stamp "tasks"
# shellcheck disable=SC2086  # TASK_ARGS is a list of flags
[ -f "$OUT/tasks/prompts_test.jsonl" ] || $DSV2 tasks arithmetic --out "$OUT/tasks" $TASK_ARGS

stamp "SFT on the task's solutions ($SFT_STEPS steps of 16)"
$DSV2 sft --init-from "$BASE" --data "$OUT/tasks/sft.jsonl" --out "$OUT/sft" --resume --no-progress \
  --max-steps "$SFT_STEPS" --seq-len 128 --batch-size 16 --lr 1e-3 --warmup-steps 5 --eval-every 25 \
  --save-every 25 --keep-last 1 --log-every 5 ${FREEZE[@]+"${FREEZE[@]}"}
SFT=$(latest "$OUT/sft")

stamp "GRPO stage 1 (reasoning: math reward) from $SFT"
$DSV2 grpo --init-from "$SFT" --prompts "$OUT/tasks/prompts_train.jsonl" \
  --eval-prompts "$OUT/tasks/prompts_test.jsonl" --eval-samples "$EVAL_N" --reward math --stage reasoning \
  --out "$OUT/grpo" --resume --no-progress --max-steps "$GRPO_STEPS" --num-generations 8 --batch-size "$GRPO_BATCH" \
  --max-completion-tokens 40 --seq-len 128 --lr "$GRPO_LR" --beta 0.04 --eval-every "$EVAL_EVERY" --save-every 5 \
  --keep-last 1 ${FREEZE[@]+"${FREEZE[@]}"}
GRPO=$(latest "$OUT/grpo")

.venv/bin/python - "$OUT/grpo/metrics.jsonl" <<'EOF'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "eval_accuracy" in r]
print("held-out accuracy (greedy):", "  ".join(f"step {r['step']}: {r['eval_accuracy']:.3f}"
                                                          for r in evals))
print("tokens per greedy answer:", "  ".join(f"step {r['step']}: {r['eval_completion_len']:.1f}"
                                             for r in evals if "eval_completion_len" in r))
print(f"SFT model {evals[0]['eval_accuracy']:.3f} -> after GRPO {evals[-1]['eval_accuracy']:.3f}")
EOF

FINAL=$GRPO
if [ "${STAGE2:-0}" = 1 ]; then
  stamp "reward model on the task's preference pairs"
  $DSV2 rm train --init-from "$SFT" --data "$OUT/tasks/pairs.jsonl" --out "$OUT/rm" --resume --no-progress \
    --seq-len 128 --max-steps 50 --keep-last 1
  RM=$(latest "$OUT/rm")
  stamp "GRPO stage 2 (preference: reward model + safety rule + format rule) from $GRPO"
  $DSV2 grpo --init-from "$GRPO" --prompts "$OUT/tasks/prompts_train.jsonl" \
    --eval-prompts "$OUT/tasks/prompts_test.jsonl" --eval-samples "$EVAL_N" --stage preference \
    --reward "rm:$RM:1.0" --reward safety:0.5 --reward format:0.2 --reward math:0.5 \
    --out "$OUT/grpo_pref" --resume --no-progress --max-steps "${PREF_STEPS:-20}" --num-generations 8 \
    --batch-size 32 --max-completion-tokens 40 --seq-len 128 --lr 2e-5 --eval-every 10 --save-every 10 --keep-last 1
  FINAL=$(latest "$OUT/grpo_pref")
fi

stamp "a sampled chat answer from $FINAL"
PROMPT=$(.venv/bin/python -c "import json; print(json.loads(open('$OUT/tasks/prompts_test.jsonl').readline())['prompt'])")
echo "User: $PROMPT"
echo "$PROMPT" | $DSV2 chat --model "$FINAL" --max-tokens 40 --temperature 0 --dtype float32
