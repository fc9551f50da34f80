"""The engine and CLI against unlucky users and hostile files: inputs that change or shrink while
a merge reads them, poisoned metadata, oversized and deep recipes, FIFOs, renamed A1111 leaves.
Each case ends in a clear error (one line from the CLI) and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from merge_engine.cli import main
from merge_engine.errors import CheckpointError, InputChangedError, RecipeError
from merge_engine.execute import ExecOptions, merge
from merge_engine.hashing import hash_file
from merge_engine.plan import plan
from merge_engine.recipe import MAX_DISTINCT_LEAVES, MAX_LEAF_REFERENCES, parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import TensorSpec, tiny_specs, tiny_state_dict, write_random

REPO = Path(__file__).resolve().parents[1]
BIG_KEY = "model.diffusion_model.zzz_extra.weight"


def uniform(*names: str, **output) -> dict:
    return {"merge": {"method": "uniform", "models": list(names)}, **({"output": output} if output else {})}


def overwrite_in_place(path: Path, keep_mtime: bool = False) -> None:
    """What `dd conv=notrunc`, `rsync --inplace` and `curl -o` do: same size, other bytes."""
    before = path.stat()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x55" * 4096, before.st_size - 8192)
    finally:
        os.close(fd)
    if keep_mtime:  # `touch -d` / `rsync --times`: the mtime says nothing changed
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def planned(tmp_path: Path, recipe: dict):
    return plan(parse_recipe(recipe), FileResolver(tmp_path / "models"))


def nothing_left(folder: Path) -> None:
    assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())


# -- an input changed while the merge reads it (false provenance) -------------------------------

@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_input_overwritten_during_the_merge_fails_it(make_model, tmp_path, keep_mtime):
    make_model("a.safetensors", seed=1)
    b = make_model("b.safetensors", seed=2)
    merge_plan = planned(tmp_path, uniform("a.safetensors", "b.safetensors"))
    calls = []

    def progress(_progress) -> None:  # called while the pass runs, and once at its end
        if not calls:
            overwrite_in_place(b, keep_mtime)
        calls.append(1)

    out = tmp_path / "out"
    try:
        with pytest.raises(InputChangedError, match="changed while it was being read") as caught:
            merge(merge_plan, out / "merged.safetensors", progress=progress)
    finally:
        merge_plan.close()
    assert caught.value.model == "b.safetensors" and caught.value.details["path"] == str(b.resolve())
    assert "change time" in str(caught.value)
    nothing_left(out)


def test_verify_inputs_hashes_every_input_during_the_pass(make_model, tmp_path):
    make_model("a.safetensors", seed=1)
    make_model("b.safetensors", seed=2)
    merge_plan = planned(tmp_path, uniform("a.safetensors", "b.safetensors"))
    try:
        result = merge(merge_plan, tmp_path / "ok.safetensors", options=ExecOptions(verify_inputs=True))
        assert result.size == (tmp_path / "ok.safetensors").stat().st_size
        # recorded hashes that do not match the bytes are caught by the hash, not the timestamps
        item = merge_plan.inputs[1]
        object.__setattr__(item, "sha256", "0" * 64)
        with pytest.raises(InputChangedError, match="recorded sha256") as caught:
            merge(merge_plan, tmp_path / "out" / "bad.safetensors", options=ExecOptions(verify_inputs=True))
        assert caught.value.model == "b.safetensors"
    finally:
        merge_plan.close()
    nothing_left(tmp_path / "out")


def test_cached_hashes_are_not_trusted_for_a_rewritten_file(make_model, tmp_path):
    """The hash cache is keyed by the file version: a rewrite with its mtime set back misses it."""
    a = make_model("a.safetensors", seed=1)
    first = hash_file(a).sha256
    overwrite_in_place(a, keep_mtime=True)
    assert hash_file(a).sha256 != first


# -- an input truncated while the merge reads it (SIGBUS) ---------------------------------------

@pytest.mark.parametrize("mapped", [True, False])
def test_an_input_truncated_under_its_mapping_is_an_error_not_a_crash(make_model, tmp_path, mapped):
    make_model("a.safetensors", seed=1)
    b = make_model("b.safetensors", seed=2)
    merge_plan = planned(tmp_path, uniform("a.safetensors", "b.safetensors"))
    if mapped:  # a read maps the file: after the truncation, reads of it fault (SIGBUS)
        merge_plan.inputs[1].checkpoint.read_tensor("model.diffusion_model.out.2.bias")
    os.truncate(b, 4096)
    try:
        with pytest.raises(CheckpointError, match="ended early") as caught:
            merge(merge_plan, tmp_path / "out" / "merged.safetensors", options=ExecOptions(threads=2))
    finally:
        merge_plan.close()
    assert caught.value.model == "b.safetensors"
    nothing_left(tmp_path / "out")


def _big_models(folder: Path) -> None:
    specs = dict(tiny_specs("sd2"))
    specs[BIG_KEY] = TensorSpec((8192, 16384), "F16")  # 256 MiB: a pass long enough to truncate during
    folder.mkdir(exist_ok=True)
    for seed in (1, 2):
        write_random(folder / f"big{seed}.safetensors", specs, seed=seed)


def _truncate_when(folder: Path, pattern: str, target: Path, done: threading.Event) -> threading.Thread:
    """Another process would do this: truncate `target` shortly after a file matching `pattern`
    appears in `folder` (the merge's partial output: the pass is reading by then, through a
    mapping of `target`)."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done.is_set():
            if any(folder.glob(pattern)):
                time.sleep(0.1)
                os.truncate(target, 1 << 20)
                done.set()
                return
            time.sleep(0.0005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_cli_survives_an_input_truncated_mid_merge(tmp_path):
    models = tmp_path / "models"
    _big_models(models)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(uniform("big1.safetensors", "big2.safetensors", dtype="fp32", accumulate="fp64")))
    out = tmp_path / "out"
    out.mkdir()
    hash_file(models / "big1.safetensors"), hash_file(models / "big2.safetensors")  # planning is then quick
    env = {**os.environ, "PYTHONPATH": str(REPO), "SDMERGE_NATIVE": "0"}
    done = threading.Event()
    watcher = _truncate_when(out, ".*.partial", models / "big2.safetensors", done)
    run = subprocess.run([sys.executable, "-m", "app.cli", "merge", str(recipe), "--model-root", str(models),
                          "-o", str(out / "merged.safetensors"), "--threads", "1", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    done.set()
    watcher.join()
    assert run.returncode == 2, (run.returncode, run.stderr)  # -7 was SIGBUS
    # Mid-pass it is the guard's error; on a machine that finishes the pass first, the version check's.
    assert run.stderr.count("\n") == 1 and "big2.safetensors" in run.stderr, run.stderr
    assert "ended early" in run.stderr or "changed while" in run.stderr, run.stderr
    nothing_left(out)


def test_a_foreign_sigbus_still_ends_the_process(tmp_path):
    """The guard passes faults outside its mappings on: they still kill, as without it."""
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(1 << 16))
    code = f"""
import mmap, os
from merge_engine import _kernels
fd = os.open({str(path)!r}, os.O_RDONLY)
mine = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
view = memoryview(mine)
import ctypes
slot = _kernels.guard_map(ctypes.addressof(ctypes.c_char.from_buffer_copy(b"x")), 1)  # installs the handler
other = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
os.truncate({str(path)!r}, 0)
print(other[40000])
"""
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, timeout=60)
    assert run.returncode == -7, (run.returncode, run.stderr)


