#!/usr/bin/env bash
# Long context in miniature (the paper's section 3.3 and figure 4): YaRN extension of the demo's `small` model from
# its trained length (256) by a factor 8 to 2048, compared with plain position interpolation (PI) and no scaling at
# the same steps, data and seed; needle-in-a-haystack grids and loss-by-position curves for each.
#
#   make demo-long                               # the run that works: a 4-layer base from runs/retrieval_base.sh
#   bash runs/long_context.sh                    # writes runs/long_context/ (summary.json, niah_grids.png, ppl.png)
#   RETRIEVAL_STEPS=200 EXTEND_STEPS=100 bash runs/long_context.sh   # longer (the defaults fit a shared 2-core CPU)
#   BASE=CKPT FREEZE_LATENTS=1000000 bash runs/long_context.sh   # another base (one that copies), its latents held
#   KV_FRACTION=0.5 COPY_FRACTION=0.25 bash runs/long_context.sh  # the retrieval stage's mixture (default 0.9 / 0)
#   COPY_SOURCE=mixed COPY_VOCAB=36 ...          # its copy spans amid text, of letters and digits
#   EXTEND_DATA="--kv-fraction 0.5 --copy-fraction 0.5 --copy-source mixed --copy-vocab 36" ...  # extension mixture
#   ROPES=yarn bash runs/long_context.sh & ROPES=pi bash runs/long_context.sh   # variants side by side (same OUT)
#
# 1. retrieval: the demo model (runs/demo, `dsv2 demo` makes it) only saw Python; it is first taught the needle
#    format at its own length 256 (dsv2 extend --rope none --seq-len 256: no scaling, 90% synthetic key-value
#    retrieval sequences), so that there is a skill to extend at all. Its NIAH grid shows where it fails (> 256).
# 2. extension: from that checkpoint, --rope yarn / pi / none, --factor 8 --seq-len 2048, EXTEND_STEPS steps each,
#    the same data (corpus blocks and retrieval sequences) and seed.
# 3. evaluation: dsv2 eval niah (lengths 256..2048, depths 0/50/100%) and dsv2 eval ppl (loss by position over
#    2048-token documents) for all four checkpoints; summary.json, niah_grids.png and ppl.png side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
DSV2=${DSV2:-.venv/bin/dsv2}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/long_context}
RETRIEVAL_STEPS=${RETRIEVAL_STEPS:-60}
EXTEND_STEPS=${EXTEND_STEPS:-8}
EXTEND_BATCH=${EXTEND_BATCH:-2}
LENGTHS=${LENGTHS:-256,512,1024,2048}
DEPTHS=${DEPTHS:-0,50,100}
TRIALS=${TRIALS:-2}
PPL_SEQUENCES=${PPL_SEQUENCES:-4}
KV_FRACTION=${KV_FRACTION:-0.9}      # the retrieval stage's mixture: key-value retrieval sequences ...
COPY_FRACTION=${COPY_FRACTION:-0}    # ... and copy sequences (the rest is corpus text)
COPY_SOURCE=${COPY_SOURCE:-random}   # the copy sequences' spans: random / text / mixed (dsv2 extend --copy-source)
COPY_VOCAB=${COPY_VOCAB:-}           # palette size for random and mixed spans (unset: dsv2's; 36: letters, digits)
FREEZE_LATENTS=${FREEZE_LATENTS:-0}  # > 0: every stage holds the base's latent down-projections (--freeze-latents)
EXTEND_DATA=${EXTEND_DATA:---kv-fraction 0.75 --kv-max-needles 8}  # the extension's mixture (word-split flags)
start=$(date +%s)
mkdir -p "$OUT"

latest() { ls -d "$1"/checkpoints/step-* 2>/dev/null | sort | tail -1; }

BASE=${BASE:-$(latest runs/demo)}
if [ -z "$BASE" ]; then
  $DSV2 demo
  BASE=$(latest runs/demo)
