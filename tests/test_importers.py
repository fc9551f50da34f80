"""Importers on real recipe texts: sd-mecha's own serializer output and a hand-written .mecha file,
supermerger's history rows and saved metadata in the format its source writes (tests/data and
tests/supermerger_log.py). Each conversion is checked for its exact recipe, its merge against the
same merge written natively (tensor for tensor) or computed by hand in fp64, and each refusal for
its message."""

from __future__ import annotations

import json
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_engine import importers
from merge_engine.cli import main
from merge_engine.errors import RecipeError
from merge_engine.execute import merge
from merge_engine.hashing import hash_file
from merge_engine.importers import import_data, resolve_refs
from merge_engine.importers.mecha import convert_mecha
from merge_engine.importers.supermerger import convert_history, convert_metadata
from merge_engine.methods import exact
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver
from merge_engine.synthetic import tiny_state_dict, write_checkpoint
from tests.supermerger_log import merged_model, record, saved_metadata

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"
SD26 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 0.05,
        0.33, 0.66, 0.0, 1.0, 0.5, 0.125]
BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


@pytest.fixture(scope="module")
def sd1_models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd1")
    for seed in range(3):
        write_checkpoint(folder / f"m{seed}.safetensors", tiny_state_dict("sd1", seed=seed))
    return folder


def run(recipe, folder: Path, out: Path) -> dict[str, torch.Tensor]:
    recipe = recipe if not isinstance(recipe, dict) else parse_recipe(recipe)
    merge_plan = plan(recipe, FileResolver(folder, [folder]))
    try:
        merge(merge_plan, out, overwrite=True)
    finally:
        merge_plan.close()
    return load_file(out)


def fp32(recipe) -> dict:
    data = recipe.model_dump(mode="json", exclude_none=True)
    return {**data, "output": {**data["output"], "dtype": "fp32"}}


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- sd-mecha -----------------------------------------------------------------------------------

sd_mecha = pytest.importorskip("sd_mecha")


