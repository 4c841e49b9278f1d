"""DeepSeekMoE: routing, grouped vs loop experts, balance losses against the paper's formulas, token dropping."""

import math

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.model.moe import LocalDispatcher, MoE, balance_losses, device_token_drop


def _cfg(**kw):
    base = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                topk_group=2, initializer_range=0.3)
    base.update(kw)
    return ModelConfig.from_preset("tiny", **base)


def _moe(**kw):
    cfg = _cfg(**kw)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=cfg.initializer_range)
    return moe


def test_group_limited_routing_stays_in_top_groups():
    moe = _moe()
    x = torch.randn(64, 32)
    scores, idx, w = moe.gate(x)
    groups = idx // 4
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    best_groups = scores.view(64, 4, 4).amax(-1).topk(2, dim=-1).indices
    for g, bg in zip(groups, best_groups):
        assert set(g.tolist()) <= set(bg.tolist())
    assert torch.allclose(w, scores.gather(1, idx) * moe.gate.routed_scaling_factor)


def test_group_limited_routing_equals_per_expert_mask_formulation():
    moe = _moe()
    x = torch.randn(64, 32)
    scores, idx, w = moe.gate(x)
    group_idx = scores.view(64, 4, 4).amax(-1).topk(2, dim=-1).indices
    mask = torch.zeros(64, 4, dtype=torch.bool).scatter_(1, group_idx, True).repeat_interleave(4, dim=1)
    want_w, want_idx = scores.masked_fill(~mask, 0.0).topk(4, dim=-1)
    order = idx.sort(dim=-1).indices
    want_order = want_idx.sort(dim=-1).indices
    assert torch.equal(idx.gather(1, order), want_idx.gather(1, want_order))
    assert torch.equal(w.gather(1, order), want_w.gather(1, want_order))


def test_norm_topk_prob_normalises_and_scaling_multiplies():
    x = torch.randn(10, 32)
    moe = _moe(norm_topk_prob=True)
    _, _, w = moe.gate(x)
    assert torch.allclose(w.sum(-1), torch.ones(10), atol=1e-6)
    moe = _moe(routed_scaling_factor=16.0)
    scores, idx, w = moe.gate(x)
    assert torch.allclose(w, 16.0 * scores.gather(1, idx))


def test_moe_forward_matches_per_token_definition():
    moe = _moe()
    x = torch.randn(2, 5, 32)
    y = moe(x)
    scores, idx, w = moe.gate(x.view(-1, 32))
    w13, w2 = moe.experts.w13, moe.experts.w2
    ref = []
    for t, u in enumerate(x.view(-1, 32)):
        out = moe.shared_experts(u)
        for k in range(idx.shape[1]):
            e = idx[t, k]
            g, up = (w13[e] @ u).chunk(2)
            out = out + w[t, k] * (w2[e] @ (torch.nn.functional.silu(g) * up))
        ref.append(out)
    assert (y.view(-1, 32) - torch.stack(ref)).abs().max() < 1e-5


