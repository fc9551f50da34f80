"""A merge split into shards (merge_engine/shards.py): the bytes of the one-task merge whatever
the count, shards whose edges fall inside one output block, each shard reading only its
inputs, and the final step refusing what it cannot vouch for."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from merge_engine.errors import NonFiniteError, OptionsError, StorageError
from merge_engine.execute import ExecOptions, merge
from merge_engine.output import ALIGN
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.shards import finish_sharded, prepare_partial, shard_count, split, write_shard
from merge_engine.synthetic import tiny_state_dict

torch.set_num_threads(1)
BLOCK = 4 * ALIGN  # 16 KiB blocks: many shard edges fall inside a block


@pytest.fixture
def models(make_model):
    return [make_model(f"m{i}.safetensors", "sd1", seed=i) for i in range(4)]  # sd1: integer position_ids


def recipes(paths: list[Path]) -> dict[str, dict]:
    names = [str(p) for p in paths]
    return {
        "linear": {"merge": {"method": "weighted", "models": [{"model": n, "weight": i + 1}
                                                             for i, n in enumerate(names)]}},
        "integer_fp32": {"merge": {"method": "uniform", "models": names}, "output": {"dtype": "fp32"}},
        "ties": {"merge": {"method": "ties", "base": names[0], "models": names[1:], "k": 0.5}},
    }


@pytest.fixture
def merge_plan(models, tmp_path):
    """The linear recipe's plan, closed after the test."""
    planned = plan(parse_recipe(recipes(models)["linear"]), FileResolver(tmp_path))
    yield planned
    planned.close()


def sharded(merge_plan, tmp_path: Path, count: int, *, threads: int = 1, parallel: bool = False,
            name: str = "out") -> tuple[Path, str]:
    shards = split(merge_plan, count)
    assert len(shards) == count
    partial = prepare_partial(merge_plan, tmp_path / f"{name}-{count}.partial")
    options = ExecOptions(threads=threads, block_bytes=BLOCK, chunk_elements=1 << 12)

    def write(shard):
        return write_shard(merge_plan, partial, shard, options=options)

    if parallel:
        with ThreadPoolExecutor(count) as pool:
            digests = list(pool.map(write, reversed(shards)))[::-1]
    else:
        digests = [write(s) for s in shards]
    result = finish_sharded(merge_plan, partial, tmp_path / f"{name}-{count}.safetensors", shards, digests)
    assert not partial.exists()
    return result.path, result.sha256


@pytest.mark.parametrize("method", ["linear", "integer_fp32", "ties"])
def test_any_shard_count_writes_the_one_task_bytes(method, models, tmp_path):
    merge_plan = plan(parse_recipe(recipes(models)[method]), FileResolver(tmp_path))
    try:
        one = merge(merge_plan, tmp_path / "one.safetensors", compute_sha256=True,
                    options=ExecOptions(threads=2, chunk_elements=1 << 12))
        expected = one.path.read_bytes()
        assert hashlib.sha256(expected).hexdigest() == one.sha256
        edges_inside_blocks = 0
        for count in (1, 2, 3, 7):
            shards = split(merge_plan, count)
            edges_inside_blocks += sum(s.start % BLOCK != 0 for s in shards[1:])
            path, digest = sharded(merge_plan, tmp_path, count, threads=2, parallel=count == 3)
            assert path.read_bytes() == expected, (method, count)
            assert digest == one.sha256
        assert edges_inside_blocks >= 5
    finally:
        merge_plan.close()