def mecha_recipes(folder: Path) -> list[tuple[object, dict]]:
    """(an sd-mecha recipe, the native merge it must become)."""
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    paths = [str(folder / f"m{i}.safetensors") for i in range(3)]
    a, b, c = (sd_mecha.model(p) for p in paths)
    blocks = sd_mecha.convert(sd_mecha.literal(dict(zip(BLOCKS, SD26, strict=True)),
                                               config="sd1-supermerger_blocks"), "sd1-ldm")
    placed = {**dict(zip(BLOCKS, SD26, strict=True)), "TIME_EMBED": 0.1, "OUT": 0.125, "VAE": 0.1}
    common = {"cos_eps": 1e-6, "eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
    return [
        (linear.weighted_sum(a, b, alpha=0.3), {"method": "weighted_sum", "a": paths[0], "b": paths[1], "alpha": 0.3}),
        (linear.weighted_sum(a, b, alpha=blocks),
         {"method": "weighted_sum", "a": paths[0], "b": paths[1], "alpha": {"blocks": placed}}),
        (linear.add_difference(a, linear.subtract(b, c), alpha=0.1),
         {"method": "add_difference", "a": paths[0], "b": paths[1], "c": paths[2], "alpha": 0.1}),
        (linear.n_average(a, b, c), {"method": "uniform", "models": paths}),
        (linear.slerp(a, b, alpha=0.7), {"method": "slerp", "a": paths[0], "b": paths[1], "alpha": 0.7}),
        (ties.geometric_median(a, b, c), {"method": "geometric_median", "models": paths, "alpha": 1.0,
                                          **{k: v for k, v in common.items() if k != "cos_eps"}}),
        (linear.add_difference(a, ties.ties_sum(linear.subtract(b, a), linear.subtract(c, a), k=0.5, vote_sgn=True),
                               alpha=0.8),
         {"method": "ties", "base": paths[0], "models": paths[1:], "alpha": 0.8, "k": 0.5, "vote_sgn": True}),
        (linear.add_difference(a, ties.ties_sum_extended(linear.subtract(b, a), linear.subtract(c, a), k=0.5,
                                                         apply_median=True, maxiter=50), alpha=0.5),
         {"method": "ties", "base": paths[0], "models": paths[1:], "alpha": 0.5, "k": 0.5, "apply_median": True,
          **common, "maxiter": 50}),
        (linear.add_difference(a, ties.ties_sum_extended(linear.subtract(b, a), linear.subtract(c, a), k=0.5,
                                                         apply_stock=True)),
         {"method": "ties", "base": paths[0], "models": paths[1:], "k": 0.5}),
    ]


def test_sd_mechas_own_texts_become_native_recipes(sd1_models):
    for recipe, expected in mecha_recipes(sd1_models):
        text = sd_mecha.serialize(recipe)
        got = convert_mecha(text).recipe
        assert got == parse_recipe({"merge": expected}), text


def test_a_mecha_merge_equals_the_native_merge(sd1_models, tmp_path):
    for index, (recipe, expected) in enumerate(mecha_recipes(sd1_models)[:4]):
        imported = convert_mecha(sd_mecha.serialize(recipe)).recipe
        ours = run(fp32(imported), sd1_models, tmp_path / f"imported{index}.safetensors")
        same_tensors(ours, run({"merge": expected, "output": {"dtype": "fp32"}}, sd1_models, tmp_path / "n.safetensors"))


def test_the_hand_written_fixture_is_sd_mecha_grammar_and_merges_as_sd_mecha_does(sd1_models, tmp_path):
    text = (DATA / "mecha" / "block-soup.mecha").read_text()
    imported = convert_mecha(text).recipe
    alpha = imported.merge.a.alpha
    assert alpha.blocks["IN10"] == 0.15 and alpha.blocks["TIME_EMBED"] == 0.0 and alpha.blocks["OUT"] == 0.125
    assert exact(imported.merge.alpha) == Fraction(7, 20)
    ours = run(fp32(imported), sd1_models, tmp_path / "ours.safetensors")
    # the fixture names its models relative to itself; sd-mecha finds them under its model dirs
    absolute = re.sub(r'model "(m\d\.safetensors)"', lambda m: f'model "{sd1_models / m.group(1)}"', text)
    sd_mecha.merge(sd_mecha.deserialize(absolute.rstrip("\n")),  # it reads a last empty line as an error
                   output_dtype=torch.float32, merge_dtype=torch.float32, threads=1,
                   output=tmp_path / "mecha.safetensors")
    theirs = load_file(tmp_path / "mecha.safetensors")
    compared = 0
    for key, value in ours.items():
        if value.is_floating_point() and key in theirs:
            torch.testing.assert_close(value, theirs[key].float(), rtol=1e-6, atol=1e-6, msg=key)
            compared += 1
    assert compared > 100


def test_an_imported_ties_recipe_merges_as_sd_mecha_does(sd1_models, tmp_path):
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    a, b, c = (sd_mecha.model(str(sd1_models / f"m{i}.safetensors")) for i in range(3))
    recipe = linear.add_difference(a, ties.ties_sum_extended(linear.subtract(b, a), linear.subtract(c, a), k=0.5,
                                                             apply_stock=True), alpha=0.75)
    ours = run(fp32(convert_mecha(sd_mecha.serialize(recipe)).recipe), sd1_models, tmp_path / "ours.safetensors")
    sd_mecha.merge(recipe, output_dtype=torch.float32, merge_dtype=torch.float32, threads=1,
                   output=tmp_path / "mecha.safetensors")
    theirs = load_file(tmp_path / "mecha.safetensors")
    floats = [k for k, v in ours.items() if v.is_floating_point() and k in theirs]
    assert len(floats) > 100
    for key in floats:
        torch.testing.assert_close(ours[key], theirs[key].float(), rtol=1e-6, atol=1e-6, msg=key)


MECHA_HEAD = 'version 0.1.0\nmodel "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n' \
             'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'


@pytest.mark.parametrize(("text", "message"), [
    ("version 0.2.0\n", r"line 1: expected 'version 0.1.0'"),
    (MECHA_HEAD + 'merge "rotate" &0 &1', r"line 4 \(merge\): a method sdmerge cannot run exactly: 'rotate'"),
    (MECHA_HEAD + 'call "weighted_sum" &0 &1', r"line 4 \(call\): unknown instruction 'call'"),
    (MECHA_HEAD + 'merge "weighted_sum" &0 &1 tilt=0.5', r"line 4 \(merge\): tilt is not a parameter"),
    (MECHA_HEAD + 'merge "weighted_sum" &0 &7', r"line 4: reference &7 names no earlier instruction"),
    (MECHA_HEAD + 'merge "subtract" &0 &1', r"line 4 \(merge\): the recipe's result is a difference"),
    (MECHA_HEAD + 'merge "weighted_sum" &0 &1 0.10000000000000000001',
     r"line 4: alpha: '0.10000000000000000001' has more digits than a recipe weight holds"),
    (MECHA_HEAD + 'dict model.diffusion_model.out.0.weight=0.5\nliteral &2 model_config="sd1-ldm" merge_space="param"\n'
                  'merge "weighted_sum" &0 &1 &3', r"line 5 \(literal\): a literal in model_config 'sd1-ldm' sets "
                                                   r"values per key"),
    (MECHA_HEAD + 'model "k.safetensors" model_config="sd1-kohya" merge_space="weight"',
     r"line 4 \(model\): the model 'k.safetensors' has model_config 'sd1-kohya'"),
    (MECHA_HEAD + 'merge "convert_\'sd1-kohya\'_to_\'sd1-ldm\'" &0', r"a model conversion sdmerge cannot run"),
    (MECHA_HEAD + 'merge "subtract" &1 &0\nmerge "subtract" &0 &1\nmerge "ties_sum_with_dropout" &2 &3\n'
                  'merge "add_difference" &0 &4', r"line 6 \(merge\): deltas: the task vectors are taken over "
                                                  r"different bases"),
    (MECHA_HEAD + 'merge "subtract" &1 &0\nmerge "ties_sum_with_dropout" &2 probability=0.5 apply_stock=true\n'
                  'merge "add_difference" &0 &3', r"line 5 \(merge\): ties_sum_with_dropout has no seed"),
    (MECHA_HEAD + 'merge "subtract" &1 &0\nmerge "ties_sum" &2\nmerge "add_difference" &1 &3',
     r"line 6 \(merge\): the task vectors of ties are taken over another base"),
    (MECHA_HEAD + 'merge "add_difference" &0 &1', r"line 4 \(merge\): add_difference adds a difference"),
    (MECHA_HEAD + 'merge "subtract" &1 &0\nmerge "model_stock" &2\nmerge "add_difference" &0 &3',
     r"line 5 \(merge\): model_stock: sd-mecha's model stock takes its cosine per row"),
    (MECHA_HEAD + 'merge "subtract" &1 &0\nmerge "ties_sum_extended" &2\nmerge "add_difference" &0 &3',
     r"line 5 \(merge\): ties_sum_extended with apply_stock false \(sd-mecha then applies model stock"),
])
def test_mecha_refusals_name_the_line_and_instruction(text, message):
    with pytest.raises(RecipeError, match=message):
        convert_mecha(text)


def test_dropout_is_imported_with_its_seed_and_a_warning():
    text = MECHA_HEAD + 'merge "subtract" &1 &0\nmerge "ties_sum_with_dropout" &2 probability=0.5 seed=7 ' \
                        'apply_stock=true\n' \
                        'merge "add_difference" &0 &3'
    imported = convert_mecha(text)
    assert imported.recipe.merge.method == "ties" and imported.recipe.merge.seed == 7
    assert imported.recipe.merge.probability == 0.5 and "differ from sd-mecha's" in imported.warnings[0]


def test_cli_plans_merges_and_imports_a_mecha_file(sd1_models, tmp_path, capsys):
    shutil.copy(DATA / "mecha" / "block-soup.mecha", sd1_models / "soup.mecha")
    assert main(["plan", str(sd1_models / "soup.mecha")]) == 0
    assert "sd1" in capsys.readouterr().out
    assert main(["merge", str(sd1_models / "soup.mecha"), "-o", str(tmp_path / "out.safetensors"), "-q"]) == 0
    assert main(["recipe", "import", str(sd1_models / "soup.mecha"), "-o", str(tmp_path / "soup.json")]) == 0
    native = json.loads((tmp_path / "soup.json").read_text())
    assert native["merge"]["method"] == "add_difference" and native["merge"]["b"] == "m2.safetensors"
    (sd1_models / "native.json").write_text(json.dumps(native))
    assert main(["merge", str(sd1_models / "native.json"), "-o", str(tmp_path / "native.safetensors"), "-q"]) == 0
    same_tensors(load_file(tmp_path / "out.safetensors"), load_file(tmp_path / "native.safetensors"))
    elsewhere = tmp_path / "elsewhere.mecha"
    elsewhere.write_text((DATA / "mecha" / "block-soup.mecha").read_text())
    resolve = [f"--resolve=m{i}.safetensors={sd1_models / f'm{i}.safetensors'}" for i in range(3)]
    assert main(["merge", str(elsewhere), *resolve, "-o", str(tmp_path / "resolved.safetensors"), "-q"]) == 0
    same_tensors(load_file(tmp_path / "out.safetensors"), load_file(tmp_path / "resolved.safetensors"))
    (tmp_path / "bad.mecha").write_text(MECHA_HEAD + 'merge "rotate" &0 &1\n')
    assert main(["plan", str(tmp_path / "bad.mecha")]) == 2
    assert "line 4 (merge): a method sdmerge cannot run exactly: 'rotate'" in capsys.readouterr().err


def test_a_mecha_file_is_a_preview_target(sd1_models):
    from merge_engine.preview.command import _target

    shutil.copy(DATA / "mecha" / "block-soup.mecha", sd1_models / "target.mecha")
    target = _target(str(sd1_models / "target.mecha"), [])
    assert target.recipe == convert_mecha((DATA / "mecha" / "block-soup.mecha").read_text()).recipe
    assert target.label == "target" and target.resolver.base_dir == sd1_models


def test_body_forms_and_resolve():
    imported = import_data({"mecha": MECHA_HEAD + 'merge "weighted_sum" &0 &1'})
    recipe = resolve_refs(imported.recipe, {"a.safetensors": "registered-a", "b.safetensors": "sha256:0123456789"})
    assert recipe.merge.a == "registered-a" and recipe.merge.b == "sha256:0123456789"
    with pytest.raises(RecipeError, match="no model reference"):
        resolve_refs(imported.recipe, {"c.safetensors": "x"})
    with pytest.raises(RecipeError, match="takes only mecha"):
        import_data({"mecha": "version 0.1.0", "merge": "a"})
    assert import_data({"merge": "a"}) is None


# -- supermerger ----------------------------------------------------------------------------------

def block_of(key: str) -> str:
    """supermerger's `blockfromkey` for SD1/SD2 (mergers.py): the weight a key takes."""
    if "time_embed" in key:
        return "IN00"
    if ".out." in key:
        return "OUT11"
    for pattern, name in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.middle_block\.(\d+)\.", "M"),
                          (r"\.output_blocks\.(\d+)\.", "OUT")):
        if found := re.search(pattern, key):
            return "M00" if name == "M" else f"{name}{int(found.group(1)):02d}"
    return "BASE"


