"""`sdmerge study` on one machine: rounds rendered once each, picks from the file or the terminal,
the final recipe with the study in its metadata, merged by `sdmerge merge` to exact weights."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_engine.cli import main as cli
from merge_engine.synthetic import tiny_state_dict, write_checkpoint

torch.set_num_threads(1)
pytest.importorskip("diffusers")


@pytest.fixture
def study(tmp_path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    for seed in range(4):
        write_checkpoint(models / f"m{seed}.safetensors", tiny_state_dict("sd1", seed=seed))
    (tmp_path / "cat.json").write_text(json.dumps({"prompt": "a cat", "seed": 3, "steps": 2, "width": 64,
                                                   "height": 64, "sampler_name": "Euler"}))
    # the dog topic has no seed: the settings give the seeds
    spec = {"name": "mix", "candidates": [f"models/m{i}.safetensors" for i in range(4)],
            "topics": ["cat.json", {"prompt": "a dog", "negative_prompt": "blurry", "width": 64, "height": 64}],
            "settings": {"steps": 2, "seeds": [7]}, "rounds": ["text_encoder", "unet", "leave_one_out", "final"]}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(spec))
    return path


def run(study: Path, *extra: str) -> int:
    return cli(["study", str(study), "-o", str(study.parent / "out"), "--device", "cpu", "-q", *extra])


def add_picks(study: Path, **picks) -> None:
    spec = json.loads(study.read_text())
    spec.setdefault("picks", {}).update(picks)
    study.write_text(json.dumps(spec))


def test_rounds_picks_and_the_final_recipe(study, capsys):
    out = study.parent / "out"
    assert run(study) == 0
    assert "add \"picks\": {\"text_encoder\"" in capsys.readouterr().err
    te_grid = out / "01-text_encoder.png"
    assert te_grid.is_file() and len(list((out / "01-text_encoder").iterdir())) == 4 * 2
    record = json.loads((out / "record.json").read_text())
    assert record["rounds"][0]["columns"] == ["TE: m0", "TE: m1", "TE: m2", "TE: m3"]
    assert not (out / "final.json").exists()

    add_picks(study, text_encoder=["m1", "m3"])
    stamp = te_grid.stat().st_mtime_ns
    assert run(study) == 0
    assert te_grid.stat().st_mtime_ns == stamp  # the same round is not rendered again
    assert (out / "02-unet.png").is_file() and not (out / "03-leave_one_out.png").exists()

    add_picks(study, unet=["m0", "m1", "m2"])
    assert run(study) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["rounds"][2]["columns"] == ["all 3", "without m0", "without m1", "without m2"]
    add_picks(study, leave_one_out=["m2"])
    assert run(study) == 0
    final = json.loads((out / "final.json").read_text())
    assert [Path(m).name for m in final["merge"]["models"]] == ["m0.safetensors", "m1.safetensors"]
    assert [Path(m).name for m in final["components"]["text_encoder"]["models"]] == ["m1.safetensors",
                                                                                    "m3.safetensors"]
    provenance = json.loads(final["output"]["metadata"]["sdmerge_study"])
    assert [(r["kind"], r["picks"]) for r in provenance["rounds"]] == [
        ("text_encoder", ["m1", "m3"]), ("unet", ["m0", "m1", "m2"]), ("leave_one_out", ["m2"]), ("final", None)]
    assert (out / "04-final.png").is_file()

    merged = study.parent / "mix.safetensors"
    assert cli(["merge", str(out / "final.json"), "-o", str(merged), "-q"]) == 0
    tensors = load_file(merged)
    models = [load_file(study.parent / "models" / f"m{i}.safetensors") for i in range(4)]
    for key, (i, j) in (("model.diffusion_model.out.2.weight", (0, 1)),
                        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", (1, 3))):
        assert torch.equal(tensors[key], (models[i][key].float() * 0.5 + models[j][key].float() * 0.5).half()), key
    from merge_engine.checkpoint import open_checkpoint

    with open_checkpoint(merged) as checkpoint:
        assert json.loads(checkpoint.metadata["sdmerge_study"])["selection"]["unets"] == ["m0", "m1"]


def test_interactive_picks_by_name_or_column(study, monkeypatch, capsys):
    spec = json.loads(study.read_text())
    spec["rounds"] = ["text_encoder", "final"]
    study.write_text(json.dumps(spec))
    monkeypatch.setattr("sys.stdin", io.StringIO("m9\n2, m2\n"))
    assert run(study, "--interactive") == 0
    err = capsys.readouterr().err
    assert "'m9' is not a candidate" in err
    final = json.loads((study.parent / "out" / "final.json").read_text())
    assert [Path(m).name for m in final["components"]["text_encoder"]["models"]] == ["m1.safetensors",
                                                                                    "m2.safetensors"]


@pytest.mark.parametrize(("change", "needle"), [
    ({"candidates": ["models/m0.safetensors"]}, "at least 2 candidates"),
    ({"candidates": ["models/m0.safetensors", "models/m0.safetensors"]}, "listed twice"),
    ({"rounds": ["blend"]}, "unknown round kind 'blend'"),
    ({"settings": {"colour": 1}}, "unknown settings colour"),
    ({"picks": {"text_encoder": ["m7"]}}, "'m7' is not a candidate"),
    ({"topics": [{"prompt": "x", "restore_faces": True}]}, "restore_faces"),
    ({"extra": 1}, "unknown fields extra"),
])
def test_bad_studies_are_refused_by_name(study, capsys, change, needle):
    spec = json.loads(study.read_text())
    spec.update(change)
    study.write_text(json.dumps(spec))
    assert run(study) != 0
    assert needle in capsys.readouterr().err
    assert not (study.parent / "out" / "final.json").exists()
