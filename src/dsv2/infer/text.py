"""Text around the token-id engine: streaming detokenization with stop strings, and the checkpoint's chat template.

The engine only sees token ids; the server and the CLI turn its tokens into text here. `TextStream` decodes
incrementally (a multi-byte character split over tokens is held back until complete), finds stop strings across
token boundaries, and never emits a partial stop string. `ChatTemplate` binds the Jinja `chat_template` of the
checkpoint's tokenizer_config.json (DeepSeek-V2's when it has none) to the tokenizer's one chat encoding.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from pathlib import Path

from dsv2.tokenizer import Tokenizer


class TextStream:
    """Feed token ids with push(); get back the text they complete. After a stop string, `stopped` is True and the
    text ends before it.

    Stop strings are matched incrementally (one Knuth-Morris-Pratt automaton per stop string, fed each new
    character once), so a step costs O(new characters x stop strings) whatever the stop strings' lengths. The text
    ends at the first stop string to complete (the earliest end; of those completing at the same character, the
    earliest start), which is where a streaming client first learns of it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | tuple[str, ...] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self._fail = [_kmp_failure(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # per stop string: its longest prefix that ends the text scanned so far
        self._scanned = 0  # characters of text fed to the automata
        self.ids: list[int] = []
        self.text = ""  # decoded so far, complete characters only
        self.sent = 0  # characters of text already handed out
        self.stopped = False
        self._prefix = self._read = 0  # decode window: ids[_prefix:] re-decoded, ids[_prefix:_read] already in text

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        # a character split across tokens decodes to U+FFFD until its last byte arrives
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The text still held back once the request has ended: an incomplete last character (as U+FFFD, like
        decoding all ids at once) and a possible stop-string prefix."""
        if not self.stopped and self._read < len(self.ids):
            before = self.decode(self.ids[self._prefix:self._read])
            self.text += self.decode(self.ids[self._prefix:])[len(before):]
            self._prefix = self._read = len(self.ids)
        return self._emit(final=True)

    def _scan(self) -> None:
        """Feed the new characters to the automata; cut the text at the first completed stop string."""
        for i in range(self._scanned, len(self.text)):
            ch, cut = self.text[i], None
            for j, s in enumerate(self.stop):
                k, fail = self._state[j], self._fail[j]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    cut = i + 1 - k if cut is None else min(cut, i + 1 - k)
                    k = fail[k - 1]
                self._state[j] = k
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
                break
        self._scanned = len(self.text)

    def _emit(self, final: bool) -> str:
        hold = 0
        if self.stop and not self.stopped:
            self._scan()
            if self.stopped:
                final = True
            elif not final:  # keep back a tail that may still grow into a stop string
                hold = max(self._state)
        end = len(self.text) - hold
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


def _kmp_failure(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


# ByteLevel BPE maps bytes to printable characters (GPT-2's table); invert it to get a token's raw bytes.
def _byte_decoder() -> dict[str, int]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token (special tokens: their UTF-8 name)."""
    piece = tokenizer.tok.id_to_token(token_id) or ""
    if all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece)
    return piece.encode("utf-8")


def special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the special tokens (decoded text leaves them out)."""
    return frozenset(i for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.special)


class TextOffsets:
    """Each token's character offset in the text its tokens decode to (OpenAI's `text_offset`), counting on from
    call to call: the tokens' bytes go through an incremental UTF-8 decoder, so a character split over several
    tokens counts once, at the token that completes it; special tokens (`specials`, left out of the text) count
    nothing."""

    def __init__(self, tokenizer: Tokenizer, specials: frozenset[int]):
        self.tokenizer, self.specials = tokenizer, specials
        self.pos, self._utf8 = 0, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            out.append(self.pos)
            if t not in self.specials:
                self.pos += len(self._utf8.decode(token_bytes(self.tokenizer, t)))
        return out


class ChatTemplate:
    """messages -> prompt text / ids, from the checkpoint's tokenizer_config.json `chat_template` (Jinja).

    A thin binding of a template to the tokenizer: rendering and encoding are Tokenizer.format_chat and
    Tokenizer.apply_chat_template (message contents stay plain text; only the template's markers are special ids).
    """

    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.source = template or tokenizer.chat_template

    @classmethod
    def from_dir(cls, path: str | Path, tokenizer: Tokenizer) -> "ChatTemplate":
        config = Path(path) / "tokenizer_config.json"
        template = None
        if config.is_file():
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return cls(tokenizer, template if isinstance(template, str) else None)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.format_chat(messages, add_generation_prompt, template=self.source)

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, template=self.source)
