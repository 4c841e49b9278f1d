"""Inference verbs of the `dsv2` command line: generate, chat, serve, quantize.

    dsv2 generate --model runs/small --prompt "def fib(n):" --max-tokens 64
    dsv2 chat --model runs/chat                      # interactive; /reset clears the history, /exit or ^D quits
    dsv2 serve --model runs/chat --port 8000 --kv-cache-memory 2GB --kv-cache-dtype int8
    dsv2 quantize --model runs/small --out runs/small-fp8   # DeepSeek-style FP8 checkpoint (128x128 block scales)

The model directory is a checkpoint with tokenizer.json + tokenizer_config.json beside the weights (or give
--tokenizer). FP8 checkpoints load as FP8; --fp8 quantizes a full-precision one while loading.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from dsv2.utils import int_in, parse_size

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def add_commands(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="complete a prompt (streams to stdout)")
    _model_args(gen)
    gen.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    _sampling_args(gen, max_tokens=128, temperature=0.0)
    gen.set_defaults(func=_generate)

    chat = subparsers.add_parser("chat", help="interactive chat in the terminal (streaming)")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    _sampling_args(chat, max_tokens=512, temperature=0.7)
    chat.set_defaults(func=_chat)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/...)")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int_in(0, 65535), default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model id(s) the API accepts; the first is the one responses carry (default: the "
                            "checkpoint's _name_or_path in config.json, else 'dsv2')")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 503")
    serve.add_argument("--max-body-size", default="4MB", help="larger request bodies get 413 (e.g. 4MB, 100KB)")
    serve.add_argument("--max-stop-chars", type=int, default=1024, help="longest stop string accepted")
    serve.add_argument("--grace-period", type=float, default=30.0,
                       help="seconds SIGTERM lets in-flight requests finish before ending them with an error")
    serve.set_defaults(func=_serve)

    quant = subparsers.add_parser("quantize", help="write an FP8 (e4m3, 128x128 block scales) copy of a checkpoint")
    quant.add_argument("--model", required=True, help="input checkpoint directory (bf16/fp32)")
    quant.add_argument("--out", required=True, help="output checkpoint directory")
    quant.add_argument("--max-shard-size", default="5GB")
    quant.set_defaults(func=_quantize)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16, also on CPUs with AVX2 or better, where it reads half the "
                        "bytes of float32 per weight at the same speed; float32 on CPUs without)")
    p.add_argument("--fp8", action="store_true", help="quantize weights to FP8 on load (FP8 checkpoints always are)")
    p.add_argument("--kv-cache-memory", default="1GB", help="memory for the paged latent KV cache, e.g. 512MB")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8", "int8"],
                   help="storage of the latent cache (fp8/int8: 8 bits + one float32 scale per vector)")
    p.add_argument("--block-size", type=int_in(1), default=16, help="tokens per cache block")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-model-len", type=int_in(1), default=None, help="context limit (default: the model's)")
    p.add_argument("--admission", default="optimistic", choices=["optimistic", "reserve"],
                   help="optimistic: admit when the prompt fits, preempt on a full pool; reserve: admit only when "
                        "prompt + max_tokens fit (never preempts)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU); "
                   "`serve` compiles every shape of it before it starts listening")
    p.add_argument("--threads", type=int_in(1), default=None, help="torch CPU threads")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """The compute dtype of `--dtype auto`: bfloat16 on GPUs and on CPUs with AVX2 or better (bf16 matmuls run
    through oneDNN, natively with AVX512-BF16/AMX, by conversion in registers on plain AVX2: measured as fast per
    weight as float32 there, with half the bytes to read and half the KV cache); float32 on CPUs without."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    return torch.float32 if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX") else torch.bfloat16


def load_engine(args, max_waiting: int = 256):
    """(engine, tokenizer, chat template) for the parsed model arguments."""
    from dsv2.checkpoint import load_checkpoint
    from dsv2.infer.engine import Engine
    from dsv2.infer.text import ChatTemplate
    from dsv2.tokenizer import Tokenizer

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {args.model}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = auto_dtype(device)
    tok_dir = Path(args.tokenizer or args.model)
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (give --tokenizer DIR)")
    tokenizer = Tokenizer.load(tok_dir)
    model = load_checkpoint(args.model, dtype=dtype, device=device, fp8=True if args.fp8 else None)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    engine = Engine(model, args.kv_cache_memory, block_size=args.block_size,
                    kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
                    max_batch_size=args.max_batch_size, max_model_len=args.max_model_len, max_waiting=max_waiting,
                    eos_token_id=tokenizer.eos_id, compile=args.compile, admission=args.admission)
    capacity = engine.pool.num_blocks * engine.pool.block_size
    if engine.max_model_len > capacity:  # no request could use the whole context (chat's default max_tokens does)
        if args.max_model_len:
            raise ValueError(f"--max-model-len {args.max_model_len} is more than the KV cache pool holds ({capacity} "
                             f"tokens with --kv-cache-memory {args.kv_cache_memory}); raise --kv-cache-memory or "
                             "lower --max-model-len")
        print(f"dsv2: the KV cache pool holds {capacity} tokens, less than the model's context of "
              f"{engine.max_model_len}: the context is {capacity} tokens (raise --kv-cache-memory for more)",
              file=sys.stderr)
        engine.max_model_len = capacity
    return engine, tokenizer, ChatTemplate.from_dir(tok_dir, tokenizer)


