"""The serving engine: paged cache, continuous batching, preemption, sampling options, admission control."""

import threading

import pytest
import torch
from infer_models import tiny_model

from dsv2 import generate
from dsv2.infer.engine import Engine, EngineLoop, QueueFull, SamplingParams
from dsv2.infer.paged import PagedLatentPool, kv_bytes_per_token

PROMPT_LENGTHS = (5, 17, 33, 40, 1, 64)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Greedy continuations of each prompt run by itself through dsv2.generate (dense cache)."""
    return [generate(model, [p], 12)[0] for p in prompts]


@pytest.mark.parametrize("kw", [
    dict(num_blocks=64),
    dict(num_blocks=400, block_size=1),
    dict(num_blocks=64, prefill_chunk=7),  # long prompts prefilled in chunks over several steps
    dict(num_blocks=30, block_size=4),  # too small for all at once: requests wait and get preempted
    dict(num_blocks=64, max_batch_size=2),
])
def test_greedy_matches_running_alone(model, prompts, alone, kw):
    engine = Engine(model, eos_token_id=None, **kw)
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in out] == alone
    assert all(o.finish_reason == "length" for o in out)
    assert engine.pool.num_free == engine.pool.num_blocks  # every block back
    if kw.get("num_blocks") == 30:
        assert engine.num_preemptions > 0


def test_reserve_admission_never_preempts(model, prompts, alone):
    engine = Engine(model, eos_token_id=None, num_blocks=30, block_size=4, admission="reserve")
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in out] == alone
    assert engine.num_preemptions == 0
    # each running request holds a reservation for prompt + max_tokens: together they never exceed the pool
    engine.add_request(prompts[3], SamplingParams(max_tokens=12))  # 52 tokens: 13 blocks
    engine.add_request(prompts[2], SamplingParams(max_tokens=12))  # 45 tokens: 12 blocks
    engine.add_request(prompts[1], SamplingParams(max_tokens=12))  # 29 tokens: 8 blocks, 33 > 30: waits
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    with pytest.raises(ValueError, match="admission"):
        Engine(model, num_blocks=4, admission="greedy")


def test_requests_join_and_leave_between_steps(model, prompts, alone):
    engine = Engine(model, num_blocks=64, eos_token_id=None)
    got = {}
    pending = list(enumerate(prompts))
    ids = {}
    step = 0
    while pending or engine.has_work():
        if pending and step % 3 == 0:  # a new request every third step, while others decode
            i, p = pending.pop(0)
            ids[engine.add_request(p, SamplingParams(max_tokens=12))] = i
        for o in engine.step():
            got.setdefault(ids[o.request_id], []).extend(o.token_ids)
        step += 1
    assert [got[i] for i in range(len(prompts))] == alone


@pytest.mark.parametrize("kind,tol", [("int8", 0.05), ("fp8", 0.25), ("bf16", 0.05)])
def test_quantized_kv_cache_close_to_full_precision(model, prompts, kind, tol):
    ref = Engine(model, num_blocks=64)
    quant = Engine(model, num_blocks=64, kv_cache_dtype=kind)
    assert quant.pool.cache.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[kind]
    for p in prompts[:3]:
        a = ref.generate([p], SamplingParams(max_tokens=1, logprobs=0))[0]
        b = quant.generate([p], SamplingParams(max_tokens=1, logprobs=0))[0]
        assert abs(a.logprobs[0] - b.logprobs[0]) < tol


def test_pool_bytes_per_token_is_the_latent_size():
    cfg = tiny_model().config
    L, d = cfg.num_hidden_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert kv_bytes_per_token(cfg) == L * d * 4
    assert kv_bytes_per_token(cfg, "bf16") == L * d * 2
    assert kv_bytes_per_token(cfg, "int8") == L * (d + 8)  # + a float32 scale for the latent and the rope key
    pool = PagedLatentPool.from_memory(cfg, 100_000, block_size=16)
    assert pool.num_blocks == 100_000 // (16 * L * d * 4)
    storage = pool.cache[:, : pool.num_blocks * 16].nbytes  # without the spare block
    assert storage == pool.nbytes() == pool.num_blocks * 16 * kv_bytes_per_token(cfg)
    with pytest.raises(ValueError, match="holds no block"):
        PagedLatentPool.from_memory(cfg, 1000)


def test_stop_conditions(model, prompts, alone):
    engine = Engine(model, num_blocks=64, eos_token_id=None)
    stop = alone[1][4]
    out = engine.generate([prompts[1]], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))[0]
    assert out.token_ids == alone[1][: alone[1].index(stop) + 1] and out.finish_reason == "stop"
    eos = Engine(model, num_blocks=64, eos_token_id=stop)
    assert eos.generate([prompts[1]], SamplingParams(max_tokens=12))[0].finish_reason == "stop"
    out = eos.generate([prompts[1]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == alone[1] and out.finish_reason == "length"
    short = Engine(model, num_blocks=64, max_model_len=40, eos_token_id=None)
    out = short.generate([prompts[1]], SamplingParams(max_tokens=5))[0]  # 17 + 5 fits in 40
    assert out.token_ids == alone[1][:5]


def test_seeded_sampling_is_reproducible_alone_or_batched(model, prompts):
    engine = Engine(model, num_blocks=64, eos_token_id=None)
    sp = dict(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50)
    seeds = (7, 8, 9)
    alone = [engine.generate([p], SamplingParams(seed=s, **sp))[0].token_ids for p, s in zip(prompts, seeds)]
    batched = engine.generate(prompts[:3], [SamplingParams(seed=s, **sp) for s in seeds])
    assert [b.token_ids for b in batched] == alone  # each row draws from its own seeded generator
    other = engine.generate([prompts[0]], SamplingParams(seed=8, **sp))[0].token_ids
    assert other != alone[0]  # the same prompt with another seed samples differently: the seed is used
    greedy = engine.generate([prompts[0]], SamplingParams(max_tokens=10))[0].token_ids
    cold = engine.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3))[0]
    assert cold.token_ids == greedy  # top_k 1 is greedy


@torch.no_grad()
def test_logprobs_of_chosen_tokens(model, prompts):
    engine = Engine(model, num_blocks=64, eos_token_id=None)
    p = prompts[2]
    rid = engine.add_request(p, SamplingParams(max_tokens=4, logprobs=3))
    outs = [o for _ in range(10) for o in engine.step() if o.request_id == rid]
    toks = [o.token_ids[0] for o in outs]
    full = model(torch.tensor([p + toks]))[0].log_softmax(-1)  # [T, V], full recompute
    for i, o in enumerate(outs):
        want = full[len(p) - 1 + i]
        assert abs(o.logprobs[0] - want[toks[i]].item()) < 1e-4
        top = o.top_logprobs[0]
        assert [t for t, _ in top] == want.topk(3).indices.tolist()
        assert top[0][0] == toks[i]  # greedy picks the most likely


def test_admission_control(model, prompts):
    engine = Engine(model, num_blocks=4, block_size=8, max_waiting=2, eos_token_id=None)  # 32 tokens of cache
    with pytest.raises(ValueError, match="never fit"):
        engine.add_request(prompts[2], SamplingParams(max_tokens=4))  # 33 + 4 tokens
    with pytest.raises(ValueError, match="context length"):
        Engine(model, num_blocks=64, max_model_len=20).add_request(prompts[1], SamplingParams(max_tokens=4))
    for bad in ([], [512], [-1]):
        with pytest.raises(ValueError):
            engine.add_request(bad)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([5], SamplingParams(max_tokens=0))
    a = engine.add_request(prompts[1], SamplingParams(max_tokens=8))  # 25 tokens: 4 blocks
    engine.add_request(prompts[0], SamplingParams(max_tokens=8))
    with pytest.raises(QueueFull):
        engine.add_request(prompts[0], SamplingParams(max_tokens=8))
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1  # the second waits for blocks
    assert engine.abort(a) and not engine.abort(a)
    assert engine.pool.num_free == 4
    while engine.has_work():
        engine.step()
    assert engine.pool.num_free == 4


def test_engine_loop_thread(model, prompts, alone):
    loop = EngineLoop(Engine(model, num_blocks=64, eos_token_id=None)).start()
    try:
        done = threading.Event()
        got: dict[str, list[int]] = {}
        ids = []
        lock = threading.Lock()

        def callback(out):
            with lock:
                got.setdefault(out.request_id, []).extend(out.token_ids)
                if out.finished and len([1 for i in ids if len(got.get(i, [])) == 12]) == len(prompts):
                    done.set()

        with lock:
            ids += [loop.submit(p, SamplingParams(max_tokens=12), callback) for p in prompts]
        assert done.wait(60)
        assert [got[i] for i in ids] == alone
        assert loop.stats()["free_blocks"] == 64
    finally:
        loop.stop()


@pytest.mark.slow
def test_compiled_decode_matches_eager(model, prompts, alone):
    """torch.compile of the decode forward (inductor on CPU: minutes to compile) gives the same tokens, and a weight
    update after compiling is seen (never silently stale)."""
    engine = Engine(model, num_blocks=64, eos_token_id=None, compile=True)
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in out] == alone
    changed = tiny_model(seed=1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), changed.parameters()):
            p.copy_(q)  # in place, as an optimizer step would
    try:
        want = [generate(changed, [p], 12)[0] for p in prompts[:2]]
        assert [o.token_ids for o in engine.generate(prompts[:2], SamplingParams(max_tokens=12))] == want
        assert generate(model, prompts[:2], 12, compile=True) == want
    finally:
        with torch.no_grad():
            for p, q in zip(model.parameters(), tiny_model().parameters()):
                p.copy_(q)


def test_compiled_cpu_step_reads_the_live_weights():
    """The compiled decode forward (dsv2.infer.engine.compiled, inductor on CPU) reads the live weights: an in-place
    update and a replaced parameter both show up in its output, with no recompile (it never checks the weights)."""
    from torch._dynamo.utils import counters

    from dsv2.infer.engine import compiled

    model = tiny_model()
    torch._dynamo.reset()
    counters.clear()
    step = compiled(model)
    ids = torch.tensor([[5, 6, 7, 300]])
    with torch.inference_mode():
        before = step(ids)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    with torch.inference_mode():
        after, want = step(ids), model(ids)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    o_proj = model.model.layers[0].self_attn.o_proj
    o_proj.weight = torch.nn.Parameter(torch.randn_like(o_proj.weight))
    with torch.inference_mode():
        torch.testing.assert_close(step(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