# -- poisoned metadata ---------------------------------------------------------------------------

POISON = {"deep": "[" * 20_000 + "]" * 20_000, "digits": "[" + "7" * 5000 + "]",
          "sd_merge_models": "{" * 20_000, "sd_merge_recipe": "[" + "1" * 5000 + "]"}


def test_poisoned_metadata_is_text_for_inspect_and_merge(make_model, tmp_path, capsys):
    make_model("poison.safetensors", seed=1, metadata=POISON)
    make_model("b.safetensors", seed=2)
    assert main(["inspect", str(tmp_path / "models" / "poison.safetensors"), "--json", "--no-hash"]) == 0
    shown = json.loads(capsys.readouterr().out)["metadata"]
    assert shown["deep"] == POISON["deep"] and shown["digits"] == POISON["digits"]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(uniform("poison.safetensors", "b.safetensors")))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "m.safetensors"), "--quiet",
                 "--model-root", str(tmp_path / "models")]) == 0
    assert main(["recipe", "convert", str(tmp_path / "models" / "poison.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sd_merge_recipe" in err


def test_poisoned_a1111_dumps_are_one_line_errors(tmp_path, capsys):
    for name, text in (("deep.json", '{"sd_merge_recipe": ' + "[" * 20_000 + "]" * 20_000 + "}"),
                       ("digits.json", '{"sd_merge_recipe": {"multiplier": ' + "9" * 5000 + "}}")):
        (tmp_path / name).write_text(text)
        assert main(["recipe", "convert", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err, err


def test_a_lineage_deeper_than_the_limit_is_refused(tmp_path, capsys):
    """A chain of 5,000 merges of merges (each named as its merge named it) is not recursed into."""
    from merge_engine.a1111 import MAX_LINEAGE_DEPTH, convert_a1111

    def sha(n: int) -> str:
        return f"{n:064x}"

    def node(a: str, b: str, name: str) -> dict:
        return {"type": "webui", "primary_model_hash": a, "secondary_model_hash": b, "tertiary_model_hash": None,
                "interp_method": "Weighted sum", "multiplier": 0.5, "save_as_half": True, "custom_name": name,
                "config_source": 0, "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False,
                "is_instruct_pix2pix": False}

    models = {sha(0): {"name": "leaf.safetensors"}}
    for n in range(1, 5000):
        models[sha(n)] = {"name": f"m{n}.safetensors", "sd_merge_recipe": node(sha(n - 1), sha(0), f"m{n}")}
    with pytest.raises(RecipeError, match=f"more than {MAX_LINEAGE_DEPTH} merges deep"):
        convert_a1111({"sd_merge_recipe": node(sha(4999), sha(0), "top"), "sd_merge_models": models})


# -- recipes: size, depth, files that are not files ----------------------------------------------

def test_recipes_are_bounded_before_they_are_built():
    with pytest.raises(RecipeError, match=f"more than {MAX_LEAF_REFERENCES} times"):
        parse_recipe(uniform(*["a.safetensors"] * (MAX_LEAF_REFERENCES + 1)))
    with pytest.raises(RecipeError, match=f"more than {MAX_DISTINCT_LEAVES} distinct"):
        parse_recipe(uniform(*[f"m{i}.safetensors" for i in range(MAX_DISTINCT_LEAVES + 1)]))
    text = json.dumps(uniform(*["a.safetensors"] * 2_000_000))  # about 36 MB
    with pytest.raises(RecipeError, match="times"):
        parse_recipe(text)


def _nested(depth: int) -> dict:
    source: object = "a.safetensors"
    for _ in range(depth):
        source = {"method": "uniform", "models": [source]}
    return {"merge": source}


def test_a_deep_recipe_is_one_line_in_the_cli(tmp_path, capsys):
    for depth in (900, 20_000):
        recipe = tmp_path / f"deep{depth}.json"
        recipe.write_text('{"merge": ' + '{"method": "uniform", "models": [' * depth + '"a"' + "]}" * depth + "}")
        assert main(["plan", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "nested" in err, err
    assert parse_recipe(_nested(60)).merge is not None  # what people write still reads


def test_a_fifo_as_recipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "recipe.json"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "app.cli", "plan", str(fifo)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "not a regular file" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "app.cli", "inspect", str(fifo), "--no-hash"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "not a regular file" in run.stderr, run.stderr


# -- A1111 leaves by sha256, whatever they are called now ------------------------------------------

def test_renamed_a1111_leaves_are_found_by_sha256(make_model, tmp_path, capsys):
    a, b = make_model("a.safetensors", seed=1), make_model("b.safetensors", seed=2)
    sha = {"a": hash_file(a).sha256, "b": hash_file(b).sha256}
    top = {"type": "webui", "primary_model_hash": sha["a"], "secondary_model_hash": sha["b"],
           "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.25,
           "save_as_half": True, "custom_name": "mix", "config_source": 0, "bake_in_vae": "None",
           "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    metadata = {"sd_merge_recipe": top, "sd_merge_models": {
        sha["a"]: {"name": "sd2/original-a.safetensors", "legacy_hash": "0"},
        sha["b"]: {"name": "b-v1.safetensors", "legacy_hash": "0"}}}
    sub = tmp_path / "models" / "sd2"
    sub.mkdir()
    a.rename(sub / "published-a.safetensors")  # renamed and moved since the merge
    dump = tmp_path / "a1111.json"
    dump.write_text(json.dumps(metadata))
    roots = ["--model-root", str(tmp_path / "models")]
    assert main(["recipe", "convert", str(dump), *roots]) == 0
    converted = json.loads(capsys.readouterr().out)
    paths = sorted(Path(m["model"]["name"]).name for m in converted["merge"]["models"])
    assert paths == ["b.safetensors", "published-a.safetensors"]
    assert main(["merge", str(dump), "-o", str(tmp_path / "mix.safetensors"), "--quiet", *roots]) == 0
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "mix.safetensors")
    a_state, b_state = tiny_state_dict("sd2", seed=1), tiny_state_dict("sd2", seed=2)
    key = "model.diffusion_model.out.2.weight"
    expected = (0.75 * a_state[key].float() + 0.25 * b_state[key].float()).half()
    assert torch.equal(merged[key], expected)