def block_of_xl(key: str) -> str:
    """`blockfromkey`'s SDXL branch, for keys it merges (their names hold weight or bias)."""
    if "label_emb" in key or "time_embed" in key:
        return "IN00"
    if not key.startswith("model.diffusion_model."):
        return "BASE"  # both text encoders and the VAE
    if key.startswith("model.diffusion_model.out."):
        return "OUT08"
    if "middle_block" in key:
        return "M00"
    found = re.search(r"\.(input|output)_blocks\.(\d+)\.", key)
    return f"{'IN' if found.group(1) == 'input' else 'OUT'}0{found.group(2)}"


def by_formula(mode: str, models: list[dict], alpha, beta, block_of=block_of) -> dict[str, torch.Tensor]:
    """smerge's calcmode "normal" in fp64, key by key, as its loop picks keys and weights."""
    a, b, c = (models + [models[0]])[:3]
    out = {}
    for key, value in a.items():
        if not value.is_floating_point() or "model" not in key:
            out[key] = value
            continue
        if not ("weight" in key or "bias" in key):
            out[key] = value.double()
            continue
        x, y, z = a[key].double(), b[key].double(), c[key].double()
        al, be = (w[block_of(key)] if isinstance(w, dict) else w for w in (alpha, beta))
        if mode == "Weight":
            out[key] = (1 - al) * x + al * y
        elif mode == "Add":
            out[key] = x + al * (y - z)
        elif mode == "Triple":
            out[key] = (1 - al - be) * x + al * y + be * z
        else:
            out[key] = (1 - be) * ((1 - al) * x + al * y) + be * z
    return out


