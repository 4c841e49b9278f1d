"""Decode runs the model's one forward over the paged pool: it equals a full recompute without any cache, for every
model variant, expert path, precision and torch.compile; and the engine, dsv2.generate and the server use it."""

import copy

import pytest
import torch
from infer_models import tiny_model

from dsv2 import generate
from dsv2.config import yarn_scaling
from dsv2.infer.engine import Engine, SamplingParams
from dsv2.infer.paged import PagedBatch, PagedLatentPool
from dsv2.model.fp8 import convert_model_fp8

VARIANTS = {
    "tiny": {},
    "no q_lora": {"q_lora_rank": None},
    "yarn": {"rope_scaling": yarn_scaling(factor=4.0, original_max=32)},
    "greedy routing, normalised, no shared": {"topk_method": "greedy", "n_group": 1, "topk_group": 1,
                                              "norm_topk_prob": True, "n_shared_experts": 0},
    "scaled routing": {"routed_scaling_factor": 2.5},
    "dense only": {"n_routed_experts": 0, "first_k_dense_replace": 3},
}


@torch.no_grad()
def _decode_vs_recompute(model, prompts, kv_dtype=None):
    """Prefill prompts of different lengths into a pool one by one, then ONE batched decode step over the pool.
    Returns (decode logits [B, V], the same positions recomputed from scratch without a cache [B, V])."""
    pool = PagedLatentPool(model.config, num_blocks=32, block_size=4, kv_dtype=kv_dtype,
                           dtype=model.lm_head.weight.dtype)
    tables = []
    for p in prompts:
        blocks = pool.allocate(pool.blocks_for(len(p) + 1))
        model(torch.tensor([p[:-1]]), cache=PagedBatch(pool, [blocks], [0]))
        tables.append(blocks)
    last = torch.tensor([[p[-1]] for p in prompts])
    got = model(last, cache=PagedBatch(pool, tables, [len(p) - 1 for p in prompts]))[:, 0]
    want = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    return got, want


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("lengths", [(7,), (3, 9, 14, 2)])
def test_paged_decode_equals_recompute(name, lengths):
    model = tiny_model(**VARIANTS[name])
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    got, want = _decode_vs_recompute(model, prompts)
    assert (got - want).abs().max() < 1e-4


def test_decode_runs_the_absorbed_path():
    """kv_b_proj is never called as a layer during paged decode (that would expand per-head K/V)."""
    model = tiny_model()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    pool = PagedLatentPool(model.config, num_blocks=8, block_size=4)
    blocks = pool.allocate(2)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=PagedBatch(pool, [blocks], [0]))  # fresh prefill: naive
        n_prefill = len(calls)
        model(torch.tensor([[8]]), cache=PagedBatch(pool, [blocks], [3]))
    assert n_prefill == model.config.num_hidden_layers and len(calls) == n_prefill


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_expert_paths_agree_in_decode(impl):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 8, 2, 11, 6, 3)]
    want = _decode_vs_recompute(model, prompts)[1]
    for moe in model.moe_layers():
        moe.experts.impl = impl
    got = _decode_vs_recompute(model, prompts)[0]
    assert (got - want).abs().max() < 1e-4


def test_auto_expert_path_takes_the_loop_for_a_few_tokens(monkeypatch):
    """On CPU, a decode step with few experts busy runs the per-expert loop, many busy the grouped matmul."""
    import dsv2.model.moe as moe_mod

    model = tiny_model()
    taken = []
    real = moe_mod.RoutedExperts._loop_into_buffers
    monkeypatch.setattr(moe_mod.RoutedExperts, "_loop_into_buffers",
                        lambda self, *a: taken.append("loop") or real(self, *a))
    with torch.no_grad():
        model(torch.tensor([[5, 6]]))
    assert taken  # 2 tokens x top-2 of 8 experts
    taken.clear()
    monkeypatch.setattr(moe_mod, "LOOP_MAX_ACTIVE_EXPERTS", 0)
    with torch.no_grad():
        model(torch.tensor([[5, 6]]))
    assert not taken


def test_fp8_decode_equals_prefill_in_float32():
    """FP8 weights on a float32 model: the absorbed path must dequantize into the compute dtype (float32), as the
    naive path does; a bf16 dequantization moved logits by up to 0.14."""
    model = convert_model_fp8(copy.deepcopy(tiny_model()))
    prompts = [[5, 9, 300, 41], [7, 7, 8], [100, 200, 300, 400, 500, 11]]
    got, want = _decode_vs_recompute(model, prompts)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["bf16", "int8 kv", "fp8 kv"])
