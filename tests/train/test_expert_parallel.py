"""Expert parallelism on 2 and 4 gloo processes (torch.multiprocessing spawn, or torchrun for the CLI): the EP model
computes what one process computes on the same weights and tokens, dropping keeps exactly the best pairs up to
each rank's capacity, the balance losses follow the paper's formulas, training and checkpoints match."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.train import expert_parallel as xp
from dsv2.train.parallel import run_local

# tiny, with its 8 experts in 2 groups of 4 (one group per EP rank at --ep 2), top-1 group
EP_OVERRIDES = {"n_group": 2, "topk_group": 1}


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{**EP_OVERRIDES, **kw})


def _tokens(cfg, rank, world, B=2, T=8):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (world * B, T), generator=g)
    return ids, ids[rank * B:(rank + 1) * B]


def _parity(rank, world, out_dir):
    """Logits and gradients of the EP model equal the single-process model's on the concatenated tokens: with
    each token's experts on one rank (M = 1) and spread over two (4 groups, top 2: one token, two ranks)."""
    for cfg in (tiny(), tiny(n_group=4, topk_group=2)):
        _parity_of(cfg, rank, world)
    (out_dir / f"ok-parity-{rank}").write_text("ok")


def _parity_of(cfg, rank, world):
    torch.manual_seed(0)
    full = DeepseekV2(cfg)
    ids, mine = _tokens(cfg, rank, world)
    ref_logits = full(ids)
    F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    torch.manual_seed(0)
    model = DeepseekV2(cfg)
    ep = xp.apply_expert_parallel(model, dist.group.WORLD)
    logits = model(mine)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), mine[:, 1:].flatten()).backward()
    xp.sync_grads(model)
    B = mine.shape[0]
    torch.testing.assert_close(logits, ref_logits[rank * B:(rank + 1) * B], rtol=1e-5, atol=1e-5)
    ref = dict(full.named_parameters())
    local = ep.local_experts()
    for n, p in model.named_parameters():
        want = ref[n].grad[local.start:local.stop] if ".mlp.experts." in n else ref[n].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=n)
    # the grad norm counts every expert shard once; clipping leaves the same gradients as torch's on one process
    norm = xp.clip_grad_norm(model, 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.5)
    torch.testing.assert_close(norm, ref_norm, rtol=2e-6, atol=0)
    for n, p in model.named_parameters():
        want = ref[n].grad[local.start:local.stop] if ".mlp.experts." in n else ref[n].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=n)


def _drop_reference(aff, dev, exempt, D, factor):
    """By hand: per device, the pairs of every rank in rank order; exempt pairs kept, then the highest affinity
    (earlier pair first on ties) up to ceil(factor * all pairs / D)."""
    capacity = math.ceil(factor * len(aff) / D)
    keep = [False] * len(aff)
    for d in range(D):
        pairs = [i for i in range(len(aff)) if dev[i] == d]
        pairs.sort(key=lambda i: (not exempt[i], -aff[i], i))
        for j, i in enumerate(pairs):
            keep[i] = exempt[i] or j < capacity
    return keep


