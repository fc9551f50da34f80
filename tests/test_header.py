"""The safetensors header reader: the format's rules, hostile headers in bounded memory,
and a fuzz test that nothing but a clear CheckpointError ever comes out of it."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_engine.checkpoint import open_checkpoint
from merge_engine.cli import main
from merge_engine.errors import CheckpointError
from merge_engine.header import MAX_RANK, MAX_TENSORS, parse_header


def raw_file(path: Path, header: bytes | str | dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    text = text.encode() if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def entry(offsets: list, dtype: str = "F16", shape: list | None = None) -> dict:
    return {"dtype": dtype, "shape": shape if shape is not None else [(offsets[1] - offsets[0]) // 2],
            "data_offsets": offsets}


GOOD = {"a": entry([0, 4]), "b": entry([4, 8])}


def refused(path: Path, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        open_checkpoint(path).close()
    assert info.value.model == path.name
    return info.value


def test_a_good_header_reads(tmp_path):
    with open_checkpoint(raw_file(tmp_path / "good.safetensors", GOOD, bytes(8))) as checkpoint:
        assert sorted(checkpoint.tensors) == ["a", "b"]
        assert checkpoint.tensors["b"].start == checkpoint.header_size + 4


@pytest.mark.parametrize(("encoding", "match"), [("utf-16", "not UTF-8"), ("utf-16-le", "UTF-16 or UTF-32"),
                                                 ("utf-32", "not UTF-8"), ("utf-8-sig", "byte-order mark")])
def test_other_encodings_and_a_bom_are_refused(tmp_path, encoding, match):
    text = json.dumps(GOOD).encode(encoding)
    refused(raw_file(tmp_path / "x.safetensors", text, bytes(8)), match)


def test_duplicate_tensor_names_are_refused(tmp_path):
    text = f'{{"a": {json.dumps(entry([0, 4]))}, "a": {json.dumps(entry([4, 8]))}}}'
    err = refused(raw_file(tmp_path / "x.safetensors", text, bytes(8)), "names this tensor twice")
    assert err.key == "a"


@pytest.mark.parametrize("field", ["shape", "data_offsets"])
def test_booleans_are_not_numbers(tmp_path, field):
    bad = entry([0, 2], shape=[1])
    bad[field] = [True] if field == "shape" else [False, 2]
    err = refused(raw_file(tmp_path / "x.safetensors", {"a": bad}, bytes(2)), f"bad {field.split('_')[0]}")
    assert err.key == "a"


@pytest.mark.parametrize(("header", "size", "match"), [
    ({"a": entry([0, 4]), "b": entry([6, 10])}, 10, "belong to no tensor .*no holes"),
    ({"a": entry([0, 4])}, 6, "after the last tensor"),
    ({"a": entry([0, 4]), "b": entry([2, 6])}, 6, "overlaps"),
    ({"a": entry([0, 8])}, 4, "truncated"),
    ({"a": {**entry([0, 2]), "extra": 1}}, 2, "unknown \\['extra'\\]"),
    ({"a": entry([0, 2], dtype="F8")}, 2, "unsupported dtype"),
    ({"a": entry([0, 2], shape=[1] * (MAX_RANK + 1))}, 2, "dimensions"),
    ({"a": entry([0, 2], shape=[2**63])}, 2, "bad shape"),
])
def test_layout_rules(tmp_path, header, size, match):
    refused(raw_file(tmp_path / "x.safetensors", header, bytes(size)), match)


def test_header_with_trailing_garbage_or_not_an_object(tmp_path):
    refused(raw_file(tmp_path / "x.safetensors", json.dumps(GOOD) + " x", bytes(8)), "after its JSON")
    refused(raw_file(tmp_path / "y.safetensors", "[1, 2]"), "must begin with")
    refused(raw_file(tmp_path / "z.safetensors", '{"a": 1'), "header entry is not an object|valid JSON")


def test_poison_json_in_the_header_is_an_error(tmp_path):
    deep = "[" * 20_000 + "]" * 20_000
    refused(raw_file(tmp_path / "deep.safetensors", '{"__metadata__": ' + deep + "}"), "__metadata__")
    refused(raw_file(tmp_path / "entry.safetensors", '{"a": ' + deep + "}"), "tensor entry")
    digits = "9" * 5000
    refused(raw_file(tmp_path / "big.safetensors", '{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, '
                     + digits + "]}}", bytes(2)), "tensor entry")
    refused(raw_file(tmp_path / "meta.safetensors", '{"__metadata__": {"x": ' + digits + "}}"), "__metadata__")


def _bounded(path: Path, match: str, megabytes: float = 64) -> None:
    """Refused having allocated little beyond reading the header itself (no object per tensor).

    Memory, not time, is what is asserted: the refusal comes before any per-tensor object is
    built, which is also what makes it fast (bench figures are not test assertions here).
    """
    size = path.stat().st_size
    tracemalloc.start()
    try:
        refused(path, match)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The header's bytes and their text are read once (2x); parsing adds next to nothing.
    assert peak < 2.5 * size + megabytes * 2**20, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"


def test_a_header_of_1_6_million_tensors_is_refused_in_bounded_memory(tmp_path):
    one = b'"t%07d":{"dtype":"F16","shape":[0],"data_offsets":[0,0]},'
    body = b"".join(one % i for i in range(1_600_000))
    path = raw_file(tmp_path / "bomb.safetensors", b"{" + body[:-1] + b"}")
    assert path.stat().st_size > 90e6
    _bounded(path, f"more than {MAX_TENSORS} tensors")


def test_a_47_million_long_shape_is_refused_in_bounded_memory(tmp_path):
    text = b'{"a":{"dtype":"F16","shape":[' + b"0," * 47_000_000 + b'0],"data_offsets":[0,0]}}'
    path = raw_file(tmp_path / "shape.safetensors", text)
    _bounded(path, "longer than")


def test_the_cli_refuses_a_bomb_in_one_line(tmp_path, capsys):
    one = b'"t%07d":{"dtype":"F16","shape":[0],"data_offsets":[0,0]},'
    body = b"".join(one % i for i in range(MAX_TENSORS + 10))
    path = raw_file(tmp_path / "bomb.safetensors", b"{" + body[:-1] + b"}")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than" in err and "bomb.safetensors" in err


# -- fuzzing ----------------------------------------------------------------------------------------

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=8))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


def _valid_header(draw) -> tuple[dict, int]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
    header, offset = {}, 0
    for name in names:
        n = draw(st.integers(0, 4))
        header[name] = entry([offset, offset + 2 * n], shape=[n])
        offset += 2 * n
    return header, offset


@st.composite
def hostile_headers(draw) -> tuple[bytes, int]:
    """A valid header, then one edit: a field replaced by any JSON, offsets that lie or overlap,
    an unknown dtype, deep nesting, a huge number, bytes flipped, or a length that lies."""
    header, size = _valid_header(draw)
    name = draw(st.sampled_from(sorted(header)))
    edit = draw(st.sampled_from(["field", "offsets", "dtype", "deep", "digits", "metadata", "none"]))
    if edit == "field":
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    elif edit == "offsets":
        header[name]["data_offsets"] = [draw(st.integers(-5, size + 5)), draw(st.integers(-5, size + 5))]
    elif edit == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F8_E4M3", "f16", "", "I128", "BOOL"]))
    elif edit == "metadata":
        header["__metadata__"] = draw(JSON)
    text = json.dumps(header).encode()
    if edit == "deep":
        text = text[:-1] + b', "x": ' + b"[" * draw(st.integers(100, 5000)) + b"]}"
    elif edit == "digits":
        text = text.replace(b"]", b", " + b"7" * draw(st.integers(10, 6000)) + b"]", 1)
    flips = draw(st.lists(st.tuples(st.integers(0, max(0, len(text) - 1)), st.integers(0, 255)), max_size=3))
    text = bytearray(text)
    for position, value in flips:
        text[position] = value
    return bytes(text), size + draw(st.sampled_from([0, 0, 0, 1, -1]))


@settings(max_examples=400, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_headers())
def test_fuzz_hostile_headers_give_a_checkpoint_error_or_a_consistent_header(case):
    text, data_size = case
    try:
        found = parse_header(text, 8 + len(text) + max(data_size, 0), "fuzz.safetensors")
    except CheckpointError as exc:
        assert exc.model == "fuzz.safetensors" and str(exc)
        return
    spans = sorted((t.start, t.end) for t in found.tensors.values())
    assert all(t.end - t.start == t.nbytes for t in found.tensors.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(isinstance(v, str) for v in found.metadata.values())


@settings(max_examples=300, deadline=2000, derandomize=True)
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_fuzz_random_bytes_and_lying_lengths(tmp_path_factory, body, length):
    path = tmp_path_factory.mktemp("fuzz") / "random.safetensors"
    path.write_bytes(struct.pack("<Q", length) + body)
    try:
        open_checkpoint(path).close()
    except CheckpointError as exc:
        assert exc.model == "random.safetensors"
