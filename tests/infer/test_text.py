"""Streaming detokenization, stop strings, token bytes, and the checkpoint's chat template."""

import pytest

from dsv2.infer.text import ChatTemplate, TextStream, token_bytes
from dsv2.tokenizer import Tokenizer

TEXT = "naïve café — 世界 says «hello»\n\tdef f(x): return x ** 2  # ok"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def test_streaming_decode_equals_decoding_all_at_once(tok):
    ids = tok.encode(TEXT)
    stream = TextStream(tok.decode)
    pieces = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte characters are held back, never garbled
    # a sequence that ends inside a character flushes it as decoding everything would
    cut = tok.encode("世")[:-1]
    s = TextStream(tok.decode)
    assert s.push(cut) == "" and s.finish() == tok.decode(cut)


@pytest.mark.parametrize("stop", ["café", "é —", "return", "\n\t", "x ** 2  # ok"])
def test_stop_strings_across_tokens(tok, stop):
    ids = tok.encode(TEXT)
    stream = TextStream(tok.decode, ["zzz", stop])
    out = ""
    for i in ids:
        out += stream.push([i])
        assert TEXT[: TEXT.index(stop)].startswith(out)  # nothing of the stop string ever leaks out
        if stream.stopped:
            break
    out += stream.finish()
    assert stream.stopped and out == TEXT[: TEXT.index(stop)]


def test_no_stop_match_emits_everything(tok):
    stream = TextStream(tok.decode, ["never there"])
    out = "".join(stream.push([i]) for i in tok.encode(TEXT)) + stream.finish()
    assert out == TEXT and not stream.stopped


def test_token_bytes(tok):
    ids = tok.encode(TEXT)
    assert b"".join(token_bytes(tok, i) for i in ids) == TEXT.encode()
    assert token_bytes(tok, tok.eos_id) == tok.eos_token.encode()


def test_chat_template_from_checkpoint(tok, tokenizer_dir, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    template = ChatTemplate.from_dir(tokenizer_dir, tok)
    assert template.source  # the Jinja template stored in tokenizer_config.json
    assert template.render(msgs) == tok.format_chat(msgs)
    assert template.encode(msgs) == tok.apply_chat_template(msgs)
    custom = ChatTemplate(tok, "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert custom.render(msgs[:2]) == "<system>Be brief.<user>Hi<assistant>"
    assert ChatTemplate.from_dir(tmp_path, tok).render(msgs) == tok.format_chat(msgs)  # no config: DeepSeek's
