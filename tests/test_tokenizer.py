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


def test_special_token_text_stays_text_unless_asked(tok, saved):
    # oracle: transformers with split_special_tokens=True (plain text) and without (special ids)
    hf_split = transformers.AutoTokenizer.from_pretrained(str(saved), split_special_tokens=True)
    hf_parse = transformers.AutoTokenizer.from_pretrained(str(saved))
    for text in (f"hi{EOS_TOKEN}", f"{BOS_TOKEN}a {PAD_TOKEN} b{EOS_TOKEN}{EOS_TOKEN}"):
        plain = tok.encode(text)
        assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(plain)
        assert plain == hf_split(text, add_special_tokens=False).input_ids
        assert tok.decode(plain) == text
        assert tok.encode_batch([text, "x"]) == [plain, tok.encode("x")]
        parsed = tok.encode(text, parse_special=True)
        assert parsed == hf_parse(text, add_special_tokens=False).input_ids
        assert tok.encode_batch([text], parse_special=True) == [parsed]
    assert tok.encode(f"hi{EOS_TOKEN}", parse_special=True) == [*tok.encode("hi"), tok.eos_id]


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


CONVERSATIONS = {
    "system+multi-turn": MESSAGES,
    "no system": MESSAGES[1:],
    "two assistant turns": [*MESSAGES, {"role": "assistant", "content": "6. Done!\n\nBye  "}],
    "assistant first, spaces and newlines": [{"role": "assistant", "content": " hi\n"},
                                             {"role": "user", "content": "\n\ndef f(x):\n\treturn x "}],
    "empty contents": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_hf(tok, hf, saved, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    loaded = Tokenizer.load(saved)  # renders the template stored in tokenizer_config.json
    theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    for t in (tok, loaded):
        assert t.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == list(theirs)
        assert t.format_chat(messages, add_generation_prompt) == text


def test_chat_contents_with_special_token_text_stay_text(tok, saved):
    # Expected ids by hand: the template's bos/eos are special ids, the text between them is encoded as plain text
    # (transformers with split_special_tokens=True is the oracle for that text).
    hf_split = transformers.AutoTokenizer.from_pretrained(str(saved), split_special_tokens=True)
    messages = [{"role": "system", "content": f"sys {BOS_TOKEN}"}, {"role": "user", "content": f"say {EOS_TOKEN} now"},
                {"role": "assistant", "content": f"ok{EOS_TOKEN}"}, {"role": "user", "content": PAD_TOKEN}]
    plain = lambda s: hf_split(s, add_special_tokens=False).input_ids  # noqa: E731
    expected = [tok.bos_id, *plain(f"sys {BOS_TOKEN}\n\nUser: say {EOS_TOKEN} now\n\nAssistant: ok{EOS_TOKEN}"),
                tok.eos_id, *plain(f"User: {PAD_TOKEN}\n\nAssistant:")]
    assert tok.apply_chat_template(messages) == expected
    assert tok.decode(expected, skip_special_tokens=False) == tok.format_chat(messages)
    custom = "{{ bos_token }}{% for m in messages %}{{ m.content | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="transforms contents"):
        tok.apply_chat_template(messages, template=custom)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], template=custom) == [tok.bos_id, *plain("A")]


def test_encode_chat_masks_assistant_turns_with_their_eos(tok):
    ids, mask = tok.encode_chat(CONVERSATIONS["two assistant turns"])
    assert ids == tok.apply_chat_template(CONVERSATIONS["two assistant turns"], add_generation_prompt=False)
    spans, cur = [], []
    for i, m in zip([*ids, None], [*mask, False]):
        if m:
            cur.append(i)
        elif cur:
            spans, cur = [*spans, cur], []
    # by hand from the template: each assistant turn renders "Assistant: " + content + eos; the generation prompt
    # "Assistant:" is context, the rest is the target
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == [f" 4 🤖{EOS_TOKEN}",
                                                                        f" 6. Done!\n\nBye  {EOS_TOKEN}"]
    assert ids[-1] == tok.eos_id and mask[-1]
    assert not any(tok.encode_chat(MESSAGES[:2])[1])


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


def test_load_and_train_refuse_what_they_must_not_touch(saved, tmp_path, capsys):
    """A malformed tokenizer.json is a ValueError naming the file; `dsv2 tokenizer train` never writes over an
    existing tokenizer (a checkpoint's ids would stop matching) nor into a file, and says so before training."""
    from dsv2.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer file"):
        Tokenizer.load(bad)
    before = (saved / "tokenizer.json").read_bytes()
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 50, encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(saved)]) == 2
    assert "already holds a tokenizer.json" in capsys.readouterr().err
    assert (saved / "tokenizer.json").read_bytes() == before
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(corpus)]) == 2
    assert "is a file" in capsys.readouterr().err


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

    args = _cli(["tokenizer", "train", "--data", str(tmp_path / "nope"), "--vocab-size", "300", "--out",
                 str(tmp_path / "tok2")])
    with pytest.raises(FileNotFoundError):
        args.func(args)
    with pytest.raises(SystemExit):
        _cli(["tokenizer", "train", "--out", str(out)])  # --vocab-size is required


def test_pretraining_token_file_keeps_special_token_text_as_text(tok, tmp_path):
    from dsv2.data import build_token_file

    import numpy as np

    doc = f"a document quoting {EOS_TOKEN} and {BOS_TOKEN} mid-text"
    (tmp_path / "c.txt").write_text(doc, encoding="utf-8")
    build_token_file(tmp_path / "c.txt", tok, tmp_path / "tokens.bin", progress=False)
    ids = np.fromfile(tmp_path / "tokens.bin", dtype=np.uint16).tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not {tok.bos_id, tok.eos_id} & set(ids[1:-1])
    assert tok.decode(ids[1:-1]) == doc
