"""The serving engine: continuous batching over a paged latent KV cache. Token ids in, token ids out.

Each `step()` admits waiting requests while the block pool has room (FIFO), then runs at most two forwards:
one decode forward over every request with exactly one token not yet cached (batch [B, 1], absorbed MLA over
its blocks), and one prefill forward over requests with more (prompts, in chunks of at most `prefill_chunk`
tokens per step in total, so a long prompt never stalls the running requests for long). Requests join and leave
between steps. Blocks are allocated as a request grows; when the pool runs dry the newest request is preempted:
its blocks are freed and it goes back to the head of the queue with prompt + output so far as its new prompt
(recomputed later, vLLM's "recompute" preemption). A request that could never fit (prompt + max_tokens beyond
the pool or the context) is refused when it is added, and `add_request` raises QueueFull when `max_waiting`
requests are already queued.

    engine = Engine(model, kv_cache_memory="256MB")
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8))   # offline use

`EngineLoop` runs the engine in a background thread for the HTTP server: `submit` returns at once and the
callback receives each step's `RequestOutput` for that request (from the engine thread).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsv2.infer.paged import PagedBatch, PagedLatentPool
from dsv2.infer.sampling import sample_next
from dsv2.model import DeepseekV2
from dsv2.model.fp8 import is_fp8

log = logging.getLogger(__name__)
MAX_LOGPROBS = 20


_COMPILED: "weakref.WeakKeyDictionary[DeepseekV2, dict]" = weakref.WeakKeyDictionary()


def compiled(model: DeepseekV2, compile: bool | str = True):
    """The model's forward under torch.compile for decode steps, made once per model and backend (dsv2.generate
    and every Engine over the same model share it), called like the model. What is compiled is
    `model.layers_forward`; the step's host bookkeeping (the cache's Python lengths) runs eagerly around it
    (`DeepseekV2.run_step`), which marks the batch dimension dynamic and has the step read every cache slot its
    rows own (masked past each row's end). So one graph serves every batch size above 1 and every length (batch 1
    and one-block tables get their own: torch specialises sizes 0 and 1). Compiling the whole forward instead made
    a graph for each batch size a serving engine ran.

    The parameters are inputs of the compiled graph, read afresh at every step: a weight changed in place (an
    optimizer step between rollouts) or replaced shows up without a recompile (tests/infer/test_engine.py).
    inductor's freezing option is not used: it would fold the weights into the code as constants (for FP8 models,
    dequantized: at full size), and in ad hoc timings with torch 2.13 it made the step no faster. On CPU the
    graph's kernels are called from inductor's C++ wrapper rather than a Python one (less of the per-step overhead
    that bounds batch-1 decode), and the compiled code is keyed by torch's thread count: inductor writes its
    kernels for the threads there are when it compiles (OpenMP loops only with more than one), so a forward
    compiled at one thread and run at two would keep single-threaded kernels. On CUDA, inductor captures CUDA
    graphs ("reduce-overhead").
    """
    backend = compile if isinstance(compile, str) else "inductor"
    cuda = model.lm_head.weight.device.type == "cuda"
    per_model = _COMPILED.setdefault(model, {})
    threads = None if cuda else torch.get_num_threads()
    hit = per_model.get(backend)  # (the thread count compiled for, the compiled forward)
    if hit is None or hit[0] != threads:
        if hit is not None:
            torch._dynamo.reset()  # drop the kernels written for the old thread count
        cpp = backend == "inductor" and not cuda and not is_fp8(model)
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        fn = torch.compile(model.layers_forward, mode=mode, backend=backend,
                           options={"cpp_wrapper": True} if cpp else None)
        per_model[backend] = hit = (threads, functools.partial(model.run_step, layers=fn))  # called like the model
    return hit[1]


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; 0: the chosen token's; k: also the k most likely (<= 20)
    # None: off; k >= 0: the log-prob of every prompt token after the first (and its k most likely), computed by
    # the prefill forward itself; with max_tokens 0 the request ends after its prefill
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Range-check every field (a value that passes must never fail inside the batched step)."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0 or (
                self.max_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(f"max_tokens must be a positive integer (0 only with prompt_logprobs), "
                             f"got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:  # also refuses NaN
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be in [0, 2**31), got {self.top_k}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")


@dataclass
class RequestOutput:
    """What one step produced for one request (usually one token)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos / stop token), "length", "abort", "error"
    logprobs: list[float] | None = None  # of the chosen tokens
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # with params.prompt_logprobs, on the request's first output: (logprob, top [(id, logprob)]) of prompt
    # tokens 1.. (token 0 has none)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seq: int  # arrival order; preemption takes the newest
    tokens: list[int] = field(default_factory=list)  # prompt + output
    blocks: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens whose latents are in the blocks
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    prompt_lps: list | None = None  # prompt log-probs gathered so far (kept over a preemption), None once sent

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def pending(self) -> int:  # tokens still to feed: 1 when decoding, more while (re)filling the cache
        return len(self.tokens) - self.n_cached


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # see RequestOutput