@pytest.fixture(scope="module")
def sd2_models(tmp_path_factory) -> tuple[Path, list[str], list[dict]]:
    folder = tmp_path_factory.mktemp("sd2")
    hashes, states = [], []
    for seed in range(3):
        state = tiny_state_dict("sd2", seed=seed + 10, dtype=torch.float32)
        path = write_checkpoint(folder / f"s{seed}.safetensors", state)
        hashes.append(hash_file(path).sha256)
        states.append(state)
    return folder, hashes, states


@pytest.mark.parametrize(("mode", "mbw"), [("Weight sum", True), ("Add difference", True), ("Triple sum", False),
                                           ("sum Twice", True), ("Weight sum", False)])
def test_history_rows_merge_as_supermergers_formulas(sd2_models, tmp_path, mode, mbw):
    folder, hashes, states = sd2_models
    history = tmp_path / "mergehistory.csv"
    beta26 = [0.25] * 13 + [0.5] * 13
    record(history, merged_model(hashes=tuple(h[:10] for h in hashes), alpha=0.75, beta=0.125, mode="Weight sum"))
    row = record(history, merged_model(
        hashes=tuple(h[:10] for h in hashes), weights_a=",".join(map(str, SD26)), weights_b=",".join(map(str, beta26)),
        alpha=0.2, beta=0.3, mode=mode, useblocks=mbw, save_sets=("save model", "safetensors")))
    assert main(["recipe", "import", str(history), "--row", str(row), "--model-root", str(folder),
                 "-o", str(tmp_path / "r.json")]) == 0
    ours = run(json.loads((tmp_path / "r.json").read_text()), folder, tmp_path / "out.safetensors")
    alpha = dict(zip(BLOCKS, SD26, strict=True)) if mbw else 0.2
    beta = dict(zip(BLOCKS, beta26, strict=True)) if mbw else 0.3
    expected = by_formula(mode.split()[0] if mode != "sum Twice" else "Twice", states, alpha, beta)
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key].double(), value.to(ours[key].dtype).double(), rtol=2e-7, atol=2e-7,
                                   msg=key)
    assert torch.equal(ours["cond_stage_model.model.positional_embedding"],
                       states[0]["cond_stage_model.model.positional_embedding"])