def test_grouped_mm_and_loop_agree_forward_and_backward():
    moe = _moe()
    x = torch.randn(3, 7, 32, requires_grad=True)
    outs, grads = [], []
    for grouped in (True, False):
        moe.experts.impl = "grouped" if grouped else "loop"
        moe.zero_grad()
        x.grad = None
        y = moe(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append((x.grad.clone(), moe.experts.w13.grad.clone(), moe.experts.w2.grad.clone()))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-4


def _paper_losses(scores, idx, cfg):
    """The paper's formulas written out with loops (T tokens of one batch, N experts, K active, D devices)."""
    T, N = scores.shape
    K, D = idx.shape[1], cfg.n_group
    M = cfg.topk_group
    chosen = [set(r.tolist()) for r in idx]
    f = [N / (K * T) * sum(i in c for c in chosen) for i in range(N)]
    P = [scores[:, i].mean() for i in range(N)]
    per = N // D
    expert = sum(f[i] * P[i] for i in range(N))
    dev_f = [sum(f[d * per:(d + 1) * per]) / per for d in range(D)]
    dev_P = [sum(P[d * per:(d + 1) * per]) for d in range(D)]
    device = sum(a * b for a, b in zip(dev_f, dev_P))
    comm_f = [D / (M * T) * sum(any(e // per == d for e in c) for c in chosen) for d in range(D)]
    comm = sum(a * b for a, b in zip(comm_f, dev_P))
    return cfg.aux_loss_alpha * expert, cfg.device_loss_alpha * device, cfg.comm_loss_alpha * comm


def test_balance_losses_match_paper_formulas():
    cfg = _cfg()
    moe = _moe()
    x = torch.randn(3, 10, 32)
    scores, idx, _ = moe.gate(x.view(-1, 32))
    got = balance_losses(scores.view(3, 10, -1), idx.view(3, 10, -1), cfg)
    e, d, c = _paper_losses(scores, idx, cfg)
    assert torch.allclose(got["expert_batch"], e) and torch.allclose(got["device"], d)
    assert torch.allclose(got["comm"], c)
    # per-sequence expert loss = mean over sequences of the same formula on each sequence alone
    seq = sum(_paper_losses(scores[s * 10:(s + 1) * 10], idx[s * 10:(s + 1) * 10], cfg)[0] for s in range(3)) / 3
    assert torch.allclose(got["expert_seq"], seq) and torch.allclose(got["expert"], seq)


def test_balance_losses_flow_into_gate_and_model_sums_layers():
    model = DeepseekV2(ModelConfig.from_preset("tiny")).train()
    logits = model(torch.randint(0, 512, (2, 16)))
    losses = model.balance_losses()
    assert len(losses["per_layer"]) == 2  # 3 layers, first dense
    assert torch.allclose(losses["total"], sum(d["expert"] + d["device"] + d["comm"] for d in losses["per_layer"]))
    (logits.mean() * 0 + losses["total"]).backward()
    gate = model.model.layers[1].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.expert_load().shape == (2, 8) and model.expert_load().sum() == 2 * 2 * 16 * 2


def test_alpha_zero_disables_and_eval_has_no_losses():
    moe = _moe(aux_loss_alpha=0.0, device_loss_alpha=0.0, comm_loss_alpha=0.0).train()
    moe(torch.randn(2, 4, 32))
    assert all(float(v.detach()) == 0.0 for v in moe.aux.values())
    moe.eval().aux = {}
    moe(torch.randn(2, 4, 32))
    assert moe.aux == {}


def test_device_token_drop_respects_capacity_and_affinity():
    cfg = _cfg(capacity_factor=1.0)
    B, T, K = 4, 32, 4
    # skew routing: most tokens want device 0
    idx = torch.stack([torch.randperm(16)[:K] for _ in range(B * T)])
    idx[: B * T // 2, :2] = torch.tensor([0, 1])
    aff = torch.rand(B * T, K)
    exempt = torch.tensor([True, False, False, False])
    keep = device_token_drop(aff, idx, B, cfg, exempt_seq=exempt)
    cap = math.ceil(B * T * K / 4)
    dev = idx // 4
    ex = exempt.repeat_interleave(T)[:, None].expand(-1, K)
    assert keep[ex].all()  # exempt sequences never lose tokens
    for d in range(4):
        on_d = dev == d
        assert int((keep & on_d).sum()) <= max(cap, int((on_d & ex).sum()))
        dropped, kept = aff[on_d & ~keep & ~ex], aff[on_d & keep & ~ex]
        if len(dropped) and len(kept):
            assert dropped.max() <= kept.min()  # lowest affinity goes first
    assert (~keep).any()


def test_token_drop_only_in_training():
    cfg_kw = dict(token_drop=True, capacity_factor=0.5, drop_exempt_fraction=0.0)
    moe = _moe(**cfg_kw).train()
    x = torch.randn(2, 16, 32)
    y_train = moe(x)
    assert int(moe.load.sum()) < 2 * 16 * 4  # some pairs dropped
    y_train.sum().backward()
    moe.eval()
    moe(x)
    assert int(moe.load.sum()) == 2 * 16 * 4


@pytest.mark.parametrize("freq,dense,expect", [(1, 1, [False, True, True, True]), (2, 1, [False, False, True, False]),
                                               (1, 0, [True, True, True, True])])
def test_moe_layer_placement(freq, dense, expect):
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=4, moe_layer_freq=freq, first_k_dense_replace=dense)
    assert [cfg.is_moe_layer(i) for i in range(4)] == expect
    model = DeepseekV2(cfg)
    assert [isinstance(layer.mlp, MoE) for layer in model.model.layers] == expect


def test_bf16_autocast_training_step_runs():
    """The CUDA recipe (bf16 autocast) on CPU: grouped experts take the autocast dtype, grads stay fp32."""
    model = DeepseekV2(ModelConfig.from_preset("tiny")).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 512, (2, 16)))
    (logits.float().logsumexp(-1).mean() + model.balance_losses()["total"]).backward()
    assert model.model.layers[1].mlp.experts.w13.grad.dtype == torch.float32
    assert torch.isfinite(model.model.layers[1].mlp.experts.w13.grad).all()


def test_exempt_sequences_are_drawn_once_per_forward_and_kept_whole_in_every_layer(monkeypatch):
    """Token dropping's exempt set (drop_exempt_fraction of the sequences) is one draw per forward, shared by every
    MoE layer, so an exempt sequence really keeps all its tokens; drawn per layer, no sequence would be kept whole."""
    import dsv2.model.moe as moe_mod

    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=5, token_drop=True, capacity_factor=0.5,
                                  drop_exempt_fraction=0.5)
    model = DeepseekV2(cfg).train()
    seen = []
    real = moe_mod.device_token_drop

    def spy(affinity, topk_idx, batch_size, cfg, exempt_seq=None):
        keep = real(affinity, topk_idx, batch_size, cfg, exempt_seq)
        seen.append((exempt_seq, keep))
        return keep

    monkeypatch.setattr(moe_mod, "device_token_drop", spy)
    for _ in range(3):
        seen.clear()
        model(torch.randint(0, 512, (16, 8)))
        assert len(seen) == 4  # the MoE layers
        exempt = seen[0][0]
        assert exempt is not None and exempt.any() and not exempt.all()
        for ex, keep in seen:
            assert torch.equal(ex, exempt)
            assert keep.view(16, 8, -1)[exempt].all()  # every pair of an exempt sequence survives, every layer
        assert any((~keep).any() for _, keep in seen)  # and dropping does happen


class _RecordingDispatcher(LocalDispatcher):
    """A dispatcher installed from outside the model (as expert parallelism will be): counts rows it sends."""

    def __init__(self):
        self.rows = 0

    def dispatch(self, x, topk_idx, topk_w, n_experts, keep=None):
        out = super().dispatch(x, topk_idx, topk_w, n_experts, keep)
        self.rows += out[0].shape[0]
        return out


def test_a_dispatcher_installed_from_outside_carries_the_moe():
    model = DeepseekV2(ModelConfig.from_preset("tiny", initializer_range=0.1)).eval()
    ids = torch.randint(0, 512, (2, 6))
    want = model(ids)
    installed = [_RecordingDispatcher() for _ in model.moe_layers()]
    for moe, d in zip(model.moe_layers(), installed):
        moe.dispatcher = d
    assert torch.allclose(model(ids), want, atol=1e-6)
    assert [d.rows for d in installed] == [2 * 6 * 2] * len(installed)  # every token-expert pair went through


def test_compiled_bf16_training_step_matches_eager():
    """The CUDA training recipe (bf16 autocast + torch.compile) traced on CPU: the grouped experts compile (bf16
    grouped_mm traces) in one graph, forward and backward equal eager."""
    from torch._dynamo.utils import counters

    model = DeepseekV2(ModelConfig.from_preset("tiny", initializer_range=0.1)).train()
    x = torch.randint(0, 512, (2, 16))
    grads = []
    for fn in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        counters.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x).float()
        out.logsumexp(-1).mean().backward()
        grads.append((out.detach(), model.model.layers[1].mlp.experts.w13.grad.clone()))
    assert not counters["graph_break"]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_compiled_expert_path_is_grouped_in_bf16_and_gathered_otherwise(monkeypatch):
    """While compiling, bf16 takes grouped_mm (per-row gathered weights would hold tokens x K expert matrices: far
    too much memory for training), and only fp32 on CPU, where grouped_mm does not trace, gathers."""
    experts = _moe().experts
    counts = torch.tensor([2] * 8 + [0] * 8)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert experts._choose(torch.randn(16, 32, dtype=torch.bfloat16), counts)[0] == "grouped"
    assert experts._choose(torch.randn(16, 32), counts)[0] == "gathered"