def test_split_is_contiguous_balanced_and_deterministic(models, merge_plan):
    shards = split(merge_plan, 4)
    assert shards == split(merge_plan, 4)
    assert shards[0].start == len(merge_plan.header) and shards[-1].end == merge_plan.output_size
    assert all(a.end == b.start and a.stop == b.first for a, b in zip(shards, shards[1:], strict=False))
    assert sum(s.bytes_to_read for s in shards) == merge_plan.bytes_to_read
    largest_key = max(k.nbytes for k in merge_plan.keys) * len(models)
    assert max(s.bytes_to_read for s in shards) <= merge_plan.bytes_to_read / 4 + largest_key
    assert len(split(merge_plan, 10**6)) == len(merge_plan.keys)  # never more shards than keys
    assert shard_count(merge_plan, target_bytes=merge_plan.bytes_to_read) == 1  # a small merge: one task
    assert shard_count(merge_plan, target_bytes=merge_plan.bytes_to_read // 3 + 1) == 3
    assert shard_count(merge_plan, count=2, target_bytes=1) == 2  # a count wins over a size


def test_a_shard_reads_only_its_keys_inputs(make_model, tmp_path):
    """A text encoder from one model, a UNet from two others: the shards of the text encoder
    map none of the UNet's files."""
    a, b, c = (make_model(f"{n}.safetensors", "sd1", seed=i) for i, n in enumerate("abc"))
    recipe = {"merge": {"method": "uniform", "models": [str(b), str(c)]},
              "components": {"text_encoder": str(a), "vae": str(a)}}
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path))
    try:
        shards = split(merge_plan, len(merge_plan.keys))
        te = next(s for s in shards if merge_plan.keys[s.first].component == "text_encoder")
        partial = prepare_partial(merge_plan, tmp_path / "p.partial")
        write_shard(merge_plan, partial, te, options=ExecOptions(threads=1))
        mapped = [item.name for item in merge_plan.inputs if item.checkpoint._map is not None]
        assert mapped in ([], [merge_plan.inputs[merge_plan.keys[te.first].terms[0].input].name])
    finally:
        merge_plan.close()


def test_finish_refuses_a_changed_range_a_wrong_size_and_missing_shards(merge_plan, tmp_path):
    shards = split(merge_plan, 3)
    partial = prepare_partial(merge_plan, tmp_path / "p.partial")
    digests = [write_shard(merge_plan, partial, s, options=ExecOptions(threads=1)) for s in shards]
    with pytest.raises(OptionsError, match="exactly once"):
        finish_sharded(merge_plan, partial, tmp_path / "o.safetensors", shards[:2], digests[:2])
    fd = os.open(partial, os.O_WRONLY)
    os.pwrite(fd, b"\x7f", shards[1].start + 3)
    os.close(fd)
    with pytest.raises(StorageError, match="shard 1's bytes") as raised:
        finish_sharded(merge_plan, partial, tmp_path / "o.safetensors", shards, digests)
    assert raised.value.details["shard"] == 1
    assert partial.exists() and not (tmp_path / "o.safetensors").exists()
    write_shard(merge_plan, partial, shards[1], options=ExecOptions(threads=1))  # the re-run repairs it
    os.truncate(partial, merge_plan.output_size - 1)
    with pytest.raises(StorageError, match="bytes; the plan's output is"):
        finish_sharded(merge_plan, partial, tmp_path / "o.safetensors", shards, digests)
    os.truncate(partial, merge_plan.output_size)
    write_shard(merge_plan, partial, shards[2], options=ExecOptions(threads=1))
    result = finish_sharded(merge_plan, partial, tmp_path / "o.safetensors", shards, digests)
    one = merge(merge_plan, tmp_path / "one.safetensors", compute_sha256=True)
    assert result.sha256 == one.sha256


def test_a_shard_with_a_non_finite_input_fails_naming_it(make_model, tmp_path):
    state = tiny_state_dict("sd2", seed=1)
    state["model.diffusion_model.out.2.bias"][0] = float("nan")
    a, b = make_model("a.safetensors", state=state), make_model("b.safetensors", seed=2)
    merge_plan = plan(parse_recipe({"merge": {"method": "uniform", "models": [str(a), str(b)]}}),
                      FileResolver(tmp_path))
    try:
        shards = split(merge_plan, 3)
        partial = prepare_partial(merge_plan, tmp_path / "p.partial")
        write_shard(merge_plan, partial, shards[0])
        with pytest.raises(NonFiniteError) as raised:
            write_shard(merge_plan, partial, shards[-1])
        assert raised.value.model == "a.safetensors" and raised.value.key == "model.diffusion_model.out.2.bias"
        with pytest.raises(OptionsError, match="does not fit"):
            write_shard(merge_plan, partial, shards[0].__class__(0, 0, 1, 0, 10, 0))
    finally:
        merge_plan.close()
