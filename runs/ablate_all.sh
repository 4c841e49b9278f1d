#!/usr/bin/env bash
# The ablation studies of docs/ablations.md, one after another, with the settings used there: a 1024-token
# tokenizer trained on the first 8 MB of the Python standard library (by the first study, then shared), the CLI's
# default scale (h=64, 3 layers, 120 steps of 8 x 64 tokens), seeds 0-2 for attention and MoE, 0-1 for balance and
# routing, one thread per process (the machine was shared by seven agents; several OpenMP threads per process only
# spun against each other there). About 45 minutes there; a finished run is read back, not trained again. Last, the
# copy study (its own scale: h=128, 2 layers, 1500 steps of 16 x 128; runs/demo's tokenizer when present), all four
# attention variants and MLA with --freeze-latents, then MLA again for 4000 steps: about 13 and 35 minutes a run on one core.
#   bash runs/ablate_all.sh            # tables: runs/ablate_*/table.md, figures: runs/ablate_*/*.png
set -euo pipefail
cd "$(dirname "$0")/.."
DSV2=${DSV2:-.venv/bin/dsv2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--max-bytes 8000000 --no-progress)
"$DSV2" ablate attention --out runs/ablate_attention --vocab-size 1024 --seeds 0,1,2 "${COMMON[@]}" "$@"
TOK=(--tokenizer runs/ablate_attention/tokenizer)
"$DSV2" ablate moe --out runs/ablate_moe "${TOK[@]}" --seeds 0,1,2 "${COMMON[@]}" "$@"
"$DSV2" ablate balance --out runs/ablate_balance "${TOK[@]}" --seeds 0,1 "${COMMON[@]}" "$@"
"$DSV2" ablate routing --out runs/ablate_routing "${TOK[@]}" --seeds 0,1 "${COMMON[@]}" "$@"
# the attention claim again with 4x the tokens (480 steps, 246k tokens per run), MLA and MHA only
"$DSV2" ablate attention --out runs/ablate_attention_long "${TOK[@]}" --steps 480 --evals 4 --variants MLA,MHA \
  --seeds 0,1 "${COMMON[@]}" "$@"
# when does each attention learn to copy from its context (section 5)
"$DSV2" ablate copy --out runs/ablate_copy --seeds 0 \
  --variants MHA,GQA-2,MQA,MLA,MLA-frozen-latents,MLA-narrow-frozen-latents --no-progress "$@"
"$DSV2" ablate copy --out runs/ablate_copy_long --seeds 0 --variants MLA --steps 4000 --no-progress "$@"