def _sampling_fields(args):
    """The sampling flags checked by the server's own validation (dsv2.infer.api): ValueError naming the flag."""
    from dsv2.infer.api import sampling_fields

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    try:
        return sampling_fields(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               stop=args.stop, max_tokens=args.max_tokens)
    except ValueError as e:  # "invalid top_p: ..." -> "invalid --top-p: ..."
        msg = str(e)
        for name in ("temperature", "top_p", "top_k", "seed", "stop", "max_tokens"):
            msg = msg.replace(f"invalid {name}", "invalid --" + name.replace("_", "-"))
        raise ValueError(msg) from None


def _params(args, prompt_len: int, engine, tokenizer):
    from dsv2.infer.api import APIError, Limits, to_sampling_params

    limits = Limits(("cli",), engine.max_model_len, engine.model.config.vocab_size, eos_id=tokenizer.eos_id)
    room = engine.max_model_len - prompt_len
    if room < 1:
        raise ValueError(f"the prompt ({prompt_len} tokens) fills the context of {engine.max_model_len} tokens")
    try:  # --max-tokens beyond the context is cut to what is left (the CLI keeps going; the API refuses)
        return to_sampling_params(_sampling_fields(args), limits, prompt_len, max_tokens=min(args.max_tokens, room),
                                  default_max_tokens=None)
    except APIError as e:
        raise ValueError(e.message) from None


def stream_completion(engine, tokenizer, prompt: list[int], params, stop: list[str], out=None) -> dict:
    """Run one request in the foreground, writing its text to `out` (stdout) as it is generated."""
    from dsv2.infer.text import TextStream

    out = out or sys.stdout
    text = TextStream(tokenizer.decode, stop)
    rid = engine.add_request(prompt, params)
    start, first, n, reason = time.perf_counter(), None, 0, None
    while reason is None:
        for o in engine.step():
            if o.request_id != rid:
                continue
            first = first or time.perf_counter()
            n += len(o.token_ids)
            out.write(text.push(o.token_ids))
            if o.finished:
                reason = o.finish_reason
            elif text.stopped:
                engine.abort(rid)
                reason = "stop"
            out.flush()
    out.write(text.finish())
    out.flush()
    elapsed = time.perf_counter() - start
    return {"text": text.text, "tokens": n, "finish_reason": reason, "seconds": elapsed,
            "first_token_s": (first or start) - start}


def _generate(args) -> int:
    _sampling_fields(args)  # a bad flag fails before the model loads
    engine, tokenizer, template = load_engine(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = template.encode([{"role": "user", "content": text}]) if args.chat else tokenizer.encode(text, add_bos=True)
    stats = stream_completion(engine, tokenizer, prompt, _params(args, len(prompt), engine, tokenizer), args.stop)
    print()
    rate = stats["tokens"] / max(stats["seconds"], 1e-9)
    print(f"[{stats['tokens']} tokens, {rate:.1f} tok/s, first token {stats['first_token_s'] * 1000:.0f} ms, "
          f"finish: {stats['finish_reason']}]", file=sys.stderr)
    return 0


def _chat(args) -> int:
    _sampling_fields(args)  # a bad flag fails before the model loads
    engine, tokenizer, template = load_engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("dsv2 chat: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = template.encode(history)
        if len(prompt) >= engine.max_model_len:
            print(f"[the conversation ({len(prompt)} tokens) fills the context; /reset to start over]",
                  file=sys.stderr)
            history.pop()
            continue
        stats = stream_completion(engine, tokenizer, prompt, _params(args, len(prompt), engine, tokenizer),
                                  args.stop)
        print()
        history.append({"role": "assistant", "content": stats["text"]})


def _serve(args) -> int:
    from dsv2.infer.engine import EngineLoop
    from dsv2.infer.server import create_app, serve

    max_body = parse_size(args.max_body_size)
    if max_body < 1 or args.max_stop_chars < 1 or args.grace_period < 0 or args.max_queue < 1:
        raise ValueError("--max-body-size, --max-stop-chars and --max-queue must be positive, --grace-period >= 0")
    engine, tokenizer, template = load_engine(args, max_waiting=args.max_queue)
    if args.compile:
        print("dsv2 serve: compiling the decode step before serving (minutes on a CPU) ...", file=sys.stderr)
        t = time.perf_counter()
        engine.warmup()
        print(f"dsv2 serve: compiled in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    names = args.served_model_name or [_default_model_name(Path(args.model))]
    loop = EngineLoop(engine).start()
    stats = engine.stats()
    print(f"dsv2 serve: model {', '.join(map(repr, names))}, KV cache {stats['total_blocks']} blocks x {stats['block_size']} tokens "
          f"({stats['kv_cache_bytes'] / 2**20:.0f} MiB, {stats['kv_cache_dtype']}), context {engine.max_model_len}",
          file=sys.stderr)
    app = create_app(loop, tokenizer, template, names, engine.max_model_len, max_body_bytes=max_body,
                     max_stop_chars=args.max_stop_chars)
    try:
        code = serve(app, args.host, args.port, grace_s=args.grace_period)
    finally:
        loop.stop()
    return code


def _default_model_name(model_dir: Path) -> str:
    """What a user would type: the checkpoint's `_name_or_path` (config.json, as transformers writes it), else dsv2."""
    try:
        name = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    return name if isinstance(name, str) and name.strip() else "dsv2"


def _quantize(args) -> int:
    from dsv2.checkpoint import quantize_checkpoint

    src, out = Path(args.model), Path(args.out)
    if src.resolve() == out.resolve():
        raise ValueError("--out must differ from --model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty: quantize never replaces it; choose another --out or "
                         "remove it first")

    def copy_tokenizer(tmp: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)

    # tensor by tensor from the input files into the output shards: peak memory is about one tensor
    quantize_checkpoint(src, out, max_shard_size=args.max_shard_size, extra=copy_tokenizer)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote FP8 checkpoint to {out}: {size / 2**20:.1f} MiB of weights")
    return 0
