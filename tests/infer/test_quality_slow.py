"""Quantization quality on a trained `small` model (a few hundred CPU steps on stdlib text; slow)."""

import copy

import pytest
import torch
from infer_models import byte_prompts, train_bytes_model

from dsv2.infer.paged import logits_through_pool
from dsv2.model.fp8 import convert_model_fp8

# stated tolerances, measured on 8 x 256 held-out tokens, teacher-forced, every key read through the pool
TOLERANCES = {  # variant: (min top-1 agreement with float32, max |logit difference|, max held-out loss increase)
    "KV int8": (0.98, 0.6, 0.01),
    "KV fp8": (0.95, 2.0, 0.05),
    "FP8 weights": (0.97, 1.0, 0.03),
    "FP8 weights + KV int8": (0.97, 1.0, 0.03),
}


@pytest.fixture(scope="module")
def trained_small():
    return train_bytes_model("small", steps=250, batch=8, seq=128, lr=3e-3)


@pytest.mark.slow
def test_quantization_quality_on_trained_small(trained_small):
    x = torch.tensor(byte_prompts(8, 257, seed=11))
    ids, targets = x[:, :-1], x[:, 1:]
    fp8 = convert_model_fp8(copy.deepcopy(trained_small))
    ref = logits_through_pool(trained_small, ids)
    variants = {"KV int8": logits_through_pool(trained_small, ids, "int8"),
                "KV fp8": logits_through_pool(trained_small, ids, "fp8"),
                "FP8 weights": logits_through_pool(fp8, ids),
                "FP8 weights + KV int8": logits_through_pool(fp8, ids, "int8")}

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()

    # it learned something: the byte unigram entropy of this text is 3.14 nats
    assert loss(ref) < 2.9, loss(ref)
    for name, logits in variants.items():
        min_agree, max_diff, max_loss = TOLERANCES[name]
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        diff = (logits - ref).abs().max().item()
        print(f"{name}: agreement {agree:.4f}, max logit diff {diff:.3f}, loss {loss(logits):.4f} vs {loss(ref):.4f}")
        assert agree >= min_agree, (name, agree)
        assert diff < max_diff, (name, diff)
        assert loss(logits) - loss(ref) < max_loss, (name, loss(logits), loss(ref))
