"""GRPO (DeepSeekMath / DeepSeek-V2's RL stage): `dsv2 grpo` on the run core, rollouts on our own Engine.

    dsv2 grpo --init-from runs/sft/checkpoints/step-00000300 --prompts tasks/prompts_train.jsonl \\
        --eval-prompts tasks/prompts_test.jsonl --reward math --out runs/grpo            # stage 1: reasoning
    dsv2 grpo --init-from runs/grpo/checkpoints/step-... --prompts chat.jsonl --stage preference \\
        --reward rm:runs/rm_helpful/checkpoints/step-... --reward safety:0.5 --reward format:0.1 --out runs/pref
    dsv2 grpo --out runs/grpo --resume

Per rollout batch (batch_size completions = batch_size / num_generations prompts, G = num_generations each):
  1. sample G completions per prompt from the CURRENT policy weights through `dsv2.infer.engine.Engine` (the
     Engine runs the same module object the optimizer updates in place, so no checkpoint round trip; the absorbed
     MLA weight views are views of kv_b_proj's weight and follow the update; tests/train/test_grpo.py checks it);
  2. score them with the weighted reward sources (train/rewards.py); A = group_advantages(r) per prompt;
  3. old log-probs: with mu = 1 they are the policy's own log-probs, detached (ratio exactly 1, as TRL does): no
     extra forward. With mu > 1, one no-grad training forward over the batch before the first update (one
     forward of the policy per rollout batch, about a third of a training step's cost);
  4. ref log-probs: one no-grad forward per rollout batch of a frozen copy of the --init-from weights (a second
     model in memory, float32 on CPU); with beta = 0 no reference model is loaded and nothing is computed;
  5. mu optimizer steps on the same batch (each one a run-core step): logp recomputed by the training forward
     (one forward over prompt + completion, per-token log-probs of the sampled tokens at the sampling
     temperature), loss = grpo_loss(...) + the MoE balance losses (kept so routing stays balanced).

The objective is the paper's by default (unbiased group std as in TRL, eps 0.2, k3 KL with beta 0.04, mean over
each output's tokens then over outputs). Switches: --aggregation token|dr_grpo, --no-std-scaling, --clip-eps-high,
--drop-zero-variance (groups whose rewards are all equal are left out of the batch; if every group is, the batch
is kept: its loss is the KL term only), --mask-truncated (completions that hit the length budget get no loss),
--beta 0. Deviations: rollouts sample in float32 (the master weights) rather than bf16; on CUDA the Engine is
the eager one. One process only (no torchrun yet).

Metrics per step in DIR/metrics.jsonl: reward mean/std overall and per source, zero-variance group share, kl,
clip fractions (low/high), entropy, completion lengths, truncated share; a few sampled completions (records with
"samples"); held-out accuracy/reward (greedy, through the Engine) at every eval; DIR/reward.png.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv2.checkpoint import load_checkpoint
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.tokenizer import Tokenizer
from dsv2.train.recipe import RunRecipe, _need
from dsv2.train.rewards import RewardSource, parse_rewards, score
from dsv2.train.run import Run, Stage, add_run_arguments, run_command, train
from dsv2.train.sft import read_jsonl

AGGREGATIONS = ("grpo", "token", "dr_grpo")
STAGES = {"reasoning": ["math"], "preference": []}  # --stage: its default reward sources


# ---- the pure core ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale_std: bool = True) -> torch.Tensor:
    """rewards [P, G] (G completions of each of P prompts) -> advantages [P, G]:
    A = (r - mean_group) / (std_group + 1e-4), std unbiased (as TRL); scale_std=False: A = r - mean_group."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, generations >= 2], got {tuple(rewards.shape)}")
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    return adv / (r.std(dim=1, keepdim=True) + 1e-4) if scale_std else adv


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: float | None = None, beta: float = 0.04,
              aggregation: str = "grpo") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (to minimise) over N completions padded to width T.

    logp, old_logp, ref_logp [N, T]: per-token log-probs of the sampled tokens under the policy (with grad), the
    policy that sampled them, the reference; mask [N, T] true on completion tokens; advantages [N].
    Per token: -min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) A) + beta KL, rho = exp(logp - old_logp),
    KL = pi_ref/pi - log(pi_ref/pi) - 1 (k3). aggregation: "grpo" mean over each completion's tokens, then over
    completions (the paper); "token" mean over all tokens of the batch (TRL's "bnpo"); "dr_grpo" sum over all
    tokens / (N T), T the tensors' width = the generation budget (Dr. GRPO). ref_logp may be None when beta = 0.
    stats (detached): kl (masked mean; 0 without ref), clip_low / clip_high (share of tokens whose ratio is
    clipped where it matters: rho < 1 - eps with A < 0, rho > 1 + eps_high with A > 0), ratio (masked mean).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]  # [N, 1]: the same for every token of a completion
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_eps, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T]
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if beta != 0:
            per_token = per_token + beta * kl
    if aggregation == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif aggregation == "token":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        loss = (per_token * m).sum() / (per_token.shape[0] * per_token.shape[1])
    n = m.sum().clamp(min=1)
    with torch.no_grad():
        low = ((ratio < 1 - clip_eps) & (adv < 0)).to(m.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype)
        stats = {"kl": (kl * m).sum() / n if kl is not None else m.new_zeros(()),
                 "clip_low": (low * m).sum() / n, "clip_high": (high * m).sum() / n,
                 "ratio": (ratio * m).sum() / n}
    return loss, {k: v.detach() for k, v in stats.items()}