class Engine:
    """Continuous-batching generation for one DeepseekV2 model on one device.

    kv_cache_memory: bytes (int or "512MB") for the block pool; or give num_blocks. kv_cache_dtype: None (the
    model's dtype), "bf16", "fp16", "fp32", "fp8" or "int8" (8-bit with per-token scales). Prefill and decode
    both run the model's own forward (absorbed MLA over the blocks for decode and chunked prefill). compile:
    torch.compile that forward for decode steps (off by default: eager is the CPU path; on CUDA this also captures
    CUDA graphs); a string names the torch.compile backend instead of inductor (e.g. "aot_eager").
    eos_token_id: -1 takes the config's, None never stops on eos.
    admission: "optimistic" admits a request when its prompt fits (blocks for its output are taken as it grows,
    preempting the newest request when the pool runs dry: best memory use when outputs end early);
    "reserve" admits it only when prompt + max_tokens fit beside what the running requests may still need
    (no preemption ever: best when outputs run to max_tokens).
    """

    def __init__(self, model: DeepseekV2, kv_cache_memory: int | str | None = "1GB", *, num_blocks: int | None = None,
                 block_size: int = 16, kv_cache_dtype: str | None = None, max_batch_size: int = 64,
                 prefill_chunk: int = 512, max_waiting: int = 256, max_model_len: int | None = None,
                 eos_token_id: int | None = -1, compile: bool | str = False, admission: str = "optimistic"):
        self.model = model.eval()
        cfg = model.config
        p = model.lm_head.weight
        self.device = p.device
        dtype = p.dtype if p.is_floating_point() and p.dtype != torch.float8_e4m3fn else torch.bfloat16
        if num_blocks is not None:
            self.pool = PagedLatentPool(cfg, num_blocks, block_size, kv_cache_dtype, dtype, self.device)
        else:
            self.pool = PagedLatentPool.from_memory(cfg, kv_cache_memory, block_size, kv_cache_dtype, dtype,
                                                    self.device)
        if max_batch_size < 1 or prefill_chunk < 1 or max_waiting < 0:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1, max_waiting >= 0")
        if admission not in ("optimistic", "reserve"):
            raise ValueError(f"admission must be 'optimistic' or 'reserve', got {admission!r}")
        self.admission = admission
        self.max_batch_size, self.prefill_chunk, self.max_waiting = max_batch_size, prefill_chunk, max_waiting
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self.eos_token_id = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._watermark = max(1, self.pool.num_blocks // 100)  # headroom kept when admitting, against thrashing
        self.num_preemptions = self.num_aborted = 0
        self.compile = compile

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError if it can never run, QueueFull if the queue is full."""
        params = params or SamplingParams()
        self.check(prompt, params)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        req = Request(rid, list(prompt), params, seq=next(self._ids), tokens=list(prompt),
                      prompt_lps=[] if params.prompt_logprobs is not None else None)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError if this request could never run (reads only the engine's fixed limits)."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop token ids must be in [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"the context length of {self.max_model_len} tokens")
        capacity = self.pool.num_blocks * self.pool.block_size
        if total > capacity:
            raise ValueError(f"prompt + max_tokens = {total} tokens can never fit the KV cache pool of "
                             f"{capacity} tokens; raise --kv-cache-memory")

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Cancel a request and free its blocks; False if it is unknown or already finished. reason: its
        finish_reason; only "abort" counts in stats()["aborted"] (a caller that ended it on a stop string of its
        own passes "stop")."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._release(req)
        req.finish_reason = reason
        self.num_aborted += reason == "abort"
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "free_blocks": self.pool.num_free,
                "total_blocks": self.pool.num_blocks, "block_size": self.pool.block_size,
                "kv_cache_bytes": self.pool.nbytes(),
                "kv_cache_dtype": self.pool.kv_dtype or str(self.pool.dtype).removeprefix("torch."),
                "preemptions": self.num_preemptions, "aborted": self.num_aborted}

    # ---- blocks --------------------------------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        self.pool.free(req.blocks)
        req.blocks = []
        req.n_cached = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _reserve(self, req: Request, n_tokens: int) -> bool:
        """Make req's blocks cover n_cached + n_tokens, preempting newer requests if the pool is dry. False if
        req itself was preempted (it is the newest and still does not fit)."""
        need = self.pool.blocks_for(req.n_cached + n_tokens) - len(req.blocks)
        while need > self.pool.num_free:
            victim = max(self.running, key=lambda r: r.seq)
            self._preempt(victim)
            if victim is req:
                return False
        req.blocks += self.pool.allocate(max(need, 0))
        return True

    def _admit(self) -> None:
        free = self.pool.num_free  # minus what this round's admissions will take for their first chunk
        reserved = sum(self._worst_case(r) for r in self.running)
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            if self.admission == "reserve":
                if reserved + self._worst_case(req) > self.pool.num_blocks:
                    break
                reserved += self._worst_case(req)
            else:
                need = self.pool.blocks_for(min(req.pending, self.prefill_chunk))
                headroom = self._watermark if self.running else 0
                if need + headroom > free:
                    break
                free -= need
            self.waiting.popleft()
            self.running.append(req)

    def _worst_case(self, req: Request) -> int:
        return self.pool.blocks_for(len(req.prompt) + req.params.max_tokens)

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit, run one decode forward and/or one prefill forward, sample; returns this step's outputs.

        A request that fails inside the step (its forward or its sampling raises) ends alone, with finish_reason
        "error": a batch that raises is run again row by row (a row's forward rewrites the same cache slots, and
        nothing is changed before a row's forward and sampling have both succeeded), so the others go on."""
        self._admit()
        outputs: list[RequestOutput] = []
        decode = [r for r in list(self.running) if r.pending == 1 and r in self.running and self._reserve(r, 1)]
        decode = [r for r in decode if r in self.running]  # reserving for a later row may preempt an earlier one
        if decode:
            outputs += self._isolated(self._decode, [(r, 1) for r in decode])
        live, budget = [], self.prefill_chunk  # (request, chunk length)
        for r in list(self.running):
            if budget == 0:
                break
            if r.pending > 1 and r in self.running:
                n = min(r.pending, budget)
                if self._reserve(r, n):
                    live.append((r, n))
                    budget -= n
        live = [(r, n) for r, n in live if r in self.running]  # a later reservation may have preempted it
        if live:
            outputs += self._isolated(self._prefill, live)
        return outputs

    def _isolated(self, run, rows: list[tuple[Request, int]]) -> list[RequestOutput]:
        try:
            return run(rows)
        except Exception:
            if len(rows) > 1:
                return [o for row in rows for o in self._isolated(run, [row])]
            log.exception("request %s failed in the engine; it ends with an error", rows[0][0].id)
            return [self._fail(rows[0][0])]

    def _fail(self, req: Request) -> RequestOutput:
        self.running.remove(req)
        self.requests.pop(req.id, None)
        self._release(req)
        req.finish_reason = "error"
        return RequestOutput(req.id, [], True, "error", num_prompt_tokens=len(req.prompt),
                             num_output_tokens=req.num_output)

    def _decode(self, rows: list[tuple[Request, int]]) -> list[RequestOutput]:
        reqs = [r for r, _ in rows]
        ids = torch.tensor([[r.tokens[-1]] for r in reqs], device=self.device)
        batch = PagedBatch(self.pool, [r.blocks for r in reqs], [r.n_cached for r in reqs])
        step_model = compiled(self.model, self.compile) if self.compile else self.model
        logits = step_model(ids, cache=batch)[:, 0]
        keep = [b for b, r in enumerate(reqs) if r.params.max_tokens > 0]  # (a last prompt token can land here)
        sampled = self._sample([reqs[b] for b in keep], logits[keep]) if keep else None
        for r in reqs:
            r.n_cached += 1
        outputs = self._append([reqs[b] for b in keep], sampled) if keep else []
        return outputs + [self._prompt_only(r) for r in reqs if r.params.max_tokens == 0]

    def _prompt_only(self, r: Request) -> RequestOutput:
        """End a max_tokens 0 request once its prompt is in: its output is the prompt's log-probs."""
        out = RequestOutput(r.id, [], True, "length", num_prompt_tokens=len(r.prompt))
        out.prompt_logprobs, r.prompt_lps = r.prompt_lps, None
        r.finish_reason = "length"
        self.running.remove(r)
        self.requests.pop(r.id, None)
        self._release(r)
        return out

    def _prefill(self, rows: list[tuple[Request, int]]) -> list[RequestOutput]:
        """One forward over the rows' next prompt chunks; rows whose chunk ends their prompt are sampled."""
        reqs, n_new = [r for r, _ in rows], [n for _, n in rows]
        ids = torch.zeros(len(rows), max(n_new), dtype=torch.long)
        for b, (r, n) in enumerate(rows):
            ids[b, :n] = torch.tensor(r.tokens[r.n_cached:r.n_cached + n])
        batch = PagedBatch(self.pool, [r.blocks for r in reqs], [r.n_cached for r in reqs])
        last = torch.tensor([n - 1 for n in n_new], device=self.device)
        want_prompt = [b for b, r in enumerate(reqs) if r.prompt_lps is not None]
        # logits at every position only when a row asks for its prompt's log-probs ([B, T, V] then, else [B, V])
        logits = self.model(ids.to(self.device), cache=batch, input_lengths=n_new,
                            output_positions=None if want_prompt else last)
        prompt_lps = {b: self._prompt_logprobs(reqs[b], logits[b, :n_new[b]]) for b in want_prompt}
        if want_prompt:
            logits = logits[torch.arange(len(rows), device=logits.device), last]
        done = [b for b, (r, n) in enumerate(rows) if n == r.pending]  # the chunk ends the prompt: sample
        to_sample = [b for b in done if reqs[b].params.max_tokens > 0]
        sampled = None
        if to_sample:
            idx = torch.tensor(to_sample, device=logits.device)
            sampled = self._sample([reqs[b] for b in to_sample], logits.index_select(0, idx))
        for b, (r, n) in enumerate(rows):  # nothing has failed: commit
            r.n_cached += n
            if b in prompt_lps:
                r.prompt_lps += prompt_lps[b]
        outputs = self._append([reqs[b] for b in to_sample], sampled) if to_sample else []
        return outputs + [self._prompt_only(reqs[b]) for b in done if reqs[b].params.max_tokens == 0]

    def _prompt_logprobs(self, r: Request, logits: torch.Tensor) -> list:
        """(logprob, top-k) of the prompt tokens this chunk's logits [n, V] predict and r has not got yet (a
        preempted request recomputes its prompt: those are skipped)."""
        first = r.n_cached + 1  # logits[j] predict token n_cached + j + 1
        lo = max(len(r.prompt_lps) + 1, first)
        hi = min(len(r.prompt), r.n_cached + logits.shape[0] + 1)
        if lo >= hi:
            return []
        lp = logits[lo - first:hi - first].float().log_softmax(dim=-1)
        target = torch.tensor(r.prompt[lo:hi], device=lp.device)
        chosen = lp.gather(1, target[:, None])[:, 0].tolist()
        k = r.params.prompt_logprobs
        tops = [[]] * len(chosen)
        if k:
            vals, idx = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return list(zip(chosen, tops))

    def _sample(self, reqs: list[Request], logits: torch.Tensor):
        """(tokens, chosen log-probs, top log-probs) for each row; changes nothing (a row may still fail)."""
        ps = [r.params for r in reqs]
        if all(p.temperature <= 0 for p in ps):
            tokens = logits.argmax(dim=-1)
        else:
            dev = logits.device
            states = [r.generator.get_state() if r.generator is not None else None for r in reqs]
            try:
                tokens = sample_next(logits, torch.tensor([p.temperature for p in ps], device=dev),
                                     torch.tensor([p.top_k for p in ps], device=dev),
                                     torch.tensor([p.top_p for p in ps], device=dev), [r.generator for r in reqs])
            except Exception:  # rows drawn before the failure get their seeded stream back for the retry
                for r, st in zip(reqs, states):
                    if st is not None:
                        r.generator.set_state(st)
                raise
        chosen_lp = top = None
        want = [p.logprobs for p in ps if p.logprobs is not None]
        if want:
            lp = logits.float().log_softmax(dim=-1)
            chosen_lp = lp.gather(1, tokens[:, None])[:, 0].tolist()
            k = max(want)
            if k:
                vals, idx = lp.topk(k, dim=-1)
                top = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return tokens.tolist(), chosen_lp, top

    def _append(self, reqs: list[Request], sampled) -> list[RequestOutput]:
        tokens, chosen_lp, top = sampled
        outputs = []
        for b, (r, t) in enumerate(zip(reqs, tokens)):
            r.tokens.append(t)
            p = r.params
            reason = None
            if (t == self.eos_token_id and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
            elif r.num_output >= p.max_tokens or len(r.tokens) >= self.max_model_len:
                reason = "length"
            out = RequestOutput(r.id, [t], reason is not None, reason, num_prompt_tokens=len(r.prompt),
                                num_output_tokens=r.num_output)
            if p.logprobs is not None:
                out.logprobs = [chosen_lp[b]]
                if p.logprobs:
                    out.top_logprobs = [top[b][: p.logprobs]]
            if r.prompt_lps is not None:  # the first output carries the prompt's log-probs
                out.prompt_logprobs, r.prompt_lps = r.prompt_lps, None
            if reason is not None:
                r.finish_reason = reason
                self.running.remove(r)
                self.requests.pop(r.id, None)
                self._release(r)
            outputs.append(out)
        return outputs

    # ---- offline use ---------------------------------------------------------------------------------------
    def warmup(self) -> int:
        """Build the compiled decode step for every shape it takes before any request comes: batch 1 and batches
        above 1, each with block tables one block wide and wider (torch specialises sizes 1), by running short
        dummy requests to completion; afterwards no request waits for torch.compile (minutes on a CPU). Returns
        the number of dummy requests run (0 without compile). Call it before adding requests."""
        if not self.compile:
            return 0
        if self.has_work():
            raise RuntimeError("warm the engine up before adding requests")
        n = self.pool.block_size + 1  # the table widens from one block to two during these tokens
        if 1 + n > self.max_model_len:
            return 0
        runs = 0
        for batch in (1, 2)[: self.max_batch_size]:
            if batch * self.pool.blocks_for(1 + n) > self.pool.num_blocks:
                break
            self.generate([[0]] * batch, SamplingParams(max_tokens=n, ignore_eos=True))
            runs += batch
        return runs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        """Run prompts to completion (all admitted as the pool allows); results in prompt order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, GenerationResult] = {i: GenerationResult([], "") for i in ids}
        while self.has_work():
            for o in self.step():
                res = results.get(o.request_id)
                if res is None:
                    continue
                res.token_ids += o.token_ids
                if o.logprobs is not None:
                    res.logprobs = (res.logprobs or []) + o.logprobs
                if o.prompt_logprobs is not None:
                    res.prompt_logprobs = o.prompt_logprobs
                if o.finished:
                    res.finish_reason = o.finish_reason
        return [results[i] for i in ids]


class EngineLoop:
    """Runs an Engine in a daemon thread; submit, abort and stats are thread-safe and never wait for a step.

    Submissions and aborts go through queues the engine thread drains between steps, so the caller (the server's
    event loop) is not held up by a long prefill. Validation and the queue bound are checked at submit time.
    Callbacks run on the engine thread; a request's callback is dropped as soon as it is aborted.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()  # guards the queues and callbacks, never held during a step
        self._wake = threading.Event()
        self._stop = False
        self._inbox: deque[tuple[str, list[int], SamplingParams]] = deque()
        self._aborts: deque[str] = deque()
        self._callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """False once the engine thread has stopped (stop(), or an error that killed it)."""
        return self._thread.is_alive() and not self._stop

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, prompt: list[int], params: SamplingParams, callback: Callable[[RequestOutput], None]) -> str:
        """Queue a request; raises ValueError (can never run) or QueueFull (too many waiting) at once."""
        self.engine.check(prompt, params)
        with self._lock:
            if len(self.engine.waiting) + len(self._inbox) >= self.engine.max_waiting:
                raise QueueFull(f"{len(self.engine.waiting) + len(self._inbox)} requests are already waiting")
            rid = f"loop-{next(self._ids)}"
            self._callbacks[rid] = callback
            self._inbox.append((rid, list(prompt), params))
        self._wake.set()
        return rid

    def abort(self, request_id: str, reason: str = "abort") -> None:
        with self._lock:
            if self._callbacks.pop(request_id, None) is not None:
                self._aborts.append((request_id, reason))
        self._wake.set()

    def stats(self) -> dict:
        """The engine's counters as of the last step."""
        return dict(self._stats)

    def _drain(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, deque()
            aborts, self._aborts = self._aborts, deque()
        for rid, prompt, params in inbox:
            if rid not in self._callbacks:  # aborted before it was queued
                continue
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except (ValueError, QueueFull):
                log.exception("request %s refused", rid)
                self._deliver([(self._callbacks.pop(rid, None), RequestOutput(rid, [], True, "error"))])
        for rid, reason in aborts:
            self.engine.abort(rid, reason)

    def _deliver(self, pairs) -> None:
        for cb, o in pairs:
            if cb is not None:
                try:
                    cb(o)
                except Exception:  # e.g. the server's event loop is gone at shutdown
                    log.exception("request callback failed")

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            self._stats = self.engine.stats()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # keep serving: fail the requests in flight rather than the thread
                log.exception("engine step failed; failing the requests in flight")
                outputs = [RequestOutput(r.id, [], True, "error") for r in self.engine.running]
                for o in outputs:
                    self.engine.abort(o.request_id)
            with self._lock:
                pairs = [(self._callbacks.get(o.request_id), o) for o in outputs]
                for o in outputs:
                    if o.finished:
                        self._callbacks.pop(o.request_id, None)
            self._deliver(pairs)
