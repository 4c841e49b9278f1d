#!/usr/bin/env bash
# One prepared check for a CUDA machine (PyTorch preinstalled, no network; installs nothing), under 8 minutes:
#   1. versions (nvidia-smi, torch, CUDA, transformers, fastapi)
#   2. the gpu-marked tests: bf16 parity with transformers, grouped-mm vs loop experts, FP8 (dequantized, and the
#      torch._scaled_mm tensor-core path with block scales), compiled vs eager decode
#   3. the server tests, if fastapi/uvicorn/httpx/openai are importable (else skipped, said so)
#   4. training tokens/s (forward + backward, bf16 autocast) on a V2-Lite-width model with 4 layers, random weights,
#      dsv2 vs transformers (if installed), with the fraction of the measured bf16 matmul peak
#   5. decode tokens/s on the same shape in bf16: dsv2.generate, the Engine, and transformers' generate
#   6. the Engine with compile=True (CUDA graphs), if time is left
#
#   bash benchmarks/gpu_check.sh             # from the repo root; outputs under $OUT if set, else benchmarks/results/
#   bash benchmarks/gpu_check.sh --dry-run   # (also what happens without CUDA) the same steps at tiny sizes on the
#                                            # CPU to check the commands, gpu tests shown skipped; exits 0
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: the whole run's wall-clock budget).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$SECONDS
declare -a SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# stage NAME MAX_SECONDS CMD...: runs CMD under a timeout of min(MAX_SECONDS, time left), logs it, records status
stage() {
    local name="$1" max="$2"; shift 2
    local t; t=$(left)
    [ "$t" -gt "$max" ] && t="$max"
    if [ "$t" -lt 20 ]; then
        say "== $name: SKIPPED (budget spent)"; SUMMARY+=("$name: skipped (budget spent)"); return
    fi
    say "== $name (timeout ${t}s): $*"
    local s=$SECONDS
    timeout "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status="ok"
    [ "$rc" -eq 124 ] && status="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAILED (exit $rc)"
    [ "$rc" -ne 0 ] && FAILED=1
    SUMMARY+=("$name: $status, $((SECONDS - s)) s")
}
skip() { say "== $1: SKIPPED ($2)"; SUMMARY+=("$1: skipped ($2)"); }

say "== versions"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1 | tee -a "$LOG"; else say "nvidia-smi: not found"; fi
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then say "dsv2 does not import (PYTHONPATH=src): stopping"; exit 1; fi
import importlib, platform, torch, dsv2
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
for m in ("transformers", "pytest", "fastapi", "uvicorn", "httpx", "openai", "safetensors", "tokenizers"):
    try:
        print(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m}: not available ({type(e).__name__})")
EOF
CUDA=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && CUDA=1
if [ "$CUDA" -eq 0 ] && [ "$DRY" -eq 0 ]; then say "no CUDA device: running the dry run instead"; DRY=1; fi
HF_FLAG=""
has transformers || HF_FLAG="--no-hf"

# ---- 2. gpu-marked tests (dry run: the same command; without CUDA every test shows as skipped with its reason)
if has pytest; then
    K=()
    has transformers || K=(-k "not transformers")  # the parity test needs the oracle
    [ ${#K[@]} -gt 0 ] && say "transformers missing: the bf16 parity test is deselected"
    [ "$DRY" -eq 1 ] && [ "$CUDA" -eq 1 ] && K+=(--collect-only)  # an explicit dry run on a GPU machine
    stage "gpu tests" 210 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py ${K[@]+"${K[@]}"} \
        --junitxml="$OUT_DIR/gpu_tests.xml"
else
    skip "gpu tests" "pytest is not installed"
fi

# ---- 3. server tests
if [ "$DRY" -eq 1 ]; then
    skip "server tests" "dry run: they need no GPU and run in make test"
elif has pytest && has fastapi && has uvicorn && has httpx && has openai; then
    stage "server tests" 60 "$PY" -m pytest -q -x -p no:cacheprovider tests/infer/test_server.py
else
    skip "server tests" "pytest, fastapi, uvicorn, httpx or openai is not installed"
fi

# ---- 4. training throughput
if [ "$DRY" -eq 1 ]; then
    stage "train throughput (dry: tiny, CPU)" 120 "$PY" benchmarks/train_throughput.py --shape tiny --layers 2 \
        --batch 2 --seq 32 --repeats 1 --device cpu --out "$OUT_DIR" $HF_FLAG
else
    stage "train throughput" 120 "$PY" benchmarks/train_throughput.py --shape v2-lite --layers 4 --batch 4 \
        --seq 512 --repeats 3 --out "$OUT_DIR" $HF_FLAG
fi

# ---- 5./6. decode throughput: dsv2.generate, the Engine (eager, then compiled) and transformers, same weights
DECODE_PY="$(mktemp --suffix=.py)"
trap 'rm -f "$DECODE_PY"' EXIT
cat >"$DECODE_PY" <<'EOF'
import argparse, sys, tempfile, time
import torch
sys.path.insert(0, "benchmarks")
import common
from common import save, shape_config, table
from dsv2 import DeepseekV2, generate, save_checkpoint
from dsv2.infer.engine import Engine, SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="v2-lite"); ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--batch", type=int, nargs="+", default=[1, 16]); ap.add_argument("--prompt-len", type=int, default=64)
ap.add_argument("--new-tokens", type=int, default=64); ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--device", default="cuda"); ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--compile", action="store_true"); ap.add_argument("--no-hf", action="store_true")
ap.add_argument("--out", required=True); ap.add_argument("--name", default="gpu_decode")
args = ap.parse_args()
common.RESULTS = __import__("pathlib").Path(args.out)
dev, dtype = args.device, getattr(torch, args.dtype)
cfg = shape_config(args.shape, num_hidden_layers=args.layers)
torch.manual_seed(0)
with torch.device(dev):
    model = DeepseekV2(cfg).to(dtype).eval()