def test_decode_other_precisions(kind):
    model, kv = tiny_model(), None
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    else:
        kv = kind.split()[0]
    prompts = [[5, 9, 300, 41], [7, 7, 8]]
    got, want = _decode_vs_recompute(model, prompts, kv)
    # bf16: 8 mantissa bits over 3 layers; 8-bit cache entries: 1/127 (int8) or 1/16 (e4m3) of each vector's max
    tol = {"bf16": 0.1, "int8 kv": 0.05, "fp8 kv": 0.3}[kind]
    assert (got.float() - want.float()).abs().max() < tol
    assert (got.float().argmax(-1) == want.float().argmax(-1)).all()


def test_absorbed_weights_follow_in_place_updates():
    """The absorbed W_UK/W_UV are views of kv_b_proj's weight, prepared once: an optimizer step shows through."""
    model = tiny_model()
    prompts = [[5, 6, 7, 8]]
    _decode_vs_recompute(model, prompts)  # prepares the views
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    got, want = _decode_vs_recompute(model, prompts)
    assert (got - want).abs().max() < 1e-4


def test_engine_generate_and_recompute_agree():
    """The engine (paged, continuous batching), dsv2.generate (dense cache) and greedy decoding by full recompute
    produce the same tokens."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 30, 12)]
    engine = [o.token_ids for o in Engine(model, num_blocks=64, eos_token_id=None).generate(
        prompts, SamplingParams(max_tokens=12))]
    dense = generate(model, prompts, max_new_tokens=12)
    ref = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ref.append(ids[len(p):])
    assert engine == ref and dense == ref


def test_compiled_decode_equals_eager():
    """torch.compile of the one forward (the decode step of the Engine and of dsv2.generate) on CPU gives the eager
    tokens. The aot_eager backend checks the graph capture (no graph breaks, no recompile per step);
    tests/infer/test_engine.py's slow test runs inductor."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    prompts = [[5, 9, 300, 41], [7, 7, 8, 1, 2, 3, 4, 5, 6]]
    sp = SamplingParams(max_tokens=6)
    eager = [o.token_ids for o in Engine(model, num_blocks=32, eos_token_id=None).generate(prompts, sp)]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, num_blocks=32, eos_token_id=None, compile="aot_eager")
    assert [o.token_ids for o in engine.generate(prompts, sp)] == eager
    assert [o.token_ids for o in engine.generate(prompts[::-1], sp)] == eager[::-1]
    assert generate(model, prompts, 6, compile="aot_eager") == eager
    assert not counters["graph_break"]  # the whole decode forward is one graph
    assert counters["stats"]["unique_graphs"] <= 3  # one per cache type (+ batch 1), not one per step


