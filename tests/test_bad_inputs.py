"""Every bad input ends in a typed error naming what is wrong, and leaves no file behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from merge_engine.errors import (
    ArchitectureError,
    CheckpointError,
    LayoutMismatchError,
    NonFiniteError,
    RecipeError,
    ResolveError,
    SdmergeError,
)
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import tiny_state_dict


def attempt(recipe: dict, tmp_path: Path) -> Path:
    """Plan and merge into tmp_path/out/; the caller expects an error."""
    out_dir = tmp_path / "out"
    merge_plan = plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))
    try:
        merge(merge_plan, out_dir / "merged.safetensors")
    finally:
        merge_plan.close()
    return out_dir


def fails(recipe: dict, tmp_path: Path, error: type[SdmergeError], match: str) -> SdmergeError:
    with pytest.raises(error, match=match) as info:
        attempt(recipe, tmp_path)
    assert not (tmp_path / "out").exists(), "nothing may be left in the output folder"
    return info.value


def uniform(*names: str) -> dict:
    return {"merge": {"method": "uniform", "models": list(names)}}


def test_wrong_shape_names_model_component_and_key(make_model, tmp_path):
    state = tiny_state_dict("sd2", seed=1)
    key = "model.diffusion_model.out.2.bias"
    state[key] = torch.zeros(state[key].shape[0] + 1, dtype=state[key].dtype)
    make_model("a.safetensors", seed=0)
    make_model("b.safetensors", state=state)
    err = fails(uniform("a.safetensors", "b.safetensors"), tmp_path, LayoutMismatchError, "shape")
    assert (err.model, err.component, err.key) == ("b.safetensors", "unet", key)


def test_missing_key_is_named(make_model, tmp_path):
    state = tiny_state_dict("sd2", seed=1)
    key = "cond_stage_model.model.ln_final.weight"
    del state[key]
    make_model("a.safetensors", seed=0)
    make_model("b.safetensors", state=state)
    err = fails(uniform("a.safetensors", "b.safetensors"), tmp_path, LayoutMismatchError, "missing")
    assert (err.model, err.component, err.key) == ("b.safetensors", "text_encoder", key)


def test_sd1_with_sd2_is_refused(make_model, tmp_path):
    make_model("one.safetensors", "sd1")
    make_model("two.safetensors", "sd2")
    err = fails(uniform("one.safetensors", "two.safetensors"), tmp_path, ArchitectureError, "sd1.*sd2|sd2.*sd1")
    assert err.model in ("one.safetensors", "two.safetensors")


def test_inpainting_with_plain_is_refused(make_model, tmp_path):
    make_model("plain.safetensors", seed=0)
    make_model("inpaint.safetensors", seed=1, variant="inpainting")
    fails(uniform("plain.safetensors", "inpaint.safetensors"), tmp_path, ArchitectureError, "inpainting")


def test_truncated_file(make_model, tmp_path):
    path = make_model("a.safetensors")
    make_model("b.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    err = fails(uniform("a.safetensors", "b.safetensors"), tmp_path, CheckpointError, "truncated")
    assert err.model == "a.safetensors" and err.key


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def test_header_offsets_that_lie(make_model, tmp_path):
    path = make_model("a.safetensors")
    make_model("b.safetensors")
    key = "model.diffusion_model.out.2.bias"

    def grow(header):
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin, end + 2]

    rewrite_header(path, grow)
    err = fails(uniform("a.safetensors", "b.safetensors"), tmp_path, CheckpointError, "header lies")
    assert err.key == key


def test_header_offsets_that_overlap(make_model, tmp_path):
    path = make_model("a.safetensors")
    make_model("b.safetensors")
    keys = ["model.diffusion_model.out.0.weight", "model.diffusion_model.out.0.bias"]

    def overlap(header):
        header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]

    rewrite_header(path, overlap)
    fails(uniform("a.safetensors", "b.safetensors"), tmp_path, CheckpointError, "overlaps")


def test_header_length_larger_than_file(make_model, tmp_path):
    path = make_model("a.safetensors")
    make_model("b.safetensors")
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    fails(uniform("a.safetensors", "b.safetensors"), tmp_path, CheckpointError, "larger than the file")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_model_and_key(make_model, tmp_path, bad):
    state = tiny_state_dict("sd2", seed=1)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    state[key][0, 0] = bad
    make_model("a.safetensors", seed=0)
    make_model("b.safetensors", state=state)
    err = fails(uniform("a.safetensors", "b.safetensors"), tmp_path, NonFiniteError, "NaN or Inf")
    assert (err.model, err.component, err.key) == ("b.safetensors", "unet", key)


def test_non_finite_can_be_kept_on_request(make_model, tmp_path):
    state = tiny_state_dict("sd2", seed=1)
    state["model.diffusion_model.out.2.bias"][0] = float("nan")
    make_model("a.safetensors", seed=0)
    make_model("b.safetensors", state=state)
    out_dir = attempt(uniform("a.safetensors", "b.safetensors") | {"output": {"non_finite": "keep"}}, tmp_path)
    assert (out_dir / "merged.safetensors").exists()


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_never_executed(make_model, tmp_path):
    marker = tmp_path / "pwned"
    make_model("a.safetensors")
    hostile = tmp_path / "models" / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, hostile)
    assert not marker.exists()
    err = fails(uniform("a.safetensors", "evil.ckpt"), tmp_path, CheckpointError, "refused")
    assert err.model == "evil.ckpt"
    assert not marker.exists()


def test_empty_model_list_negative_and_zero_weights():
    with pytest.raises(RecipeError, match="merge.uniform.models"):
        parse_recipe(uniform())
    with pytest.raises(RecipeError, match="negative"):
        parse_recipe({"merge": {"method": "weighted", "models": [{"model": "a", "weight": -1}, "b"]}})
    with pytest.raises(RecipeError, match="all zero"):
        parse_recipe({"merge": {"method": "weighted", "models": [{"model": "a", "weight": 0}]}})


def test_recipe_referencing_its_own_output(make_model, tmp_path):
    make_model("a.safetensors", seed=1)
    target = make_model("b.safetensors", seed=2)
    before = target.read_bytes()
    merge_plan = plan(parse_recipe(uniform("a.safetensors", "b.safetensors")), FileResolver(tmp_path / "models"))
    with pytest.raises(RecipeError, match="its own output"):
        merge(merge_plan, target, overwrite=True)
    merge_plan.close()
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_missing_file(make_model, tmp_path):
    make_model("a.safetensors")
    err = fails(uniform("a.safetensors", "nope.safetensors"), tmp_path, ResolveError, "no such model")
    assert err.model == "nope.safetensors"


def test_non_checkpoint_file(make_model, tmp_path):
    make_model("a.safetensors")
    (tmp_path / "models" / "notes.txt").write_text("hello")
    fails(uniform("a.safetensors", "notes.txt"), tmp_path, CheckpointError, "not a checkpoint")


def test_fp16_overflow_of_the_sum_is_named(make_model, tmp_path):
    a, b = tiny_state_dict("sd2", seed=1, dtype=torch.float32), tiny_state_dict("sd2", seed=2, dtype=torch.float32)
    key = "model.diffusion_model.out.2.bias"
    a[key][0] = b[key][0] = 60000.0  # finite in every input and in fp16, but their sum is not
    make_model("a.safetensors", state=a)
    make_model("b.safetensors", state=b)
    recipe = {"merge": {"method": "weighted", "normalize": False, "models": ["a.safetensors", "b.safetensors"]}}
    err = fails(recipe, tmp_path, NonFiniteError, "overflow")
    assert (err.component, err.key) == ("unet", key)


def test_output_larger_than_the_disk_is_a_clear_error(make_model, tmp_path):
    """A 1 MiB tmpfs stands in for a full disk: the error comes before any tensor is merged."""
    import subprocess

    from merge_engine.errors import StorageError

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        make_model("a.safetensors", seed=1)
        make_model("b.safetensors", seed=2)
        merge_plan = plan(parse_recipe(uniform("a.safetensors", "b.safetensors")), FileResolver(tmp_path / "models"))
        with pytest.raises(StorageError, match="not enough disk space"):
            merge(merge_plan, small / "out.safetensors")
        merge_plan.close()
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
