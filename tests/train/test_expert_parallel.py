"""Expert parallelism on 2 and 4 gloo processes (torch.multiprocessing spawn, or torchrun for the CLI): the EP model
computes what one process computes on the same weights and tokens, dropping keeps exactly the best pairs up to
each rank's capacity, the balance losses follow the paper's formulas, training and checkpoints match."""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.train import expert_parallel as xp

# tiny, with its 8 experts in 2 groups of 4 (one group per EP rank at --ep 2), top-1 group
EP_OVERRIDES = {"n_group": 2, "topk_group": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args):
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{**EP_OVERRIDES, **kw})


def _tokens(cfg, rank, world, B=2, T=8):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (world * B, T), generator=g)
    return ids, ids[rank * B:(rank + 1) * B]


def _parity(rank, world, out_dir):
    """Logits and gradients of the EP model equal the single-process model's on the concatenated tokens."""
    cfg = tiny()
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
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        want = ref[n].grad[local.start:local.stop] if ".mlp.experts." in n else ref[n].grad
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=n)
    (out_dir / f"ok-parity-{rank}").write_text("ok")


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
    keep = moe.dispatcher.token_drop(aff, topk, B, cfg, exempt_seq)
    every = [None] * world
    dist.all_gather_object(every, (aff, topk, exempt_seq, keep))
    aff_all = torch.cat([a.flatten() for a, _, _, _ in every]).tolist()
    dev_all = torch.cat([(t // (E // D)).flatten() for _, t, _, _ in every]).tolist()
    ex_all = torch.cat([e.repeat_interleave(T)[:, None].expand(N, K).flatten() for _, _, e, _ in every]).tolist()
    want = _drop_reference(aff_all, dev_all, ex_all, D, cfg.capacity_factor)
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
    spawn(_all_checks, 2, out, single)
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
