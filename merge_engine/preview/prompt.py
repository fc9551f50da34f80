"""A1111 prompt emphasis: parse the syntax, split into 75-token chunks, weight the embeddings.

Written from the WebUI's documented behaviour (wiki "Features: Attention/emphasis", "BREAK",
"Infinite prompt length"), not from its code:

* `(text)` multiplies the attention to text by 1.1, `((text))` by 1.21, `[text]` divides by 1.1;
  `(text:1.5)` multiplies by 1.5 (`:0` included); weights of nested groups multiply.
* `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. A backslash before anything else is
  dropped, as in the WebUI.
* A bracket that is never closed applies to the rest of the prompt; a closing bracket with no
  open one is literal text.
* `BREAK` (upper case, a whole word) pads the current chunk and starts the next one. Unlike the
  WebUI, where a BREAK inside brackets turns into the literal word, it always breaks here.
* Adjacent pieces of equal weight are merged.
* A prompt longer than 75 tokens is cut into chunks of 75; when a chunk fills up and its last
  comma is at most 20 tokens from the end, the cut moves back to just after that comma
  (the WebUI's "comma padding backtrack", default 20).
* `apply_emphasis` multiplies each token's embedding by its weight and rescales the result to the
  original mean (the WebUI's "Original" emphasis mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from merge_engine.preview.tokenizer import CHUNK_LENGTH, PAD_CLIP_L, CLIPTokenizer, Window, window

if TYPE_CHECKING:
    from torch import Tensor

BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention emits for the BREAK keyword
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
COMMA_PADDING_BACKTRACK = 20

_PIECES = re.compile(
    r"""
      \\[()\[\]\\]              # an escaped bracket or backslash: literal
    | \\                        # any other backslash: dropped
    | \(  | \[                  # open a group
    | :\s*([+-]?[.\d]+)\s*\)    # close a round group with an explicit weight
    | \)  | \]                  # close a group
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces; BREAK keywords come out as `BREAK`."""
    pieces: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    def add_text(literal: str) -> None:
        for i, part in enumerate(_BREAK.split(literal)):
            if i:
                pieces.append(["BREAK", -1.0, True])
            pieces.append([part, 1.0, False])

    for match in _PIECES.finditer(text):
        piece, weight = match.group(), match.group(1)
        if piece.startswith("\\"):
            pieces.append([piece[1:], 1.0, False])
        elif piece == "(":
            round_open.append(len(pieces))
        elif piece == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open and _is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(piece)

    # Unclosed groups still apply, to everything after them.
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for piece_text, weight, is_break in pieces:
        if is_break:
            merged.append(BREAK)
        elif not piece_text:
            continue
        elif merged and merged[-1] != BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Chunk:
    """At most 75 prompt tokens and their weights; `window` adds start, end and padding."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def window(self, pad_token: int = PAD_CLIP_L) -> Window:
        return window(self.tokens, self.weights, pad_token=pad_token)


def tokenize_weighted(prompt: str, tokenizer: CLIPTokenizer | None = None, *,
                      comma_backtrack: int = COMMA_PADDING_BACKTRACK) -> list[Chunk]:
    """Tokenize a prompt with emphasis into chunks of at most 75 tokens (always at least one)."""
    tokenizer = tokenizer or CLIPTokenizer.load()
    comma = tokenizer.comma_token
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1  # index in the current chunk of its last comma, -1 if none

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for text, weight in parse_prompt_attention(prompt):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and CHUNK_LENGTH - last_comma <= comma_backtrack):
                # Cut after the comma, so a phrase is not split across two encoder windows.
                cut = last_comma + 1
                carried = Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                del chunk.tokens[cut:], chunk.weights[cut:]
                close_chunk()
                chunk = carried
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close_chunk()
    return chunks


def prompt_windows(prompt: str, tokenizer: CLIPTokenizer | None = None, *,
                   pad_token: int = PAD_CLIP_L) -> list[Window]:
    """The 77-token encoder inputs for a prompt: one per chunk."""
    return [chunk.window(pad_token) for chunk in tokenize_weighted(prompt, tokenizer)]


def apply_emphasis(z: Tensor, weights: Tensor) -> Tensor:
    """Scale token embeddings `z` [batch, tokens, channels] by `weights` [batch, tokens].

    The result is rescaled so its mean over the whole tensor equals the original mean, which
    keeps the overall magnitude the UNet sees; the WebUI does this per chunk over the batch.
    """
    original_mean = z.mean()
    weighted = z * weights.to(dtype=z.dtype, device=z.device).unsqueeze(-1)
    return weighted * (original_mean / weighted.mean())