def test_compiled_engine_makes_one_graph_for_every_batch_size_and_width():
    """A serving engine's decode batch shrinks and grows as requests end and join, and its block tables widen: the
    compiled step must not recompile for each (it did when the whole forward was compiled: the cache's Python
    lengths made every batch size a graph). Batch 1 and tables one block wide get their own (torch specialises
    sizes 0 and 1), nothing more."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 20, 9, 33, 12, 40)]
    params = [SamplingParams(max_tokens=m) for m in (3, 6, 9, 14, 20, 26)]  # the batch shrinks 6 -> 1
    eager = [o.token_ids for o in Engine(model, num_blocks=64, eos_token_id=None).generate(prompts, params)]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, num_blocks=64, eos_token_id=None, compile="aot_eager")
    assert [o.token_ids for o in engine.generate(prompts, params)] == eager
    assert [o.token_ids for o in engine.generate(prompts[1:4], params[1:4])] == eager[1:4]
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 3


def test_engine_warmup_compiles_every_decode_shape_before_requests():
    """`Engine.warmup` (what `dsv2 serve --compile` runs before it listens) builds every graph the compiled decode
    step needs, so requests of any batch size and length afterwards compile nothing, and it leaves no trace."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 30, 9, 17)]
    params = [SamplingParams(max_tokens=m) for m in (4, 22, 9, 30)]  # batch 4 -> 1, tables 1 -> 4 blocks
    eager = [o.token_ids for o in Engine(model, num_blocks=64, block_size=8, eos_token_id=None).generate(
        prompts, params)]
    assert Engine(model, num_blocks=64, eos_token_id=None).warmup() == 0  # nothing to compile
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, num_blocks=64, block_size=8, eos_token_id=None, compile="aot_eager")
    assert engine.warmup() == 3  # one request alone, then two together
    built = counters["stats"]["unique_graphs"]
    assert engine.stats()["free_blocks"] == 64 and not engine.has_work() and not engine.requests
    assert [o.token_ids for o in engine.generate(prompts, params)] == eager
    assert [o.token_ids for o in engine.generate(prompts[2:], params[2:])] == eager[2:]
    assert counters["stats"]["unique_graphs"] == built  # nothing compiled while serving
    engine.add_request([5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="before adding requests"):
        engine.warmup()


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_compiled_step_keeps_the_pool_size_static(kv_dtype):
    """Two engines over one model with pools of different sizes: the second compiled step must see the pool (its
    tensors, and the block count the gather's shape is taken from) as fixed sizes; only the batch and the block
    table width vary. torch.compile otherwise makes the pool's size symbolic on its second value, and inductor then
    copies every gathered row again element by element with integer divisions: the compiled batch-16 step of
    `small` took twice as long (benchmarks/decode_throughput.py --compile)."""
    from torch._dynamo import register_backend
    from torch.fx.experimental.symbolic_shapes import free_symbols

    inputs, backend = [], f"dsv2_capture_inputs_{kv_dtype}"

    def capture(gm, example_inputs):
        inputs.append([n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"])
        return gm

    register_backend(capture, backend)

    model = tiny_model()
    torch._dynamo.reset()
    for blocks in (16, 40):
        engine = Engine(model, num_blocks=blocks, block_size=4, kv_cache_dtype=kv_dtype, eos_token_id=None,
                        compile=backend)
        engine.generate([[5, 9, 300, 41, 7]] * 3, SamplingParams(max_tokens=4))
    assert len(inputs) == 2  # a graph for each pool size
    symbols = set().union(*(free_symbols(v) for v in inputs[-1] if isinstance(v, (torch.Tensor, torch.SymInt))))
    assert len(symbols) == 2  # the batch and the table width


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
@torch.no_grad()
def test_compiled_step_writes_its_caches_in_place(kv_dtype):
    """The compiled step writes this token's latents into the pool (and dsv2.generate's dense cache) in place. A
    write into a per-layer view of the cache would make the compiled code scatter the view back into the whole
    tensor (`select_scatter`), copying the pool at every step (what made a compiled engine over a 256 MB pool
    slower than eager)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    model = tiny_model()
    layers = torch.compile(model.layers_forward, backend=aot_autograd(fw_compiler=lambda gm, _: graphs.append(
        gm.code) or gm))
    prompts = [[5, 9, 300, 41, 7], [7, 7, 8]]
    ids = torch.tensor([p + [0] * (5 - len(p)) for p in prompts])
    for compiled_step in (False, True):
        pool = PagedLatentPool(model.config, 8, 4, kv_dtype)
        tables = [pool.allocate(2) for _ in prompts]
        dense = model.new_cache(2, 8)
        for cache in (PagedBatch(pool, tables, [0, 0]), dense):
            model(ids, cache=cache, input_lengths=[5, 3])  # prefill, eager
        logits = [model.run_step(torch.tensor([[11], [12]]), cache=c, layers=layers if compiled_step else None)
                  for c in (PagedBatch(pool, tables, [5, 3]), dense)]
        if not compiled_step:
            eager = logits
    torch.testing.assert_close(logits, eager)
    assert len(graphs) == 2 and not any("select_scatter" in g or "slice_scatter" in g for g in graphs)


def test_compile_options_and_when_it_compiles_again(monkeypatch):
    """inductor on CPU runs with its C++ wrapper (FP8 models with the defaults) and without freezing, which would
    fold the weights in: an unchanged model, a weight updated in place and a replaced module all reuse the compiled
    forward (it reads the live weights: tests/infer/test_engine.py compiles for real), and a change of torch's
    thread count compiles again (inductor writes its CPU kernels for the threads at hand)."""
    import dsv2.infer.engine as engine_mod

    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or m)
    model, fp8 = tiny_model(), convert_model_fp8(tiny_model())
    engine_mod.compiled(model)
    engine_mod.compiled(fp8)
    assert calls[0]["options"] == {"cpp_wrapper": True} and calls[1]["options"] is None
    engine_mod.compiled(model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    engine_mod.compiled(model)
    assert len(calls) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        engine_mod.compiled(model)
        engine_mod.compiled(model)
        assert len(calls) == 3
    finally:
        torch.set_num_threads(threads)


def test_generate_takes_any_token_id_rows_and_refuses_bad_ids():
    """dsv2.generate takes tuples or a [B, T] tensor as well as lists; ids outside the vocabulary and non-integer
    prompts are a ValueError that says so (not an IndexError from deep inside the embedding)."""
    model = tiny_model()
    want = generate(model, [[5, 9, 300], [7, 8, 9]], 4)
    assert generate(model, [(5, 9, 300), (7, 8, 9)], 4) == want
    assert generate(model, torch.tensor([[5, 9, 300], [7, 8, 9]]), 4) == want
    for bad in ([[5, 512]], [[-1, 5]]):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
            generate(model, bad, 2)
    with pytest.raises(ValueError, match="list of token-id lists"):
        generate(model, ["hello"], 2)
