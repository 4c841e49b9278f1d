"""Byte-level BPE tokenizer (the paper's BBPE): train, load, save, chat template.

A thin wrapper over the `tokenizers` library. A saved directory (tokenizer.json + tokenizer_config.json)
loads in `transformers.AutoTokenizer.from_pretrained(dir)` with the same ids, and `Tokenizer.load` reads
DeepSeek's own published tokenizer.json the same way.

    dsv2 tokenizer train --data corpus/ --vocab-size 8192 --out runs/tok
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

# DeepSeek-V2's special token names (fullwidth bars, U+2581 for spaces).
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
_GIL_FREE_CHARS = 1 << 16  # encode() hands texts longer than this to the GIL-releasing batch encoder

# As published in deepseek-ai/DeepSeek-V2-Chat's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# CJK ideographs, kana and Hangul. The GPT-2 regex treats them as letters and would glue a Chinese run
# to adjacent Latin letters; DeepSeek's tokenizer isolates such runs, so we do too.
_CJK_RUN = "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # DeepSeek's published tokenizer.json uses a long hand-written list of Split regexes. We approximate
    # it with its two documented rules (numbers split into single digits, CJK runs isolated) followed
    # by the GPT-2 regex split inside ByteLevel, which keeps words, punctuation and whitespace apart.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(_CJK_RUN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, show_progress: bool = False
) -> Tokenizer:
    """Train byte-level BPE on `texts` and optionally save it to `out_dir`.

    Ids: the three special tokens take 0 (bos), 1 (eos), 2 (pad), then the 256 byte tokens, then merges.
    `vocab_size` counts all of them and is the model's embedding size: the result has exactly
    `vocab_size` tokens unless the corpus runs out of pairs to merge, in which case it has fewer (those
    embedding rows are simply never used); it never has more.
    """
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise ValueError(f"vocab_size {vocab_size} is too small: need at least {n_min} (256 bytes + specials)")
    tok = tokenizers.Tokenizer(models.BPE())  # no unk token: every byte has a token
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    # Like DeepSeek's HF tokenizer, `AutoTokenizer(text)` prepends bos; our own encode() does not unless
    # asked (it always passes add_special_tokens=False and adds bos itself).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    n_docs = 0

    def counted() -> Iterator[str]:
        nonlocal n_docs
        for text in texts:
            if text:
                n_docs += 1
                yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_docs == 0:
        raise ValueError("empty corpus: no text to train the tokenizer on")
    out = Tokenizer(tok)
    if out_dir is not None:
        out.save(out_dir)
    return out


def _token_name(value, default: str) -> str:
    # tokenizer_config.json stores a token as a string or as {"content": ..., "__type": "AddedToken"}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _chat_template(value) -> str:
    # a string, or transformers' list of named templates [{"name": "default", "template": ...}, ...]
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) and value else CHAT_TEMPLATE


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of bos, eos and pad and the DeepSeek-V2 chat format."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        chat_template: str = CHAT_TEMPLATE,
    ):
        self.tok = tok
        self.chat_template = chat_template  # Jinja, as in tokenizer_config.json; DeepSeek-V2's by default
        self.bos_token, self.eos_token = bos_token, eos_token
        for name in (bos_token, eos_token):
            if tok.token_to_id(name) is None:
                raise ValueError(f"tokenizer has no token {name!r}")
        # DeepSeek-V2's own tokenizer_config sets pad to eos; fall back to eos for any tokenizer without
        # a pad token rather than refusing to load it.
        self.pad_token = pad_token if tok.token_to_id(pad_token) is not None else eos_token

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json (a file, or a directory holding one) and tokenizer_config.json beside it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        config_file = file.parent / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except ValueError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for a malformed file
            raise ValueError(f"{file}: not a valid tokenizer file ({e})") from None
        return cls(
            tok,
            bos_token=_token_name(config.get("bos_token"), BOS_TOKEN),
            eos_token=_token_name(config.get("eos_token"), EOS_TOKEN),
            pad_token=_token_name(config.get("pad_token"), PAD_TOKEN),
            chat_template=_chat_template(config.get("chat_template")),
        )

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (HF format, with the chat template)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            # HF's default cleanup rewrites " ." to "." on decode; byte-level BPE must round-trip exactly.
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")

    @property
    def bos_id(self) -> int:
        return self.tok.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tok.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids in use (largest id + 1); the model's vocab_size must be at least this."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether this tokenizer's own post-processing puts bos first (what transformers' `tokenizer(text)` and
        vLLM's completions do with it): True for the tokenizers dsv2 trains and for DeepSeek's."""
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and self.bos_id is not None and ids[0] == self.bos_id

    @functools.cached_property
    def fingerprint(self) -> str:
        """Short hash of the full tokenizer definition, to tell whether token files were made with it."""
        return hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str, add_bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (bos first when add_bos). Special-token strings inside `text` (e.g. the eos token's
        name typed by a user) stay plain text unless `parse_special`, as transformers' `split_special_tokens=True`
        and vLLM do for user content; only the chat template's own markers become special ids (see
        apply_chat_template).

        Long texts go through the batch encoder, which releases the GIL while it works: a server thread encoding a
        multi-megabyte message then does not stall the event loop (the single-text call holds the GIL)."""
        tok = self.tok if parse_special else self._plain
        if len(text) > _GIL_FREE_CHARS:
            ids = tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        else:
            ids = tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False, *, parse_special: bool = False) -> list[list[int]]:
        """encode() over many texts at once (parallel in the Rust library)."""
        encs = (self.tok if parse_special else self._plain).encode_batch_fast(texts, add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encs]

    @functools.cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        # The same tokenizer with special-token matching off: their strings are split like any other text.
        plain = tokenizers.Tokenizer.from_str(self.tok.to_str())
        plain.encode_special_tokens = True
        return plain

    @functools.cached_property
    def _added_strings(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.tok.get_added_tokens_decoder().values())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------------------------------
    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None) -> str:
        """The chat text: `template` (default: this tokenizer's chat_template) rendered with Jinja exactly as
        transformers' apply_chat_template(tokenize=False) renders it."""
        return _compile(template or self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
            eos_token=self.eos_token, pad_token=self.pad_token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None) -> list[int]:
        """messages -> token ids, the one chat encoding (SFT, RM, GRPO, generate/chat, the server).

        The template's own markers (bos, eos) become special ids; message contents are plain text, so a user who
        types the eos token's name gets its characters, not an eos. Text between markers is encoded whole, as
        transformers does, so the ids equal `AutoTokenizer.apply_chat_template(messages)` whenever no content
        holds special-token text (encoding turn by turn would split "\n\nAssistant" differently at the seams)."""
        text = self.format_chat(messages, add_generation_prompt, template)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and t in c for c in contents for t in self._added_strings):
            return self.encode(text, parse_special=True)
        # Render again with each content replaced by a marker, check that putting the contents back gives the same
        # text, then encode the template's text with special tokens and the contents as plain text.
        tag = "\ue000"
        while any(tag in str(c) for c in contents) or tag in (template or self.chat_template):
            tag += "\ue000"
        marked_messages = [{**m, "content": f"{tag}{i}{tag}"} if isinstance(m.get("content"), str) else m
                           for i, m in enumerate(messages)]
        marked = self.format_chat(marked_messages, add_generation_prompt, template).split(tag)
        # marked alternates template text and content index: [text, "i", text, "j", text, ...]
        rebuilt = "".join(part if k % 2 == 0 else contents[int(part)] for k, part in enumerate(marked))
        if len(marked) % 2 == 0 or rebuilt != text:
            raise ValueError("message content holds special-token text and the chat template transforms contents, "
                             "so it cannot be kept as plain text")
        ids: list[int] = []
        pending = ""  # plain text waiting to be encoded in one piece
        for k, part in enumerate(marked):
            if k % 2:
                pending += contents[int(part)]
                continue
            for j, piece in enumerate(self._split_special(part)):
                if j % 2:
                    ids += self.encode(pending)
                    ids.append(self.tok.token_to_id(piece))
                    pending = ""
                else:
                    pending += piece
        return ids + self.encode(pending)

    def _split_special(self, text: str) -> list[str]:
        """[text, special, text, special, ..., text]: `text` cut at the added tokens' strings (longest first)."""
        pattern = "(" + "|".join(re.escape(t) for t in sorted(self._added_strings, key=len, reverse=True)) + ")"
        return re.split(pattern, text)

    def encode_chat(self, messages: list[dict], template: str | None = None) -> tuple[list[int], list[bool]]:
        """(ids, mask) of a whole conversation for training: mask[t] is True where ids[t] is a target of the loss,
        i.e. the tokens of every assistant turn, its closing eos included.

        The mask comes from rendering prefixes: assistant turn i spans from the end of the conversation up to it
        plus the generation prompt ("...Assistant:") to the end of the conversation through turn i. Where a prefix
        does not encode to a prefix of the whole (a merge across the seam), the span starts where they part."""
        ids = self.apply_chat_template(messages, add_generation_prompt=False, template=template)
        mask = [False] * len(ids)
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = _common_prefix(ids, self.apply_chat_template(messages[:i], True, template))
            end = _common_prefix(ids, self.apply_chat_template(messages[: i + 1], False, template))
            mask[start:end] = [True] * (end - start)
        return ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """A Jinja chat template compiled in transformers' environment (sandboxed; trim_blocks, lstrip_blocks,
    loop controls, raise_exception, tojson)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # jinja2 is a dependency of torch

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def add_tokenizer_command(subparsers) -> None:
    """Register `dsv2 tokenizer train` on the CLI's subparsers."""
    parser = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    verbs = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = verbs.add_parser("train", help="train on a corpus and save tokenizer.json + tokenizer_config.json")
    train.add_argument("--data", default=None, help="file, directory or glob (default: Python stdlib sources)")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids including special tokens")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--max-bytes", type=int, default=None, help="use at most this many bytes of text")
    train.add_argument("--text-field", default="text", help="field/column holding text in .jsonl/.parquet")
    train.set_defaults(func=_train_command)


def _train_command(args: argparse.Namespace) -> int:
    from dsv2.data import iter_corpus_texts  # data imports nothing from here; keep the CLI import lazy

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if (out / "tokenizer.json").exists():  # a checkpoint's or another run's: its ids would no longer match
        raise ValueError(f"{out} already holds a tokenizer.json: a new tokenizer never replaces one; choose another "
                         "--out or remove it first")
    stats: dict = {}
    start = time.perf_counter()
    texts = iter_corpus_texts(args.data, max_bytes=args.max_bytes, text_field=args.text_field, stats=stats)
    # The Rust progress bar writes to stdout, and only blank lines when it is not a terminal.
    tok = train_tokenizer(texts, args.vocab_size, out_dir=args.out, show_progress=sys.stdout.isatty())
    print(
        f"tokenizer: {stats['files']} files, {stats['bytes']:,} bytes, {stats['documents']} documents -> "
        f"vocab {tok.vocab_size} (target {args.vocab_size}) in {time.perf_counter() - start:.1f}s, "
        f"saved to {args.out}"
    )
    return 0