fi
echo "base: $BASE (trained at $($PY -c "from dsv2.train.extend import trained_length; print(trained_length('$BASE'))") tokens)"

VAL_FRACTION=${VAL_FRACTION:-0.005}
COMMON=(--max-bytes 5000000 --val-fraction "$VAL_FRACTION" --eval-batches 1 --log-every 1 --keep-last 1 --seed 0 \
        --no-progress --freeze-latents "$FREEZE_LATENTS")

# memory: one training step (forward + backward, micro-batch 1) at the longest length, in a fresh process: the peak
# resident set over the step, minus the resident set before it (the model, optimizer-free). Training attention is
# SDPA (model/attention.py _naive, is_causal): no per-head [T, T] score tensor is materialised for it.
[ -f "$OUT/memory.json" ] || $PY - "$BASE" "$OUT/memory.json" <<'MEM'
import json, resource, sys, time
import torch
import torch.nn.functional as F
from dsv2.checkpoint import load_checkpoint
model = load_checkpoint(sys.argv[1], dtype=torch.float32).train()
x = torch.randint(0, model.config.vocab_size, (1, 2049))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (ru_maxrss is KiB on Linux)
before, t = rss(), time.perf_counter()
loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
loss.backward()
res = {"seq_len": 2048, "micro_batch": 1, "rss_before_mib": round(before), "peak_rss_mib": round(rss()),
       "step_peak_minus_before_mib": round(rss() - before), "step_s": round(time.perf_counter() - t, 1),
       "per_head_scores_if_materialised_mib_per_layer": model.config.num_attention_heads * 2048 * 2048 * 4 / 2**20}
json.dump(res, open(sys.argv[2], "w"), indent=1)
print("memory of one training step at 2048:", res)
MEM

# 1. the retrieval skill at the trained length (RETRIEVAL_STEPS=0: none; the extensions start from the demo model)
SHORT=$BASE
if [ "$RETRIEVAL_STEPS" -gt 0 ] && [ -z "$(latest "$OUT/retrieval")" ]; then
  $DSV2 extend --init-from "$BASE" --rope none --seq-len 256 --steps "$RETRIEVAL_STEPS" --batch-size 16 \
    --kv-fraction "$KV_FRACTION" --copy-fraction "$COPY_FRACTION" --copy-source "$COPY_SOURCE" \
    ${COPY_VOCAB:+--copy-vocab "$COPY_VOCAB"} --lr 1e-3 --warmup-steps 5 \
    --eval-every "$RETRIEVAL_STEPS" --save-every "$RETRIEVAL_STEPS" \
    --out "$OUT/retrieval" "${COMMON[@]}"
fi
[ "$RETRIEVAL_STEPS" -gt 0 ] && SHORT=$(latest "$OUT/retrieval")

evaluate() {  # checkpoint, output dir
  $DSV2 eval niah --model "$1" --lengths "$LENGTHS" --depths "$DEPTHS" --trials "$TRIALS" --max-model-len 2100 \
    --out "$2" --no-progress
  $DSV2 eval ppl --model "$1" --seq-len 2048 --sequences "$PPL_SEQUENCES" --batch-size 2 --max-model-len 2100 \
    --out "$2" --no-progress | tail -1
}
mkdir -p "$OUT/short" && echo "$SHORT" > "$OUT/short/checkpoint.txt"
[ -f "$OUT/short/eval/niah.json" ] || evaluate "$SHORT" "$OUT/short/eval"

# 2. extension to 2048: YaRN, PI, none (ROPES: some of them, e.g. one per concurrent run of this script)
for rope in ${ROPES:-yarn pi none}; do
  if [ -z "$(latest "$OUT/$rope")" ]; then
    $DSV2 extend --init-from "$SHORT" --rope "$rope" --factor 8 --seq-len 2048 --steps "$EXTEND_STEPS" \
      --batch-size "$EXTEND_BATCH" --micro-batch-size 1 $EXTEND_DATA --lr 1e-3 \
      --warmup-steps 2 --eval-every "$EXTEND_STEPS" --save-every "$EXTEND_STEPS" --out "$OUT/$rope" "${COMMON[@]}"
  fi
  [ -f "$OUT/$rope/eval/niah.json" ] || evaluate "$(latest "$OUT/$rope")" "$OUT/$rope/eval"
