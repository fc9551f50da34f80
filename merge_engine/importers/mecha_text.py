"""sd-mecha's `.mecha` text read into numbered instructions (no meaning yet: `mecha` maps them).

The grammar is sd-mecha's serializer's (sd_mecha/serialization.py, format 0.1.0): a `version
0.1.0` line, then one instruction a line, each instruction's result numbered from 0 and named
`&N` by later lines:

    model "PATH" model_config="sd1-ldm" merge_space="weight"
    dict KEY=VALUE ...
    literal VALUE_OR_&N model_config=... merge_space=...
    merge "METHOD" ARG ... NAME=ARG ...

Values are `&N`, quoted strings (backslash escapes), `null`/`true`/`false`, and numbers (a float
if the token holds `.` or `e`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError

VERSION = "version 0.1.0"
CONSTANTS: dict[str, Any] = {"null": None, "true": True, "false": False}


@dataclass(frozen=True)
class Number:
    text: str
    value: float | int


@dataclass(frozen=True)
class Line:
    number: int
    text: str
    command: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(hash=False)

    def error(self, message: str, model: str | None = None, **details: Any) -> RecipeError:
        return RecipeError(f".mecha line {self.number} ({self.command}): {message}", model=model,
                           details={"line": self.number, "instruction": self.text[:500], **details})



def tokenize(line: str) -> list[str]:
    """sd-mecha's tokenizer: spaces split, double quotes group (kept), a backslash escapes."""
    tokens: list[str] = []
    current: list[str] = []
    prefix: list[str] = []
    quoted = escaped = False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
            continue
        elif char == '"':
            quoted = not quoted
            if quoted:
                prefix, current = current, []
            else:
                tokens.append(f'{"".join(prefix)}"{"".join(current)}"')
                current, prefix = [], []
            continue
        elif char == " " and not quoted:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("mismatched quotes")
    if current:
        tokens.append("".join(current))
    return tokens


class Ref(int):
    """`&N`: the result of instruction N."""


def _value(token: str, count: int) -> Any:
    if token in CONSTANTS:
        return CONSTANTS[token]
    if token.startswith("&"):
        try:
            index = int(token[1:])
        except ValueError:
            raise ValueError(f"{token!r} is not a reference") from None
        if not 0 <= index < count:
            raise ValueError(f"reference {token} names no earlier instruction")
        return Ref(index)
    if token.startswith('"') and token.endswith('"') and len(token) >= 2:
        return token[1:-1]
    if "." in token or "e" in token.lower():
        float(token)  # sd-mecha reads it with float(): the same tokens are numbers
        return Number(token, float(token))
    return Number(token, int(token))


def parse_lines(text: str) -> list[Line]:
    lines = text.split("\n")
    if not lines or lines[0].strip() != VERSION:
        found = lines[0].strip()[:80] if lines else ""
        raise RecipeError(f".mecha line 1: expected {VERSION!r} (sd-mecha's format 0.1.0), found {found!r}",
                          details={"line": 1})
    parsed: list[Line] = []
    for number, raw in enumerate(lines[1:], 2):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            command, *tokens = tokenize(stripped)
            args, kwargs = [], {}
            for token in tokens:
                if "=" in token and not token.startswith('"'):
                    key, value = token.split("=", 1)
                    kwargs[key] = _value(value, len(parsed))
                else:
                    args.append(_value(token, len(parsed)))
        except ValueError as exc:
            raise RecipeError(f".mecha line {number}: {exc}", details={"line": number, "instruction": stripped[:500]}
                              ) from None
        parsed.append(Line(number, stripped, command, tuple(args), kwargs))
    if not parsed:
        raise RecipeError("the .mecha text holds no instruction")
    return parsed