def test_an_sdxl_block_list_merges_as_supermerger_places_it(tmp_path):
    states = [tiny_state_dict("sdxl", seed=seed, dtype=torch.float32) for seed in (3, 4)]
    hashes = [hash_file(write_checkpoint(tmp_path / f"x{i}.safetensors", state)).sha256[:10]
              for i, state in enumerate(states)]
    xl20 = [0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.45, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    history = tmp_path / "mergehistory.csv"
    record(history, merged_model(hashes=(*hashes, hashes[0]), weights_a=",".join(map(str, xl20)), useblocks=True))
    ours = run(fp32(convert_history(history.read_text()).recipe), tmp_path, tmp_path / "out.safetensors")
    names = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
    expected = by_formula("Weight", states, dict(zip(names, xl20, strict=True)), 0.0, block_of_xl)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key].double(), value.float().double(), rtol=2e-7, atol=2e-7, msg=key)


def test_history_fixture_rows_and_refusals(tmp_path, capsys):
    text = (DATA / "supermerger" / "mergehistory.csv").read_text()
    (tmp_path / "history.txt").write_text(text)  # known by its header (csv.writer's, unquoted), not its suffix
    assert main(["recipe", "import", str(tmp_path / "history.txt"), "--row", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["merge"]["alpha"]["default"] == 0.3
    first = convert_history(text, row=1)
    assert first.recipe.name == "ws-plain" and first.recipe.merge.a == "sha256:0123456789"
    assert first.recipe.merge.alpha.default == 0.3 and first.recipe.output.dtype == "fp16"
    add = convert_history(text, row=2).recipe.merge
    assert add.method == "add_difference" and add.c == "sha256:fedcba9876"
    assert add.alpha.blocks["BASE"] == add.alpha.blocks["VAE"] == 0.1
    assert add.alpha.blocks["TIME_EMBED"] == add.alpha.blocks["IN00"] == 0.2 and add.alpha.blocks["OUT"] == 0.125
    triple = convert_history(text, row=3)
    assert triple.recipe.output.dtype == "fp32" and "inputs' dtype" in triple.warnings[0]
    xl = convert_history(text, row=7).recipe.merge.alpha.blocks
    assert xl["LABEL_EMB"] == xl["TIME_EMBED"] == xl["IN00"] == 0.1 and xl["OUT"] == xl["OUT08"] == 0.2
    assert "IN09" not in xl
    for row, message in ((5, r"row ID 5: calcmode 'cosineA' has no exact native form"),
                         (6, r"row ID 6: elemental merge 'IN05:attn2:0.2' is not imported"),
                         (8, r"row ID 8: the adjust setting"), (9, r"row ID 9: Exclude of blocks"),
                         (42, r"no row with ID 42")):
        with pytest.raises(RecipeError, match=message):
            convert_history(text, row=row)
    with pytest.raises(RecipeError, match=r"row ID 9: Exclude"):
        convert_history(text)  # the last row by default


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": "Multiply"}, r"unknown mode 'Multiply'"),
    ({"calcmode": "trainDifference"}, r"calcmode 'trainDifference'"),
    ({"weights_alpha": [0.5] * 60}, r"61 block weights \(BASE included\)"),
    ({"model_b": "not-a-hash"}, r"model_b is not a sha256"),
    ({"weights_alpha": [0.5] * 24 + [0.1000000000000000000001]}, None),
])
def test_metadata_refusals(change, message):
    metadata = json.loads((DATA / "supermerger" / "saved-metadata.json").read_text())
    recipe = {**json.loads(metadata["__metadata__"]["sd_merge_recipe"]), **change}
    metadata["__metadata__"]["sd_merge_recipe"] = json.dumps(recipe)
    if message is None:  # a JSON float has no more digits than its shortest repr: imported as is
        assert convert_metadata(metadata).recipe.merge.alpha.blocks["OUT11"] == 0.1
        return
    with pytest.raises(RecipeError, match=message):
        convert_metadata(metadata)