done

# 3. side by side
OUT="$OUT" ELAPSED=$(( $(date +%s) - start )) $PY - <<'EOF'
import json, os
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from dsv2.eval.ppl import plot_ppl

out = Path(os.environ["OUT"])
runs = {"trained at 256, no scaling": "short", "YaRN x8 -> 2048": "yarn", "PI x8 -> 2048": "pi",
        "no scaling -> 2048": "none"}
summary, ppl = {"wall_s": int(os.environ["ELAPSED"])}, {}
done = {n: d for n, d in runs.items() if (out / d / "eval" / "ppl.json").is_file()}
# top row: exact retrieval; bottom row: digits right in place (partial credit, chance 0.1)
fig, axes = plt.subplots(2, len(done), figsize=(3.3 * len(done), 6.0), sharey=True, squeeze=False)
for ax, ax2, (name, d) in zip(axes[0], axes[1], done.items()):
    p = json.loads((out / d / "eval" / "ppl.json").read_text())
    ppl[name] = p["buckets"]
    summary[d] = {"loss_first_256": float(np.mean([b["loss"] for b in p["buckets"] if b["end"] <= 256])),
                  "loss_after_256": float(np.mean([b["loss"] for b in p["buckets"] if b["start"] >= 256]))}
    ax.set_title(name, fontsize=9)
    if not (out / d / "eval" / "niah.json").is_file():
        ax.text(0.5, 0.5, "NIAH not run", ha="center", transform=ax.transAxes)
        ax2.set_axis_off()
        continue
    niah = json.loads((out / d / "eval" / "niah.json").read_text())
    summary[d].update(niah_by_length=niah["mean"], niah_accuracy=niah["accuracy"],
                      niah_digits_by_length=niah.get("digit_mean"), niah_digit_accuracy=niah.get("digit_accuracy"),
                      copy_accuracy=niah.get("copy_accuracy"), copy_in_text_accuracy=niah.get("copy_in_text_accuracy"))
    for a, key in ((ax, "accuracy"), (ax2, "digit_accuracy")):
        if key not in niah:
            a.set_axis_off()
            continue
        a.imshow(np.asarray(niah[key]).T, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        a.set_xticks(range(len(niah["lengths"])), niah["lengths"])
        a.set_yticks(range(len(niah["depths"])), [f"{x}%" for x in niah["depths"]])
    ax2.set_xlabel("context length")
axes[0][0].set_ylabel("exact: needle depth")
axes[1][0].set_ylabel("digits right: needle depth")
fig.colorbar(matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="RdYlGn"),
             ax=axes.ravel().tolist(), label="retrieval accuracy (exact / digits)")
fig.savefig(out / "niah_grids.png", dpi=70)
plot_ppl(ppl, out / "ppl.png", trained=256)
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"{'model':<32} NIAH accuracy by length        loss<256  loss>=256  copy check (plain / in text)")
for name, d in done.items():
    s = summary[d]
    checks = " / ".join("-" if s.get(k) is None else f"{s[k]:.2f}" for k in ("copy_accuracy", "copy_in_text_accuracy"))
    print(f"{name:<32} {json.dumps(s.get('niah_by_length', 'not run')):<30} {s['loss_first_256']:8.3f}  "
          f"{s['loss_after_256']:8.3f}  {checks}")
    if s.get("niah_digits_by_length"):
        print(f"{'  digits right in place':<32} {json.dumps(s['niah_digits_by_length'])}")
print(f"wall time {summary['wall_s']} s; wrote {out}/summary.json, niah_grids.png, ppl.png")
EOF
