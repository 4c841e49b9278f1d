"""Tests for dsv2.tokenizer: training, round trips, the HF format and the DeepSeek-V2 chat template."""

import argparse
import json
from pathlib import Path

import pytest
import transformers  # a declared dev dependency: its absence must fail, not skip

from dsv2.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    add_tokenizer_command,
    train_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 10,
    "深度求索发布了混合专家语言模型。多头潜在注意力压缩了键值缓存。" * 10,
    "Emoji: 🤖🚀✨ and accents: café, naïve, Straße. Numbers 3.14159 and 2024-05-07. " * 10,
    Path(json.__file__).read_text(encoding="utf-8"),  # ~14 KB of varied text, enough for 512 ids
]

SAMPLES = [
    "Hello, world!",
    "  leading spaces, trailing tabs\t\t\n\nand blank lines\n",
    "中文混合English文本，标点！",
    "emoji 🤖🚀 and ZWJ 👩‍💻 and flags 🇨🇳",
    "def f(x):\n\treturn x ** 2  # comment",
    "combining e\u0301 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and Ω≈ç√",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? 你好"},
    {"role": "assistant", "content": "4 🤖"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def hf(saved):
    return transformers.AutoTokenizer.from_pretrained(str(saved))


def test_special_ids_and_exact_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == len(tok) == 512
    assert [tok.tok.id_to_token(i) for i in range(3)] == [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]


def test_vocab_never_exceeds_target_when_corpus_runs_out_of_merges():
    small = train_tokenizer(["abab"], vocab_size=1000)
    assert 259 <= small.vocab_size < 1000


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_id, *ids]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.decode([tok.bos_id, *ids], skip_special_tokens=False) == BOS_TOKEN + text


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES, add_bos=True) == [tok.encode(s, add_bos=True) for s in SAMPLES]


def test_pre_tokenizer_splits_digits_and_cjk(tok):
    # DeepSeek's rules: digits one by one, CJK runs never merged with Latin letters.
    pieces = [p for p, _ in tok.tok.pre_tokenizer.pre_tokenize_str("abc中文def 2024")]
    decoded = [tok.tok.decoder.decode([p]) for p in pieces]
    assert decoded == ["abc", "中文", "def", " ", "2", "0", "2", "4"]
    assert len(tok.encode("1234567")) == 7


def test_special_token_text_becomes_its_id(tok):
    assert tok.encode(f"hi{EOS_TOKEN}") == [*tok.encode("hi"), tok.eos_id]


def test_autotokenizer_loads_saved_dir(tok, hf):
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    for text in SAMPLES:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids
        # Like DeepSeek's published tokenizer, HF prepends bos by default.
        assert hf(text).input_ids == tok.encode(text, add_bos=True)
        assert hf.decode(ids) == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf, add_generation_prompt):
    ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert ours == list(theirs)
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.format_chat(MESSAGES, add_generation_prompt) == text


def test_chat_format_text(tok):
    text = tok.format_chat(MESSAGES[1:3], add_generation_prompt=False)
    assert text == f"{BOS_TOKEN}User: What is 2+2? 你好\n\nAssistant: 4 🤖{EOS_TOKEN}"
    assert tok.format_chat(MESSAGES[1:2]).endswith("\n\nAssistant:")
    ids = tok.apply_chat_template(MESSAGES[1:3], add_generation_prompt=False)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_saved_config(saved):
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def test_load_dir_or_file(tok, saved):
    for path in (saved, saved / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
        assert loaded.fingerprint == tok.fingerprint


def test_load_reads_names_from_config(tok, tmp_path):
    # DeepSeek-V2's tokenizer_config.json stores tokens as AddedToken dicts and sets pad to eos.
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": EOS_TOKEN, "lstrip": False}
    config = {"bos_token": {"__type": "AddedToken", "content": BOS_TOKEN}, "eos_token": eos, "pad_token": eos}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 1)


def test_load_without_config_uses_deepseek_names(tok, tmp_path):
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=258)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=512)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", ""], vocab_size=512)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    with pytest.raises(ValueError, match="has no token"):
        Tokenizer(tok.tok, bos_token="<no such token>")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="dsv2")
    add_tokenizer_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_train(tmp_path, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    for i, text in enumerate(CORPUS):
        (data / f"doc{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "tok"
    args = _cli(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out)])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    n = len(CORPUS)
    assert f"{n} files" in line and f"{n} documents" in line and "vocab 300" in line
    assert Tokenizer.load(out).vocab_size == 300

    args = _cli(["tokenizer", "train", "--data", str(tmp_path / "nope"), "--vocab-size", "300", "--out", str(out)])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    with pytest.raises(SystemExit):
        _cli(["tokenizer", "train", "--out", str(out)])  # --vocab-size is required