def test_small_batches_at_inference_skip_dispatch_on_both_paths(monkeypatch):
    """At inference a single token (decode at batch 1) runs its K experts without dispatch, sort or combine: one
    matmul each (eager CPU, "loop") or through their gathered weights ("gathered", and "auto" while compiling in
    fp32: a compiled CPU step), equal to the dispatched path. On the gathered path so do N tokens while N * K <= E
    (here 4 tokens x top-4 of 16 experts), not 5 (sorted by expert; no load recorded at inference); two tokens on the
    eager loop path and training still dispatch."""
    moe = _moe().eval()
    x = torch.randn(1, 1, 32)
    dispatched = []
    dispatch = moe.dispatcher.dispatch
    monkeypatch.setattr(moe.dispatcher, "dispatch", lambda *a, **k: dispatched.append(1) or dispatch(*a, **k))
    pairs = []
    forward_pairs = moe.experts.forward_pairs
    monkeypatch.setattr(moe.experts, "forward_pairs", lambda *a: pairs.append(1) or forward_pairs(*a))
    with torch.no_grad():
        moe.experts.impl = "grouped"
        ref = moe(x)
        four, five = torch.randn(1, 4, 32), torch.randn(1, 5, 32)
        ref4, ref5 = moe(four), moe(five)
        assert len(dispatched) == 3
        dispatched.clear()
        for impl in ("loop", "gathered"):
            moe.experts.impl = impl
            assert (moe(x) - ref).abs().max() < 1e-5 and moe.load is None
        assert len(pairs) == 1 and not dispatched
        moe.experts.impl = "auto"
        moe(torch.randn(1, 2, 32))  # eager CPU: more than one token dispatches
        assert dispatched and len(pairs) == 1
        dispatched.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert (moe(x) - ref).abs().max() < 1e-5
        assert (moe(four) - ref4).abs().max() < 1e-5 and moe.load is None
        assert len(pairs) == 3 and not dispatched
        assert (moe(five) - ref5).abs().max() < 1e-5
        assert dispatched and len(pairs) == 3 and moe.load is None
        dispatched.clear()
        moe.train()
        assert (moe(x) - ref).abs().max() < 1e-5
        assert dispatched and moe.load.sum() == 4


def test_a_compiled_batch_takes_its_expert_path_at_run_time():
    """Under torch.compile a decode batch's size is symbolic (one graph for every batch size): the graph holds a
    torch.cond that runs forward_pairs up to max_pairs_tokens() tokens and the sorted path above, equal to eager
    on both sides. A Python comparison there would guard the graph and split it in two."""
    moe = _moe().eval()
    assert moe.max_pairs_tokens() == 4
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(moe, backend=backend)
    with torch.no_grad():
        for n in (2, 4, 5, 9, 3):
            x = torch.randn(n, 1, 32)
            torch._dynamo.mark_dynamic(x, 0)
            assert (step(x) - moe(x)).abs().max() < 1e-5
    assert len(graphs) == 1
    conds = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 1