hf = None
if not args.no_hf:
    from transformers import DeepseekV2ForCausalLM
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, d)
        hf = DeepseekV2ForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
    hf.generation_config.eos_token_id = None

def sync():
    if dev == "cuda":
        torch.cuda.synchronize()

rows, n = [], args.new_tokens
for B in args.batch:
    ids = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
    prompts = ids.tolist()
    engine = Engine(model, "2GB" if dev == "cuda" else "64MB", max_batch_size=B, prefill_chunk=4096,
                    eos_token_id=None, compile=args.compile)
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    fns = {"dsv2 Engine" + (" compiled" if args.compile else ""): lambda: [r.token_ids for r in engine.generate(prompts, params)]}
    if not args.compile:
        fns["dsv2.generate"] = lambda: generate(model, prompts, max_new_tokens=n)
        if hf is not None:
            x = ids.to(dev)
            fns["transformers"] = lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                                      do_sample=False, pad_token_id=cfg.pad_token_id)[:, args.prompt_len:].tolist()
    out, best = {}, {k: float("inf") for k in fns}
    with torch.inference_mode():
        for k, fn in fns.items():
            t = time.perf_counter(); out[k] = fn(); sync()
            print(f"batch {B} {k}: first run (warmup{', compile' if args.compile else ''}) {time.perf_counter() - t:.1f} s", flush=True)
        for _ in range(args.repeats):  # interleaved
            for k, fn in fns.items():
                t = time.perf_counter(); fn(); sync(); best[k] = min(best[k], time.perf_counter() - t)
    ref = out.get("transformers", next(iter(out.values())))
    for k, secs in best.items():
        same = sum(a == b for r, o in zip(ref, out[k]) for a, b in zip(r, o)) / (B * n)
        rows.append({"system": k, "batch": B, "tok/s": B * n / secs, "ms/step": 1000 * secs / n,
                     "speedup vs HF": best["transformers"] / secs if "transformers" in best else None,
                     "same tokens as ref": same})
print(f"decode, {args.shape} width, {args.layers} layers, {args.dtype} on {dev}, prompt {args.prompt_len}, "
      f"{n} new tokens, greedy, best of {args.repeats} (ref: transformers if present)")
print(table(rows, ["system", "batch", "tok/s", "ms/step", "speedup vs HF", "same tokens as ref"]))
print(f"wrote {save(args.name, {'args': vars(args), 'rows': rows})}")
EOF
if [ "$DRY" -eq 1 ]; then
    stage "decode throughput (dry: tiny, CPU)" 120 "$PY" "$DECODE_PY" --shape tiny --layers 2 --batch 1 2 --prompt-len 8 \
        --new-tokens 4 --repeats 1 --device cpu --dtype float32 --out "$OUT_DIR" $HF_FLAG
    skip "decode, compiled Engine" "dry run: compiling takes minutes on a CPU (tests/infer covers it)"
else
    stage "decode throughput" 120 "$PY" "$DECODE_PY" --out "$OUT_DIR" $HF_FLAG
    stage "decode, compiled Engine" 150 "$PY" "$DECODE_PY" --compile --out "$OUT_DIR" --name gpu_decode_compiled --no-hf
fi

say ""
say "== summary ($((SECONDS - START)) s; outputs in $OUT_DIR)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
if [ "$DRY" -eq 1 ]; then say "dry run: nothing above ran on a GPU"; exit 0; fi
exit "$FAILED"