def completion_logprobs(model, ids: torch.Tensor, prompt_len: torch.Tensor, width: int, temperature: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward over prompt + completion rows ids [N, L] (row i's completion starts at prompt_len[i]);
    returns per-token log-probs of the completion tokens [N, width] (at the sampling temperature, as sampled) and
    the entropy of each of those next-token distributions [N, width] (detached). Positions past a row's end hold
    junk: mask them."""
    N, L = ids.shape
    logits = model(ids)  # [N, L, V]
    pos = (prompt_len.to(ids.device)[:, None] - 1 + torch.arange(width, device=ids.device)[None]).clamp(0, L - 2)
    sel = logits.gather(1, pos[..., None].expand(N, width, logits.shape[-1])).float() / temperature  # [N, T, V]
    lp = sel.log_softmax(-1)
    tokens = ids.gather(1, pos + 1)  # [N, T]: the token each position predicts
    logp = lp.gather(-1, tokens[..., None])[..., 0]
    with torch.no_grad():
        entropy = -(lp.exp() * lp).sum(-1)
    return logp, entropy


# ---- prompts ---------------------------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[dict]:
    """JSONL rows with "prompt" (a user message) or "messages" (a chat ending on a user turn), plus whatever the
    reward sources read ("answer", "tests", ...). A malformed line raises ValueError naming it."""
    rows = read_jsonl(path, _prompt_row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _prompt_row(row: dict) -> dict:
    if not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
        raise ValueError("expected an object with a \"prompt\" string or a \"messages\" list")
    return row


def prompt_ids(tok: Tokenizer, row: dict) -> list[int]:
    """The chat-rendered prompt of a row, ending in the generation prompt (the one template, tokenizer.py)."""
    messages = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def generate_completions(engine: Engine, tok: Tokenizer, rows: list[dict], params: list[SamplingParams]
                         ) -> list[dict]:
    """Run each (row, params) through the Engine: [{"ids", "tokens", "text", "truncated"}] in order."""
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        prompts = [prompt_ids(tok, r) for r in rows]
        results = engine.generate(prompts, params)
    finally:
        model.train(was_training)
    return [{"ids": p, "tokens": g.token_ids, "text": tok.decode(g.token_ids), "truncated": g.finish_reason == "length"}
            for p, g in zip(prompts, results)]


@torch.no_grad()
def evaluate(engine: Engine, tok: Tokenizer, rows: list[dict], sources: list[RewardSource], max_tokens: int
             ) -> dict[str, float]:
    """Greedy completions of `rows` through the Engine, scored: {"reward": weighted mean, "<source>": mean,
    "accuracy": share of rows whose math reward is 1 (when a math source is given), "completion_len": mean
    tokens per completion (how the answers' style moves, e.g. toward showing the working)}."""
    outs = generate_completions(engine, tok, rows, [SamplingParams(max_tokens=max_tokens)] * len(rows))
    total, per = score(sources, rows, [o["text"] for o in outs])
    res = {"reward": total.mean().item(), **{k: v.mean().item() for k, v in per.items()},
           "completion_len": sum(len(o["tokens"]) for o in outs) / max(len(outs), 1)}
    if "math" in per:
        res["accuracy"] = (per["math"] >= 1).float().mean().item()
    return res


# ---- the stage -------------------------------------------------------------------------------------------------
@dataclass
class GRPORecipe(RunRecipe):
    """GRPO: the run's fields (batch_size = completions per rollout batch, seq_len = prompt + completion tokens)
    plus the prompts, rewards and the objective's switches."""
    prompts: str | None = None  # JSONL of {"prompt" or "messages", and what the rewards read, e.g. "answer"}
    eval_prompts: str | None = None  # held-out JSONL, scored greedily at every eval (accuracy for math)
    eval_samples: int = 200  # held-out rows evaluated (the first ones)
    rewards: list = field(default_factory=list)  # NAME[:weight] sources (TOML list; flag --reward, repeatable)
    stage: str = "reasoning"  # reasoning (default rewards: math) | preference (name the RM and rule sources)
    num_generations: int = 8  # G, completions per prompt
    max_completion_tokens: int = 64  # the generation budget (T of dr_grpo)
    temperature: float = 1.0  # sampling temperature of the rollouts (log-probs are taken at it too)
    top_p: float = 1.0  # nucleus sampling of the rollouts
    mu: int = 1  # policy updates per rollout batch
    beta: float = 0.04  # KL coefficient; 0: no reference model
    clip_eps: float = 0.2  # ratio clipping below (and above unless clip_eps_high)
    clip_eps_high: float | None = None  # ratio clipping above (DAPO's clip-higher); None: clip_eps
    aggregation: str = "grpo"  # grpo | token | dr_grpo
    std_scaling: bool = True  # divide advantages by the group's std (--no-std-scaling: Dr. GRPO)
    drop_zero_variance: bool = False  # leave out groups whose rewards are all equal
    mask_truncated: bool = False  # no loss on completions that hit max_completion_tokens
    kv_cache_memory: str = "256MB"  # the rollout Engine's latent block pool
    log_samples: int = 2  # sampled completions written to metrics.jsonl per rollout batch
    # GRPO-sized defaults of the run's fields
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 1.0  # constant lr after warmup
    weight_decay: float = 0.0
    max_steps: int = 200
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1

    def validate(self) -> None:
        super().validate()
        _need(self.prompts is not None, "grpo needs --prompts FILE.jsonl")
        _need(self.init_from is not None, "grpo needs --init-from CKPT (the policy's start and the KL reference)")
        _need(self.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        _need(self.num_generations >= 2, f"num_generations must be >= 2, got {self.num_generations}")
        _need(self.batch_size % self.num_generations == 0,
              f"batch_size ({self.batch_size}) must be a multiple of num_generations ({self.num_generations})")
        _need(self.batch_size_start in (0, self.batch_size), "grpo has no batch-size ramp")
        _need(self.max_completion_tokens >= 1, "max_completion_tokens must be >= 1")
        _need(self.seq_len > self.max_completion_tokens, "seq_len must exceed max_completion_tokens")
        _need(0 < self.temperature <= 2, f"temperature must be in (0, 2], got {self.temperature}")
        _need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _need(self.mu >= 1, f"mu must be >= 1, got {self.mu}")
        _need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        _need(0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}")
        _need(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high must be positive")
        _need(self.aggregation in AGGREGATIONS, f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        _need(self.eval_samples >= 0 and self.log_samples >= 0, "eval_samples and log_samples must be >= 0")
        _need(isinstance(self.rewards, list), "rewards must be a list of NAME[:weight]")
        _need(bool(self.rewards or STAGES[self.stage]),
              f"--stage {self.stage} has no default rewards: name them with --reward (e.g. rm:DIR, safety, format)")

    def reward_specs(self) -> list[str]:
        return list(self.rewards) or STAGES[self.stage]


class GRPO(Stage):
    """Rollouts through the Engine, rewards, group advantages; mu policy steps per rollout batch."""

    name = "grpo"

    def setup(self, run: Run) -> None:
        r = run.r
        if run.d.world_size > 1:
            raise ValueError("dsv2 grpo runs in one process (no torchrun yet)")
        self.sources = parse_rewards(r.reward_specs())
        self.rows = self._checked(load_prompts(r.prompts), run, r.prompts)
        self.eval_rows = self._checked(load_prompts(r.eval_prompts), run, r.eval_prompts)[: r.eval_samples] \
            if r.eval_prompts else []
        self.seed_base, self.mu = r.seed, r.mu
        self.epoch, self.pos, self.updates, self.buffer = 0, 0, r.mu, None
        self.engine = self.ref = None
        self.order = self._order()
        run.say(f"grpo ({r.stage}): {len(self.rows)} prompts, {len(self.eval_rows)} held out; rewards "
                + ", ".join(f"{s.name} x {s.weight:g}" for s in self.sources)
                + f"; G={r.num_generations}, {r.batch_size // r.num_generations} prompts per rollout batch, mu={r.mu}, "
                  f"beta={r.beta}, aggregation {r.aggregation}")

    def _checked(self, rows: list[dict], run: Run, path: str) -> list[dict]:
        room = run.r.seq_len - run.r.max_completion_tokens
        for i, row in enumerate(rows):
            n = len(prompt_ids(run.tok, row))
            if n > room:
                raise ValueError(f"{path}: prompt {i + 1} has {n} tokens; seq_len - max_completion_tokens leaves "
                                 f"{room}")
        return rows

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self._seed(self.epoch, 0))
        return torch.randperm(len(self.rows), generator=g).tolist()

    def _seed(self, *parts: int) -> int:
        """A sampling seed from the run's seed and parts (epoch; step and row): the same after a resume."""
        s = self.seed_base
        for p in parts:
            s = (s * 1_000_003 + p + 1) % (2 ** 62)
        return s

    # engine and reference are made on first use: the run builds the model after setup()
    def _engine(self, run: Run) -> Engine:
        if self.engine is None:
            r, was_training = run.r, run.raw.training
            self.engine = Engine(run.raw, kv_cache_memory=r.kv_cache_memory, eos_token_id=run.tok.eos_id,
                                 max_batch_size=max(r.batch_size, len(self.eval_rows), 1),
                                 max_waiting=max(r.batch_size, len(self.eval_rows)) + 1, max_model_len=r.seq_len)
            run.raw.train(was_training)  # the Engine puts its model in eval mode
        return self.engine

    def _ref(self, run: Run):
        if self.ref is None:
            self.ref = load_checkpoint(run.r.init_from, dtype=torch.float32, config=copy.copy(run.cfg), fp8=False)
            self.ref.to(run.device).train().requires_grad_(False)  # train mode: the same forward as the policy's
        return self.ref

    def _take_prompts(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
            out.append(self.rows[self.order[self.pos]])
            self.pos += 1
        return out

    # ---- a rollout batch ---------------------------------------------------------------------------------------
    def rollout(self, run: Run, batch_size: int) -> dict:
        r, G, T = run.r, run.r.num_generations, run.r.max_completion_tokens
        prompts = self._take_prompts(batch_size // G)
        rows = [p for p in prompts for _ in range(G)]
        params = [SamplingParams(max_tokens=T, temperature=r.temperature, top_p=r.top_p,
                                 seed=self._seed(run.step, i)) for i in range(len(rows))]
        outs = generate_completions(self._engine(run), run.tok, rows, params)
        total, per = score(self.sources, rows, [o["text"] for o in outs])
        rewards = total.view(-1, G)
        adv = group_advantages(rewards, r.std_scaling).flatten()
        zero_var = (rewards.max(1).values == rewards.min(1).values)  # [P]
        keep = torch.ones(len(rows), dtype=torch.bool)
        if r.drop_zero_variance and not bool(zero_var.all()):
            keep = (~zero_var).repeat_interleave(G)
        lengths = torch.tensor([len(o["tokens"]) for o in outs])
        truncated = torch.tensor([o["truncated"] for o in outs])
        stats = {"reward_mean": total.mean(), "reward_std": total.std(), "zero_var_share": zero_var.float().mean(),
                 "completion_len_mean": lengths.float().mean(), "completion_len_max": lengths.max().float(),
                 "truncated_share": truncated.float().mean(), "kept_share": keep.float().mean()}
        for name, v in per.items():
            stats[f"reward_{name}_mean"], stats[f"reward_{name}_std"] = v.mean(), v.std()
        if r.log_samples and run.d.is_main:
            run.record({"step": run.step + 1, "samples": [
                {"prompt": rows[i].get("prompt", rows[i].get("messages")), "completion": outs[i]["text"],
                 "reward": round(total[i].item(), 4)} for i in range(0, len(rows), G)[: r.log_samples]]})
        idx = keep.nonzero()[:, 0].tolist()
        L = max(len(outs[i]["ids"]) + len(outs[i]["tokens"]) for i in idx)
        ids = torch.full((len(idx), L), run.tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.bool)
        for b, i in enumerate(idx):
            seq = outs[i]["ids"] + outs[i]["tokens"]
            ids[b, :len(seq)] = torch.tensor(seq)
            if not (r.mask_truncated and outs[i]["truncated"]):
                mask[b, :len(outs[i]["tokens"])] = True
        plen = torch.tensor([len(outs[i]["ids"]) for i in idx])
        batch = {"ids": ids, "prompt_len": plen, "mask": mask, "adv": adv[idx],
                 "stats": {k: float(v) for k, v in stats.items()}}
        # old and ref log-probs: no-grad forwards, micro-batched like the loss (see the module docstring)
        with torch.no_grad(), run.autocast():
            for key, model, needed in (("old", run.raw, r.mu > 1), ("ref", self._ref(run) if r.beta else None,
                                                                     r.beta != 0)):
                if needed:
                    parts = [completion_logprobs(model, i.to(run.device), p, T, r.temperature)[0].float().cpu()
                             for (i, p), _ in run.micro_split(ids, plen)]
                    batch[key] = torch.cat(parts)
        return batch

    def micro_batches(self, run: Run, batch_size: int):
        if self.updates >= run.r.mu:
            self.buffer, self.updates = self.rollout(run, batch_size), 0
        self.updates += 1
        b = self.buffer
        N = b["ids"].shape[0]
        zeros = torch.zeros(N, run.r.max_completion_tokens)
        self.n_tokens = b["mask"].sum().clamp(min=1)
        return run.micro_split(b["ids"], b["prompt_len"], b["mask"], b["adv"], b.get("old", zeros),
                               b.get("ref", zeros))

    def loss(self, run: Run, batch) -> dict[str, torch.Tensor]:
        r = run.r
        ids, plen, mask, adv, old, ref = batch
        logp, entropy = completion_logprobs(run.model, ids, plen, r.max_completion_tokens, r.temperature)
        logp = logp.float()
        if r.mu == 1:
            old = logp.detach()  # the sampling policy is this one: ratio 1, gradient = policy gradient
        loss, stats = grpo_loss(logp, old, ref if r.beta else None, adv, mask, clip_eps=r.clip_eps,
                                clip_eps_high=r.clip_eps_high, beta=r.beta, aggregation=r.aggregation)
        if r.aggregation == "token":  # the run weighs micro-batches by rows: make it a mean over the batch's tokens
            share = ids.shape[0] / self.buffer["ids"].shape[0]
            loss = loss * (mask.sum().clamp(min=1) / self.n_tokens) / share
        bal = run.raw.balance_losses()["total"]
        m = mask.float()
        out = {"loss": loss + bal, "grpo_loss": loss.detach(), "balance_loss": bal.detach(), **stats,
               "entropy": (entropy * m).sum() / m.sum().clamp(min=1)}
        out.update({k: torch.tensor(v) for k, v in self.buffer["stats"].items()})
        return out

    def evaluate(self, run: Run) -> dict | None:
        if not self.eval_rows:
            return None
        res = evaluate(self._engine(run), run.tok, self.eval_rows, self.sources, run.r.max_completion_tokens)
        return {f"eval_{k}": v for k, v in res.items()}

    def plots(self, run: Run, records: list[dict]) -> None:
        plot_rewards(records, run.out / "reward.png", title=f"grpo ({run.r.stage}): {run.out.name}")

    # ---- resume: the data position, and the rollout batch when its mu updates are not all done ----------------
    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "pos": self.pos, "updates": self.updates}
        if self.buffer is not None and self.updates < self.mu:
            state["buffer"] = {k: (v if k == "stats" else {"dtype": str(v.dtype).removeprefix("torch."),
                                                           "shape": list(v.shape), "data": v.flatten().tolist()})
                               for k, v in self.buffer.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.updates = state["epoch"], state["pos"], state["updates"]
        self.order = self._order()
        buf = state.get("buffer")
        self.buffer = None if buf is None else {
            k: (v if k == "stats" else torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).view(v["shape"]))
            for k, v in buf.items()}
        if self.buffer is None:
            self.updates = max(self.updates, self.mu)


def plot_rewards(records: list[dict], out: str | Path, title: str = "") -> None:
    """reward.png: the rollout reward (and each source's) per step, held-out accuracy/reward at each eval."""
    import matplotlib.pyplot as plt
    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_reward" in r]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        steps, mean = [r["step"] for r in train], [r["reward_mean"] for r in train]
        ax.plot(steps, mean, label="rollout reward (batch mean)", lw=0.8, alpha=0.5)
        k = min(10, len(mean))  # a batch of a few prompts is noisy: the trailing mean over k steps shows the trend
        trailing = [sum(mean[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(mean))]
        ax.plot(steps, trailing, label=f"rollout reward (mean of the last {k} steps)", lw=1.8)
        names = sorted({k[7:-5] for r in train for k in r if k.startswith("reward_") and k.endswith("_mean")} - {""})
        for n in names if len(names) > 1 else []:
            ax.plot([r["step"] for r in train], [r.get(f"reward_{n}_mean") for r in train], lw=0.8, label=n)
    key = "eval_accuracy" if evals and "eval_accuracy" in evals[0] else "eval_reward"
    if evals:
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", ms=4, label=f"held out: {key[5:]} (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title or "GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def grpo(recipe: GRPORecipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
         progress: bool = True) -> dict:
    """Run GRPO as the recipe says, writing into `out`; returns the run core's summary (see run.train)."""
    import dataclasses
    import os
    paths = {k: os.path.abspath(getattr(recipe, k)) for k in ("prompts", "eval_prompts") if getattr(recipe, k)}
    recipe = dataclasses.replace(recipe, **paths)  # absolute, so a resume from elsewhere finds them
    return train(GRPO(), recipe, out, resume=resume, stop_after=stop_after, progress=progress)


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_command(subparsers) -> None:
    """Register `dsv2 grpo`."""
    p = subparsers.add_parser(
        "grpo", help="GRPO on verifiable or reward-model rewards (rollouts on the Engine, resumable)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, GRPORecipe, choices={"aggregation": list(AGGREGATIONS), "stage": list(STAGES)})
    p.add_argument("--reward", action="append", dest="rewards", default=argparse.SUPPRESS, metavar="NAME[:WEIGHT]",
                   help="a reward source, repeatable: math, format, safety, code, rm:DIR (a trained reward model); "
                        "weights default to 1 and the sources are summed (default: the --stage's)")
    p.set_defaults(func=lambda args: run_command(args, GRPORecipe, grpo))


__all__ = ["AGGREGATIONS", "GRPO", "GRPORecipe", "add_command", "completion_logprobs", "evaluate",
           "generate_completions", "grpo", "grpo_loss", "group_advantages", "load_prompts", "plot_rewards",
           "prompt_ids"]
