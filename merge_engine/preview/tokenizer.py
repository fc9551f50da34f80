"""CLIP's byte-level BPE tokenizer, written from the published algorithm, standard library only.

Stable Diffusion's text encoders (CLIP ViT-L for SD1 and SDXL, OpenCLIP ViT-H for SD2 and
ViT-bigG for SDXL) all use OpenAI CLIP's vocabulary, shipped here as package data
(`merge_engine/data/bpe_simple_vocab_16e6.txt.gz`, MIT, see CLIP-VOCAB-SOURCE.md).

The pipeline is CLIP's: clean the text, lower-case it, split it into words with CLIP's
pre-tokenizer (the special tokens; the contractions 's 't 're 've 'm 'll 'd; runs of letters;
single digits; runs of anything that is neither letter, digit nor space), map each word's UTF-8
bytes to printable characters, then apply the BPE merges in rank order, the last symbol of a
word carrying `</w>`.

Two deliberate differences from CLIP's reference code, both documented:
* CLIP cleans text with `ftfy.fix_text`. ftfy is not a dependency, so `clean_text` applies the
  parts of it that matter for prompts (Latin ligatures, full-width forms, curly quotes, stray
  control characters, NFC) but not its mojibake repair or its repeated HTML unescaping; CLIP's
  own double `html.unescape` is kept.
* CLIP's pre-tokenizer is a `regex` pattern using `\\p{L}` and `\\p{N}`, which the standard `re`
  module lacks (its `\\w` counts superscripts and fractions as letters). `split_words` is the
  same grammar as a small scanner over `unicodedata` categories, so no extra dependency.
"""

from __future__ import annotations

import gzip
import html
import re
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77  # one window: start token, 75 text tokens, end token
CHUNK_LENGTH = CONTEXT_LENGTH - 2
# OpenAI's CLIP-L tokenizer pads with the end token; OpenCLIP's pads with 0 after the first end.
PAD_CLIP_L = END_TOKEN
PAD_OPENCLIP = 0
# Which padding each architecture's text encoders were trained with.
PAD_TOKENS = {
    ("sd1", "text_encoder"): PAD_CLIP_L,
    ("sd2", "text_encoder"): PAD_OPENCLIP,
    ("sdxl", "text_encoder"): PAD_CLIP_L,
    ("sdxl", "text_encoder_2"): PAD_OPENCLIP,
}

_MERGE_COUNT = 49152 - 256 - 2  # the vocabulary file's lines 1..48894 are the merges, by rank
_SPECIAL = {"<|startoftext|>": START_TOKEN, "<|endoftext|>": END_TOKEN}
_CONTRACTION = re.compile(r"'(?:s|t|re|ve|m|ll|d)", re.IGNORECASE)

# The subset of ftfy.fix_text that changes how prompts tokenize.
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
})
_CURLY_QUOTES = str.maketrans({
    **{chr(c): "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},
    **{chr(c): '"' for c in range(0x201C, 0x2020)},
})
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                          *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])


@cache
def _width_map() -> dict[int, str]:
    mapping = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        narrow = unicodedata.normalize("NFKC", chr(code))
        if narrow != chr(code):
            mapping[code] = narrow
    return mapping


def clean_text(text: str) -> str:
    """CLIP's text cleanup: ftfy-like fixes, HTML unescape, whitespace collapsed, lower case."""
    text = text.translate(_LIGATURES).translate(_width_map()).translate(_CURLY_QUOTES)
    text = unicodedata.normalize("NFC", text.translate(_CONTROL))
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _kind(char: str) -> str:
    """'L' for a letter, 'N' for a number, ' ' for space, '' for anything else."""
    if char.isspace():
        return " "
    major = unicodedata.category(char)[0]
    return major if major in "LN" else ""


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenizer on cleaned text: the words that BPE runs on, in order."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        special = next((s for s in _SPECIAL if text.startswith(s, i)), None)
        contraction = _CONTRACTION.match(text, i) if special is None else None
        if special or contraction:
            word = special or contraction.group()
            words.append(word)
            i += len(word)
            continue
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        j = i + 1
        if kind == "L":
            while j < n and _kind(text[j]) == "L":
                j += 1
        elif kind == "":
            while j < n and _kind(text[j]) == "":
                j += 1
        words.append(text[i:j])  # a number is always a single character
        i = j
    return words


@cache
def _byte_symbols() -> dict[int, str]:
    """Byte value -> printable character, so no byte maps to whitespace or a control code.

    The dict's order is the vocabulary's: printable bytes as themselves, then the rest mapped
    to U+0100 onwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + len(symbols) - len(printable))
    return symbols


@dataclass(frozen=True)
class Window:
    """One 77-token encoder input: ids and the emphasis weight of each position."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


class CLIPTokenizer:
    """Text -> CLIP token ids (without start/end tokens); `load()` returns a shared instance."""

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        symbols = list(_byte_symbols().values())
        vocabulary = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        self.encoder = {token: i for i, token in enumerate(vocabulary)}
        self.encoder.update(_SPECIAL)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._byte_symbols = [_byte_symbols()[b] for b in range(256)]
        self._byte_values = {s: b for b, s in _byte_symbols().items()}
        self.bpe = lru_cache(maxsize=65536)(self._bpe)

    @classmethod
    @cache
    def load(cls) -> CLIPTokenizer:
        source = resources.files("merge_engine") / "data" / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:_MERGE_COUNT + 1]]
        return cls(merges)

    @property
    def comma_token(self) -> int:
        return self.encoder[",</w>"]

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the word's symbols pairwise, lowest merge rank first, until none applies."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, _MERGE_COUNT))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in split_words(clean_text(text)):
            if word in _SPECIAL:
                ids.append(_SPECIAL[word])
                continue
            symbols = "".join(self._byte_symbols[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self.bpe(symbols))
        return ids

    def decode(self, ids: list[int]) -> str:
        data = bytearray()
        for token in (self.decoder[i] for i in ids if i not in (START_TOKEN, END_TOKEN)):
            word_end = token.endswith("</w>")
            data.extend(self._byte_values[c] for c in token.removesuffix("</w>"))
            data.extend(b" " if word_end else b"")
        return data.decode("utf-8", errors="replace").strip()


def window(tokens: list[int], weights: list[float] | None = None, *,
           pad_token: int = PAD_CLIP_L) -> Window:
    """Lay out at most 75 tokens as an encoder input: start, tokens, end, then `pad_token`.

    Start, end and padding positions get weight 1.0, as in the WebUI.
    """
    if len(tokens) > CHUNK_LENGTH:
        raise ValueError(f"a window holds at most {CHUNK_LENGTH} tokens, got {len(tokens)}")
    weights = [1.0] * len(tokens) if weights is None else list(weights)
    if len(weights) != len(tokens):
        raise ValueError("tokens and weights differ in length")
    padding = CONTEXT_LENGTH - 2 - len(tokens)
    ids = (START_TOKEN, *tokens, END_TOKEN, *[pad_token] * padding)
    return Window(ids, (1.0, *weights, 1.0, *[1.0] * padding))


def pad_token_for(architecture: str, component: str = "text_encoder") -> int:
    """The padding id the given architecture's text encoder was trained with."""
    try:
        return PAD_TOKENS[(architecture, component)]
    except KeyError:
        raise ValueError(f"no text encoder {component!r} in architecture {architecture!r}") from None