def test_metadata_nested_past_the_json_limit_is_a_recipe_error():
    deep = "[" * 100_000 + "]" * 100_000  # json.loads alone raises RecursionError
    metadata = json.loads((DATA / "supermerger" / "saved-metadata.json").read_text())
    metadata["__metadata__"]["sd_merge_models"] = deep
    with pytest.raises(RecipeError, match="sd_merge_models is not JSON"):
        convert_metadata(metadata)
    metadata["__metadata__"]["sd_merge_recipe"] = deep
    assert import_data(metadata) is None
    with pytest.raises(RecipeError, match="no supermerger sd_merge_recipe"):
        convert_metadata(metadata)


def test_saved_metadata_converts_and_merges(sd2_models, tmp_path, capsys, monkeypatch):
    folder, hashes, states = sd2_models
    fixture = convert_metadata(json.loads((DATA / "supermerger" / "saved-metadata.json").read_text()))
    assert [leaf.name for leaf in fixture.leaves] == ["base-v1.safetensors", "anime/style-b.safetensors",
                                                       "sd-v1-5.safetensors"]
    assert fixture.recipe.merge.alpha.blocks["IN00"] == 0.2 and fixture.recipe.merge.b.sha256 == "b" * 64
    weights = SD26[1:]
    metadata = saved_metadata(models={f"model_{x}": (h, f"elsewhere/{x}.safetensors") for x, h in zip("abc", hashes,
                                                                                                      strict=True)},
                              weights_a=weights, base_alpha=SD26[0], mode="Add difference")
    saved = write_checkpoint(tmp_path / "supermerged.safetensors", states[0],
                             {k: v for k, v in metadata["__metadata__"].items()})
    # a saved model is a checkpoint of gigabytes: its header is read, not the whole file
    monkeypatch.setattr(importers, "MAX_IMPORT_BYTES", saved.stat().st_size // 2)
    assert main(["recipe", "import", str(saved), "--model-root", str(folder), "-o", str(tmp_path / "r.json")]) == 0
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert recipe["merge"]["a"] == {"sha256": hashes[0], "name": str((folder / "s0.safetensors").resolve())}
    recipe["output"]["dtype"] = "fp32"
    ours = run(recipe, folder, tmp_path / "out.safetensors")
    expected = by_formula("Add", states, dict(zip(BLOCKS, SD26, strict=True)), 0.0)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key].double(), value.float().double(), rtol=2e-7, atol=2e-7, msg=key)
    assert main(["recipe", "convert", str(saved)]) == 2  # A1111's converter points to the importer
    assert "`sdmerge recipe import` converts supermerger's own record" in capsys.readouterr().err
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    assert main(["plan", str(tmp_path / "metadata.json"), "--model-root", str(folder)]) == 0
    assert main(["plan", str(tmp_path / "metadata.json")]) == 2
    assert "3 models not found" in capsys.readouterr().err