def _dropping(rank, world, out_dir):
    cfg = tiny(token_drop=True, capacity_factor=1.0, drop_exempt_fraction=0.25)
    torch.manual_seed(0)
    model = DeepseekV2(cfg)
    xp.apply_expert_parallel(model, dist.group.WORLD)
    moe = model.moe_layers()[0]
    D, E, K = world, cfg.n_routed_experts, cfg.num_experts_per_tok
    # skewed routing so some devices overflow: pairs drawn towards the first rank's experts
    g = torch.Generator().manual_seed(7 + rank)
    B, T = 4, 6
    N = B * T
    topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    topk = torch.where(torch.rand(N, K, generator=g) < 0.5, topk % (E // D), topk)
    topk[:, 1] = torch.where(topk[:, 1] == topk[:, 0], (topk[:, 0] + 1) % E, topk[:, 1])
    aff = torch.rand(N, K, generator=g).round(decimals=1)  # ties on purpose
    exempt_seq = torch.tensor([rank == 0, False, False, rank == 1])
    direct = dataclasses.replace(cfg, capacity_factor=0.9)  # a capacity that rounds: 0.9 * 96 pairs / 2 = 43.2
    keep = moe.dispatcher.token_drop(aff, topk, B, direct, exempt_seq)
    every = [None] * world
    dist.all_gather_object(every, (aff, topk, exempt_seq, keep))
    aff_all = torch.cat([a.flatten() for a, _, _, _ in every]).tolist()
    dev_all = torch.cat([(t // (E // D)).flatten() for _, t, _, _ in every]).tolist()
    ex_all = torch.cat([e.repeat_interleave(T)[:, None].expand(N, K).flatten() for _, _, e, _ in every]).tolist()
    want = _drop_reference(aff_all, dev_all, ex_all, D, direct.capacity_factor)
    got = torch.cat([k.flatten() for _, _, _, k in every]).tolist()
    assert got == want
    assert not all(want)  # something was dropped
    # end to end: the EP layer with dropping equals one process dropping over the ranks' tokens (D = n_group)
    torch.manual_seed(1)
    x_all = torch.randn(world * B, T, cfg.hidden_size)
    exempt_all = torch.tensor([True, False, False, False] * world)
    torch.manual_seed(0)
    ref_moe = DeepseekV2(cfg).moe_layers()[0].train()
    y_ref = ref_moe(x_all, exempt_all)
    y = moe.train()(x_all[rank * B:(rank + 1) * B], exempt_all[rank * B:(rank + 1) * B])
    torch.testing.assert_close(y, y_ref[rank * B:(rank + 1) * B], rtol=1e-5, atol=1e-6)
    (out_dir / f"ok-drop-{rank}").write_text("ok")


def _balance(rank, world, out_dir):
    """The device and communication losses with the EP ranks as devices, against the formulas by hand."""
    cfg = tiny(n_group=4, topk_group=2, seq_aux=False)  # 2 groups per rank: M = 2 devices of D = 2
    torch.manual_seed(0)
    model = DeepseekV2(cfg).train()
    xp.apply_expert_parallel(model, dist.group.WORLD)
    _, mine = _tokens(cfg, rank, world, B=3, T=5)
    model(mine)
    moe = model.moe_layers()[0]
    aux = moe.aux
    # recompute the routing of this rank's tokens (same weights, same input) for the formulas
    cap = {}
    h = moe.register_forward_pre_hook(lambda m, a: cap.setdefault("x", a[0].detach()))
    model(mine)
    h.remove()
    xf = cap["x"].reshape(-1, cfg.hidden_size)
    scores, topk, _ = moe.gate(xf)
    E, K, D, M, T = cfg.n_routed_experts, cfg.num_experts_per_tok, world, 2, xf.shape[0]
    P = scores.mean(0)
    chosen = torch.zeros(T, E)
    for t in range(T):
        for e in topk[t].tolist():
            chosen[t, e] = 1
    f = chosen.sum(0) * E / (K * T)
    per = E // D
    f_dev = torch.stack([f[d * per:(d + 1) * per].mean() for d in range(D)])
    P_dev = torch.stack([P[d * per:(d + 1) * per].sum() for d in range(D)])
    sent = torch.tensor([[float(any(e // per == d for e in topk[t].tolist())) for d in range(D)] for t in range(T)])
    f_comm = sent.sum(0) * D / (M * T)
    torch.testing.assert_close(aux["expert"], cfg.aux_loss_alpha * (f * P).sum())
    torch.testing.assert_close(aux["device"], cfg.device_loss_alpha * (f_dev * P_dev).sum())
    torch.testing.assert_close(aux["comm"], cfg.comm_loss_alpha * (f_comm * P_dev).sum())
    # f'' counts what the dispatcher really sent: this rank's pairs per destination, each token once per device
    load = moe.load.view(D, per)
    assert load.sum().item() == T * K
    (out_dir / f"ok-balance-{rank}").write_text("ok")


def _ep_dist(rank, world, ep):
    from dsv2.train.parallel import Dist

    return Dist(rank, world, rank, torch.device("cpu"), ep=ep, ep_group=dist.group.WORLD)


def _checkpoints(rank, world, out_dir, single):
    """Meta build + materialize gives the single-process init_weights (on a meta-built model: DeepseekV2(cfg) on
    a real device also draws the layers' default inits first); a single-process checkpoint loads split (only
    this rank's experts read); an EP model saves its shards into one HF checkpoint (logits kept for the parent)."""
    from safetensors.torch import save_file

    from dsv2.checkpoint import load_checkpoint
    from dsv2.train.parallel import write_model_shards

    cfg = tiny()
    with torch.device("meta"):
        full = DeepseekV2(cfg)  # built on meta, then initialised: the constructors draw nothing
    full.to_empty(device="cpu")
    torch.manual_seed(5)
    full.init_weights()
    torch.manual_seed(5)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    ep = xp.apply_expert_parallel(model, dist.group.WORLD)
    xp.materialize(model, torch.device("cpu"))
    ref = full.state_dict()
    lo, hi = ep.local_experts().start, ep.local_experts().stop
    for n, t in model.state_dict().items():
        assert torch.equal(t, ref[n][lo:hi] if ".mlp.experts." in n else ref[n]), n
    read = []
    loaded = load_checkpoint(single, prepare=lambda m: read.append(xp.apply_expert_parallel(m, dist.group.WORLD)))
    assert read and loaded.moe_layers()[0].experts.w13.shape[0] == cfg.n_routed_experts // world
    ids, mine = _tokens(cfg, rank, world)
    torch.testing.assert_close(loaded(mine).detach(), load_checkpoint(single)(ids)[rank * 2:(rank + 1) * 2].detach(),
                               rtol=1e-5, atol=1e-5)
    finish = write_model_shards(model, out_dir / "ep-ckpt", _ep_dist(rank, world, world))
    if finish is not None:
        finish()
    with torch.no_grad():
        save_file({"logits": model(mine)}, out_dir / f"logits-{rank}.safetensors")
    dist.barrier()
    (out_dir / f"ok-ckpt-{rank}").write_text("ok")


def _engine(rank, world, out_dir, single):
    """The Engine over a model with split experts: every rank runs the same requests, tokens as one process."""
    from dsv2.checkpoint import load_checkpoint
    from dsv2.infer.engine import Engine, SamplingParams

    model = load_checkpoint(single, prepare=lambda m: xp.apply_expert_parallel(m, dist.group.WORLD))
    outs = Engine(model, kv_cache_memory="4MB").generate([[1, 5, 9, 13], [2, 4], [7] * 11],
                                                        SamplingParams(max_tokens=6, ignore_eos=True))
    (out_dir / f"engine-{rank}.json").write_text(json.dumps([o.token_ids for o in outs]))


def _all_checks(rank, world, out_dir, single):
    _parity(rank, world, out_dir)
    _dropping(rank, world, out_dir)
    _balance(rank, world, out_dir)
    _checkpoints(rank, world, out_dir, single)
    _engine(rank, world, out_dir, single)


def _single_checkpoint(path):
    from dsv2.checkpoint import save_checkpoint

    torch.manual_seed(3)
    save_checkpoint(DeepseekV2(tiny()), path)
    return path


def test_ep_matches_one_process_2(tmp_path):
    """2 processes (one spawn for all): outputs and gradients, dropping at capacity, balance losses, init and
    checkpoints both ways, the Engine."""
    from safetensors.torch import load_file

    import dsv2
    from dsv2.infer.engine import Engine, SamplingParams

    single = _single_checkpoint(tmp_path / "single")
    out = tmp_path / "out"
    out.mkdir()
    run_local(_all_checks, 2, out, single)
    assert {p.name for p in out.iterdir() if p.name.startswith("ok-")} == {
        f"ok-{k}-{r}" for k in ("parity", "drop", "balance", "ckpt") for r in range(2)}
    # saved under EP (one shard file per rank, the HF layout), loaded on one process: the same logits
    ckpt = out / "ep-ckpt"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["model.layers.1.mlp.experts.5.down_proj.weight"] == "model-00002-of-00002.safetensors"
    model = dsv2.load_checkpoint(ckpt)
    ids, _ = _tokens(model.config, 0, 2)
    ep_logits = torch.cat([load_file(out / f"logits-{r}.safetensors")["logits"] for r in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ep_logits, rtol=1e-5, atol=1e-5)
    # the Engine with split experts generates what it generates on one process
    want = [o.token_ids for o in Engine(dsv2.load_checkpoint(single), kv_cache_memory="4MB").generate(
        [[1, 5, 9, 13], [2, 4], [7] * 11], SamplingParams(max_tokens=6, ignore_eos=True))]
    for r in range(2):
        assert json.loads((out / f"engine-{r}.json").read_text()) == want


# ---- the CLI under torchrun -------------------------------------------------------------------------------------
def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(nproc, out, recipe, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "dsv2.cli", "pretrain", "--out", str(out), "--init-from", recipe.init_from, "--data", recipe.data,
           "--tokenizer", recipe.tokenizer, "--seq-len", str(recipe.seq_len), "--batch-size", str(recipe.batch_size),
           "--max-steps", str(recipe.max_steps), "--warmup-steps", str(recipe.warmup_steps), "--lr", str(recipe.lr),
           "--log-every", "1", "--eval-every", str(recipe.eval_every), "--eval-batches", str(recipe.eval_batches),
           "--save-every", str(recipe.save_every), "--no-progress", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def ep_recipe(tmp_path_factory, corpus, tokenizer_dir):
    """A tiny model with one expert group per EP rank, saved once: every run below starts from its weights."""
    from dsv2.checkpoint import save_checkpoint
    from dsv2.train.recipe import Recipe

    init = tmp_path_factory.mktemp("init") / "tiny"
    torch.manual_seed(0)
    save_checkpoint(DeepseekV2(tiny(vocab_size=512)), init)
    return Recipe(init_from=str(init), data=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32, batch_size=8,
                  max_steps=6, warmup_steps=2, lr=3e-3, log_every=1, eval_every=3, eval_batches=2, save_every=3,
                  keep_last=0)


def _one_process(recipe, out, per_rank):
    from dsv2.train.pretrain import pretrain

    # each rank's share of the global batch as one micro-batch: the balance losses see the same groups
    pretrain(dataclasses.replace(recipe, micro_batch_size=per_rank), out, progress=False)
    return _records(out)


def _same_curve(a, b, later_rel=1e-5):
    """Same records; values within float noise (the first step's always to 1e-5: the same gradients up to the
    order of summation; later steps to later_rel, see the 4-process test)."""
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    for ra, rb in zip(a, b):
        rel = 1e-5 if ra["step"] <= 1 else later_rel
        for key in ("loss", "lm_loss", "expert_loss", "device_loss", "comm_loss", "eval_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-6), (ra["step"], key)
        if "expert_load_max_over_mean" in ra and later_rel == 1e-5:
            assert rb["expert_load_max_over_mean"] == ra["expert_load_max_over_mean"]


@pytest.mark.slow
def test_ep2_pretrain_matches_one_process_and_resumes_exactly(ep_recipe, tmp_path):
    """`--ep 2` on 2 processes, stopped after step 4 and resumed: the single-process loss curve; its checkpoint
    (one shard file per EP rank) loads on one process and resumes there."""
    from dsv2.train.pretrain import latest_checkpoint, pretrain

    want = _one_process(ep_recipe, tmp_path / "one", per_rank=4)
    out = tmp_path / "ep"
    res = _torchrun(2, out, ep_recipe, "--ep", "2", "--stop-after", "4")
    assert "(experts split over 2: --ep)" in res.stdout
    _torchrun(2, out, ep_recipe, "--ep", "2", "--resume")
    _same_curve(want, _records(out))
    ckpt = latest_checkpoint(out)
    assert (ckpt / "model.safetensors.index.json").is_file()
    more = dataclasses.replace(ep_recipe, max_steps=7)
    assert pretrain(more, out, resume=True, progress=False)["step"] == 7


@pytest.mark.slow
def test_ep2_fsdp_on_4_processes_matches_one_process(ep_recipe, tmp_path):
    """`--ep 2 --fsdp` on 4 processes (mesh dp 2 x ep 2): the single-process loss curve. Step 1 agrees to 1e-5
    (loss, balance losses, grad norm); later steps to 1e-3: a 4-way reduce-scatter sums in another order than one
    process's micro-batches, and AdamW's first updates are nearly sign(g), so rounding noise in gradients near
    zero grows to ~1e-4 in the losses (a wrong gradient would show in step 1's grad norm already)."""
    want = _one_process(ep_recipe, tmp_path / "one", per_rank=2)
    out = tmp_path / "ep"
    res = _torchrun(4, out, ep_recipe, "--ep", "2", "--fsdp")
    assert "4 process(es) on cpu (FSDP2) (experts split over 2: --ep)" in res.stdout
    _same_curve(want, _records(out), later_rel=1e-3)


def test_ep_needs_a_multiple_of_processes(ep_recipe, tmp_path):
    """--ep on one process (or a world size it does not divide) is a user error, not a hang."""
    res = subprocess.run([sys.executable, "-m", "dsv2.cli", "pretrain", "--out", str(tmp_path / "x"), "--init-from",
                          ep_recipe.init_from, "--data", ep_recipe.data, "--ep", "2", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --ep 2 needs"), res.stderr
