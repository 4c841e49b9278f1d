"""lm-evaluation-harness on dsv2: a model class for lm-eval running our forward and Engine.

    dsv2 eval lm --model DIR --tasks hellaswag,arc_easy --limit 200        # pip install dsv2[eval]
    dsv2 eval lm --model DIR --include-path tests/fixtures/lm_tasks --tasks dsv2_tiny   # local tasks, no download

    import lm_eval
    from dsv2.eval.lm import DSV2LM
    results = lm_eval.simple_evaluate(model=DSV2LM.from_dir("DIR"), tasks=["dsv2_tiny_mc"], task_manager=...)

`DSV2LM` implements lm-eval's three request types the way its HF backend (`--model hf`) does, so that the scores
are the same for the same checkpoint (tests/eval/test_lm.py checks it):
- loglikelihood (lm-eval's TemplateLM tokenizes: context and continuation encoded together; texts start with bos,
  as transformers encodes with our tokenizer by default; an empty context is bos) -> `_loglikelihood_tokens`:
  context + continuation, left-truncated to max_position_embeddings + 1, minus its last token, right-padded batches
  (longest first) through the model's one forward; the sum of the continuation's log-probabilities and whether
  greedy decoding would produce it.
- loglikelihood_rolling: the document in disjoint windows of max_position_embeddings tokens, each conditioned on
  the token before it (bos for the first), as lm-eval's rolling windows.
- generate_until: the context left-truncated to max_length - max_gen_toks, generated on the Engine (continuous
  batching over the paged cache; greedy unless do_sample with temperature > 0), cut at the first stop string.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from dsv2.infer.engine import Engine, SamplingParams


class DSV2LM(TemplateLM):
    """lm-eval model over a dsv2 DeepseekV2 and its Tokenizer (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, kv_cache_memory: int | str = "256MB", add_bos_token: bool = True,
                 progress: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._batch_size, self.max_gen_toks, self.progress = int(batch_size), max_gen_toks, progress
        # our tokenizer, read by transformers, prepends bos by default (as DeepSeek's add_bos_token does), and
        # lm-eval's HF backend encodes with that default
        self.add_bos_token = add_bos_token
        self._bos_text = tokenizer.decode([tokenizer.bos_id], skip_special_tokens=False)
        self._max_length = max_length or model.config.max_position_embeddings
        self._device = model.lm_head.weight.device
        self.engine = Engine(model, kv_cache_memory, max_batch_size=self._batch_size,
                             max_model_len=self._max_length, eos_token_id=tokenizer.eos_id)

    @classmethod
    def from_dir(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs) -> "DSV2LM":
        from dsv2.checkpoint import load_checkpoint
        from dsv2.tokenizer import Tokenizer

        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        return cls(load_checkpoint(path, dtype=dtype, device=device), Tokenizer.load(path), **kwargs)

    # ---- what TemplateLM needs -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What conditions an empty context (and the first rolling window): bos, as lm-eval's HF backend uses."""
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's default, unless the text already starts with bos
            add_special_tokens = self.add_bos_token and not string.startswith(self._bos_text)
        return self.tokenizer.encode(string, add_bos=add_special_tokens, parse_special=True)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- log-likelihoods --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_ids, continuation_ids)] -> [(logprob sum, is_greedy)]."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("a loglikelihood request needs context and continuation tokens")
            whole = (ctx + cont)[-(self.max_length + 1):]
            rows.append((whole[:-1], cont))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            width = len(rows[idx[0]][0])
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for b, i in enumerate(idx):
                x[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
            logp = F.log_softmax(self.model(x.to(self._device)).float(), dim=-1).cpu()  # [B, T, V]
            for b, i in enumerate(idx):
                inp, cont = rows[i]
                n = len(cont)
                lp = logp[b, len(inp) - n:len(inp)]  # the positions predicting the continuation
                target = torch.tensor(cont)
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (float(lp.gather(1, target[:, None]).sum()), greedy)
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            n = int(kw.pop("max_gen_toks"))
            if n >= self.max_length:
                raise ValueError(f"max_gen_toks {n} must be below the model's length {self.max_length}")
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            prompts.append(self.tok_encode(context)[-(self.max_length - n):] or [self.eot_token_id])
            params.append(SamplingParams(max_tokens=n, temperature=temperature, top_p=float(kw.get("top_p") or 1.0)))
            stops.append(until)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        got: dict[str, list[int]] = {i: [] for i in ids}
        with tqdm(total=len(ids), desc="generate_until", disable=disable_tqdm or not self.progress) as bar:
            while self.engine.has_work():
                for o in self.engine.step():
                    got[o.request_id] += o.token_ids
                    bar.update(int(o.finished))
        out = []
        for req, rid, until in zip(requests, ids, stops):
            text = postprocess_generated_text(generation=self.tok_decode(got[rid]), stop=until, think_end_token=None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def evaluate(model_dir: str | Path, tasks: list[str], include_path: str | None = None, limit: float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu", seed: int = 0,
             progress: bool = True) -> dict:
    """lm_eval.simple_evaluate on DSV2LM.from_dir(model_dir); returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = DSV2LM.from_dir(model_dir, device=device, batch_size=batch_size, progress=progress)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}"
                         + ("" if include_path else " (local task files: --include-path DIR)"))
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, log_samples=False)


__all__ = ["DSV2LM", "evaluate"]
