"""A file's recorded lineage: sdmerge's own outputs (exact flattened weights per parent, the
inputs' lineage carried forward through sd_merge_models), A1111's metadata, and hostile metadata."""

from __future__ import annotations

import json

from safetensors import safe_open

from merge_engine.cli import main
from merge_engine.execute import merge
from merge_engine.hashing import hash_file
from merge_engine.inspect import inspect_checkpoint
from merge_engine.lineage import MAX_ANCESTORS, recorded_lineage
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver


def merged(recipe: dict, root, out):
    planned = plan(parse_recipe(recipe), FileResolver(root))
    try:
        merge(planned, out)
    finally:
        planned.close()
    with safe_open(out, "pt") as f:
        return f.metadata()


def test_a_chain_of_sdmerge_outputs(make_model, tmp_path, capsys):
    a, b, c = (make_model(f"{n}.safetensors", seed=i) for i, n in enumerate("abc", 1))
    sha = {n: hash_file(p).sha256 for n, p in zip("abc", (a, b, c), strict=True)}
    root = tmp_path / "models"
    merged({"name": "m1", "merge": {"method": "uniform", "models": ["a.safetensors", "b.safetensors"]}},
           root, root / "m1.safetensors")
    sha["m1"] = hash_file(root / "m1.safetensors").sha256
    meta = merged({"name": "m2", "merge": {"method": "weighted", "normalize": False, "models": [
        {"model": "m1.safetensors", "weight": 0.75}, {"model": "c.safetensors", "weight": 0.25}]},
        "components": {"vae": "c.safetensors"}}, root, root / "m2.safetensors")

    lineage = recorded_lineage(meta)
    own = lineage["merge"]
    assert (own["tool"], own["method"], own["name"]) == ("sdmerge", "weighted", "m2")
    assert own["recipe_hash"] == meta["sdmerge_recipe_hash"]
    assert own["parents"] == [
        {"sha256": sha["m1"], "name": "m1.safetensors", "weight": "3/4"},
        {"sha256": sha["c"], "name": "c.safetensors", "weight": "1/4", "components": {"vae": "1"}},
    ]
    # m1's own merge rode along in sd_merge_models: the graph reaches a and b without m1's file
    assert set(lineage["ancestors"]) == {sha["m1"], sha["c"], sha["a"], sha["b"]}
    m1 = lineage["ancestors"][sha["m1"]]
    assert m1["name"] == "m1.safetensors" and m1["merge"]["method"] == "uniform"
    assert [(p["sha256"], p["weight"]) for p in m1["merge"]["parents"]] == [(sha["a"], "1/2"), (sha["b"], "1/2")]
    assert lineage["ancestors"][sha["a"]]["merge"] is None and not lineage["truncated"]
    # inspect reports it, and reads the same from the decoded metadata it reports
    report = inspect_checkpoint(root / "m2.safetensors", hashes=False)
    assert report["lineage"] == lineage == recorded_lineage(report["metadata"])
    assert main(["inspect", str(root / "m2.safetensors"), "--no-hash"]) == 0
    assert ("merged (sdmerge, weighted) from m1.safetensors x3/4, c.safetensors x1/4; 4 ancestors recorded"
            in capsys.readouterr().out)


def test_a1111_metadata_gives_weights_from_the_multiplier():
    a, b, c, x = ("a" * 64, "b" * 64, "c" * 64, "f" * 64)

    def node(primary, secondary, tertiary, method, m):
        return {"type": "webui", "primary_model_hash": primary, "secondary_model_hash": secondary,
                "tertiary_model_hash": tertiary, "interp_method": method, "multiplier": m, "custom_name": "top"}

    meta = {"sd_merge_recipe": json.dumps(node(x, c, b, "Add difference", 0.3)),
            "sd_merge_models": json.dumps({x: {"name": "x.safetensors", "legacy_hash": "00000000",
                                               "sd_merge_recipe": node(a, b, None, "Weighted sum", 0.25)},
                                           c: {"name": "c.ckpt"}})}
    lineage = recorded_lineage(meta)
    assert lineage["merge"]["tool"] == "webui" and lineage["merge"]["method"] == "Add difference"
    assert [(p["sha256"], p["name"], p["weight"]) for p in lineage["merge"]["parents"]] == [
        (x, "x.safetensors", "1"), (c, "c.ckpt", "3/10"), (b, None, "-3/10")]
    assert [(p["sha256"], p["weight"]) for p in lineage["ancestors"][x]["merge"]["parents"]] == [(a, "3/4"), (b, "1/4")]


def test_no_lineage_and_nonsense_are_none_never_errors():
    assert recorded_lineage({}) is None
    assert recorded_lineage({"modelspec.title": "x"}) is None
    for junk in ("{" * 50_000, "[" + "7" * 5000 + "]", "null", "x" * (5 << 20), '{"merge": 3}'):
        assert recorded_lineage({"sdmerge_recipe": junk, "sd_merge_recipe": junk, "sd_merge_models": junk}) is None
    weird = {"sd_merge_models": json.dumps({"not a hash": {}, "a" * 64: "text", "b" * 64: {"name": 7}})}
    assert recorded_lineage(weird)["ancestors"] == {"b" * 64: {"name": None, "legacy_hash": None, "merge": None}}


def test_a_huge_carried_lineage_is_cut_and_says_so():
    models = {f"{i:064x}": {"name": f"m{i}", "sd_merge_recipe": {"type": "webui", "primary_model_hash": f"{i + 1:064x}",
                                                                  "interp_method": "No interpolation", "multiplier": 1}}
              for i in range(MAX_ANCESTORS + 50)}
    lineage = recorded_lineage({"sd_merge_models": json.dumps(models)})
    assert len(lineage["ancestors"]) == MAX_ANCESTORS and lineage["truncated"]


def test_the_parents_of_all_merges_together_are_bounded(monkeypatch):
    from merge_engine import lineage as module

    monkeypatch.setattr(module, "MAX_EDGES", 1000)
    def webui(i):
        return {"type": "webui", "primary_model_hash": f"{i:064x}", "secondary_model_hash": f"{i + 1:064x}",
                "tertiary_model_hash": f"{i + 2:064x}", "interp_method": "Add difference", "multiplier": 0.5}

    models = {f"{i:064x}": {"name": f"m{i}", "sd_merge_recipe": webui(i + 1)} for i in range(500)}
    lineage = recorded_lineage({"sd_merge_models": json.dumps(models)})
    total = sum(len(a["merge"]["parents"]) for a in lineage["ancestors"].values() if a["merge"])
    assert total == 1000 and lineage["truncated"]
