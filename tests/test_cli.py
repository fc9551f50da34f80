"""The `sdmerge` command: real processes for the demo and the exit codes, in-process for the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_engine.cli import main

SEED_RECIPES = Path(__file__).parent / "data" / "seed-recipes"


def sdmerge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_engine.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def test_demo_writes_models_recipe_and_merge(tmp_path):
    folder = tmp_path / "demo"
    done = sdmerge("demo", str(folder))
    assert done.returncode == 0, done.stderr
    assert len(list((folder / "models").glob("*.safetensors"))) >= 3
    assert (folder / "recipe.json").is_file()
    outputs = list((folder / "out").glob("*.safetensors"))
    assert len(outputs) == 1
    # the demo's recipe runs again through the ordinary commands
    again = sdmerge("merge", str(folder / "recipe.json"), "-o", str(tmp_path / "again.safetensors"), "--quiet")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == outputs[0].read_bytes()


def test_bad_input_exits_2_with_one_line_and_no_output(make_model, write_recipe, tmp_path):
    make_model("a.safetensors", "sd1")
    make_model("b.safetensors", "sd2")
    recipe = write_recipe({"merge": {"method": "uniform", "models": ["models/a.safetensors", "models/b.safetensors"]}})
    out = tmp_path / "out" / "x.safetensors"
    done = sdmerge("merge", str(recipe), "-o", str(out))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdmerge: error:") and "Traceback" not in done.stderr
    assert not out.parent.exists()
    debug = sdmerge("--debug", "merge", str(recipe), "-o", str(out))
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_malformed_recipe_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["plan", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_plan_json_and_model_root_lookup(make_model, write_recipe, tmp_path, capsys):
    make_model("a.safetensors", seed=1)
    make_model("b.safetensors", seed=2)
    recipe = write_recipe({"merge": {"method": "uniform", "models": ["a.safetensors", "b.safetensors"]}})
    assert main(["plan", str(recipe), "--json", "--model-root", str(tmp_path / "models")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "sd2"
    assert [s["exact_weight"] for s in summary["components"]["unet"]["sources"]] == ["1/2", "1/2"]
    assert summary["output"]["bytes"] > 0


def test_ambiguous_name_under_model_roots(make_model, write_recipe, tmp_path, capsys):
    for folder in ("x", "y"):
        (tmp_path / "models" / folder).mkdir(parents=True)
        make_model(f"{folder}/a.safetensors", seed=1)
    recipe = write_recipe({"merge": "a.safetensors"})
    assert main(["plan", str(recipe), "--model-root", str(tmp_path / "models")]) == 2
    assert "ambiguous" in capsys.readouterr().err
    # a path relative to a model root names one file
    recipe = write_recipe({"merge": "y/a.safetensors"})
    assert main(["plan", str(recipe), "--model-root", str(tmp_path / "models")]) == 0


def test_inspect_and_hash(make_model, capsys):
    path = make_model("a.safetensors", seed=1)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "sd2"
    assert info["components"]["unet"]["keys"] == 686
    assert info["components"]["text_encoder"]["keys"] == 294
    assert info["components"]["vae"]["keys"] == 248
    assert main(["hash", str(path), "--json"]) == 0
    hashes = json.loads(capsys.readouterr().out)[str(path)]
    import hashlib

    raw = path.read_bytes()
    assert hashes["sha256"] == hashlib.sha256(raw).hexdigest()
    assert hashes["shorthash"] == hashes["sha256"][:10]
    assert hashes["legacy"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    header_end = 8 + int.from_bytes(raw[:8], "little")
    assert hashes["autov3"] == hashlib.sha256(raw[header_end:]).hexdigest()


def test_recipe_convert_seed_recipe(capsys):
    assert main(["recipe", "convert", str(SEED_RECIPES / "recipe-209.json")]) == 0
    recipe = json.loads(capsys.readouterr().out)
    weights = [m["weight"] for m in recipe["merge"]["models"]]
    assert len(weights) == 10 and all(w == 0.1 for w in weights)


def test_recipe_convert_unresolved_leaves_listed(tmp_path, capsys):
    assert main(["recipe", "convert", str(SEED_RECIPES / "recipe-215a.json"), "--model-root", str(tmp_path)]) == 2
    assert "16 models not found" in capsys.readouterr().err


def test_recipe_schema(capsys):
    assert main(["recipe", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "merge" in schema["properties"]


@pytest.mark.parametrize("args", [["merge"], ["frobnicate"]])
def test_usage_errors_exit_2(args):
    assert sdmerge(*args).returncode == 2


def test_merge_runs_a1111_metadata_directly(make_model, tmp_path, capsys):
    """A WebUI chain ((A+B)/2 then 2/3 of that + 1/3 C) runs as one flat merge of the leaves."""
    from merge_engine.hashing import hash_file

    paths = {n: make_model(f"{n}.safetensors", seed=i) for i, n in enumerate("abc")}
    sha = {n: hash_file(p).sha256 for n, p in paths.items()}
    fake_x = "f" * 64  # the intermediate file A1111 wrote; it no longer needs to exist

    def node(primary, secondary, m, name):
        return {"type": "webui", "primary_model_hash": primary, "secondary_model_hash": secondary,
                "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": m,
                "save_as_half": True, "custom_name": name, "config_source": 0, "bake_in_vae": "None",
                "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}

    metadata = {"__metadata__": {
        "sd_merge_recipe": json.dumps(node(fake_x, sha["c"], 1 / 3, "top")),
        "sd_merge_models": json.dumps({
            fake_x: {"name": "x.safetensors", "legacy_hash": "00000000", "sd_merge_recipe": node(sha["a"], sha["b"], 0.5, "x")},
            sha["a"]: {"name": "a.safetensors", "legacy_hash": "0"}, sha["b"]: {"name": "b.safetensors", "legacy_hash": "0"},
            sha["c"]: {"name": "c.safetensors", "legacy_hash": "0"},
        }),
    }}
    a1111 = tmp_path / "a1111.json"
    a1111.write_text(json.dumps(metadata))
    roots = ["--model-root", str(tmp_path / "models")]
    assert main(["merge", str(a1111), "-o", str(tmp_path / "from-a1111.safetensors"), "--quiet", *roots]) == 0
    native = tmp_path / "native.json"
    native.write_text(json.dumps({"name": "top", "merge": {"method": "weighted", "normalize": False, "models": [
        {"model": {"sha256": sha[n], "name": f"{n}.safetensors"}, "weight": 1 / 3} for n in "abc"]}}))
    assert main(["merge", str(native), "-o", str(tmp_path / "native.safetensors"), "--quiet", *roots]) == 0
    from safetensors.torch import load_file

    x, y = load_file(tmp_path / "from-a1111.safetensors"), load_file(tmp_path / "native.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    # a leaf whose file has another sha256 is refused, naming it
    paths["c"].write_bytes(paths["a"].read_bytes())
    assert main(["plan", str(a1111), *roots]) == 2
    assert "c.safetensors" in capsys.readouterr().err


def test_folders_where_files_belong_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert main(["plan", str(tmp_path / "folder")]) == 2
    assert "cannot read recipe file" in capsys.readouterr().err
    from merge_engine.demo import run_demo

    run_demo(tmp_path / "demo")
    capsys.readouterr()
    out_dir = tmp_path / "demo" / "outdir"
    out_dir.mkdir()
    assert main(["merge", str(tmp_path / "demo" / "recipe.json"), "-o", str(out_dir), "--overwrite", "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == [] and not list((tmp_path / "demo").glob(".*.partial"))
