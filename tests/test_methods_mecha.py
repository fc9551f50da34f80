"""sdmerge's non-linear methods against sd-mecha's output on tiny SD-shaped models, where the
definitions agree (docs/METHODS.md, "Checked against sd-mecha"). sd-mecha is a test-only
dependency (the dev extra)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_engine.architecture import layout
from merge_engine.execute import merge
from merge_engine.plan import plan
from merge_engine.recipe import parse_recipe
from merge_engine.resolve import FileResolver

os.environ.setdefault("TQDM_DISABLE", "1")  # sd-mecha reports progress per key
sd_mecha = pytest.importorskip("sd_mecha")
torch.set_num_threads(1)
COMPONENTS = {"unet": "diffuser", "text_encoder": "clip_h", "vae": "vae"}
DTYPES = {"F16": "float16", "F32": "float32", "I64": "int64"}


@pytest.fixture(scope="module")
def mecha_config(tmp_path_factory):
    """An sd-mecha model config declared from a tiny model's own keys and shapes (sd-mecha has
    no SD2 config of its own and takes SD2 files for SD1)."""
    from sd_mecha.extensions import model_configs

    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    folder = tmp_path_factory.mktemp("mecha")
    for seed in range(4):
        write_checkpoint(folder / f"m{seed}.safetensors", tiny_state_dict("sd2", seed=seed))
    prefixes = layout("sd2").prefixes
    components: dict[str, dict] = {name: {} for name in COMPONENTS.values()}
    with safe_open(folder / "m0.safetensors", framework="pt") as f:
        header = json.loads((folder / "m0.safetensors").read_bytes()[8:8 + int.from_bytes(
            (folder / "m0.safetensors").read_bytes()[:8], "little")])
        for key in f.keys():
            component = next((c for c, p in prefixes.items() if key.startswith(p)), "unet")
            components[COMPONENTS.get(component, "diffuser")][key] = {
                "shape": header[key]["shape"], "dtype": DTYPES[header[key]["dtype"]]}
    identifier = "sdmerge_tiny_sd2-test"
    model_configs.register(model_configs.ModelConfigImpl(identifier, {
        name: model_configs.ModelComponent(keys) for name, keys in components.items()}))
    return folder, identifier


def ours(folder: Path, recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    merge_plan = plan(parse_recipe({"merge": recipe, "output": {"dtype": "fp32"}}), FileResolver(folder))
    try:
        merge(merge_plan, out, overwrite=True)
    finally:
        merge_plan.close()
    return load_file(out)


def theirs(recipe, out: Path, merge_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd_mecha.merge(recipe, output=out, output_dtype=torch.float32, merge_dtype=merge_dtype, threads=1)
    return load_file(out)


def compare(a: dict, b: dict, rtol: float, atol: float) -> int:
    compared = 0
    for key, value in a.items():
        if value.is_floating_point() and key in b:
            torch.testing.assert_close(value, b[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
            compared += value.numel()
    return compared


@pytest.mark.parametrize("vote_sgn", [False, True])
def test_ties_matches_sd_mechas_ties_sum(mecha_config, tmp_path, vote_sgn):
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    folder, config = mecha_config
    paths = [folder / f"m{i}.safetensors" for i in range(4)]
    base, models = sd_mecha.model(paths[0], config=config), [sd_mecha.model(p, config=config) for p in paths[1:]]
    recipe = linear.add_difference(base, ties.ties_sum(*[linear.subtract(m, base) for m in models], k=0.3,
                                                       vote_sgn=vote_sgn), alpha=1.0)
    expected = theirs(recipe, tmp_path / "mecha.safetensors")
    got = ours(folder, {"method": "ties", "base": str(paths[0]), "models": [str(p) for p in paths[1:]],
                        "k": 0.3, "vote_sgn": vote_sgn}, tmp_path / "ours.safetensors")
    assert compare(got, expected, rtol=1e-6, atol=1e-6) > 100_000


def test_geometric_median_matches_sd_mecha(mecha_config, tmp_path):
    from sd_mecha.extensions.builtin.merge_methods import ties

    folder, config = mecha_config
    paths = [folder / f"m{i}.safetensors" for i in range(1, 4)]
    expected = theirs(ties.geometric_median(*[sd_mecha.model(p, config=config) for p in paths]),
                      tmp_path / "mecha.safetensors", torch.float64)
    got = ours(folder, {"method": "geometric_median", "models": [str(p) for p in paths]}, tmp_path / "o.safetensors")
    # Weiszfeld's loop stops where its flat objective stops changing: in fp32 (sd-mecha's default merge
    # dtype) that leaves the median ~1e-3 of the spread away; sdmerge iterates in fp64, so compare there
    assert compare(got, expected, rtol=1e-5, atol=1e-5) > 100_000


def test_slerp_matches_sd_mecha(mecha_config, tmp_path):
    from sd_mecha.extensions.builtin.merge_methods import linear

    folder, config = mecha_config
    a, b = folder / "m1.safetensors", folder / "m2.safetensors"
    expected = theirs(linear.slerp(sd_mecha.model(a, config=config), sd_mecha.model(b, config=config), alpha=0.3),
                      tmp_path / "mecha.safetensors")
    got = ours(folder, {"method": "slerp", "a": str(a), "b": str(b), "alpha": 0.3}, tmp_path / "o.safetensors")
    assert compare(got, expected, rtol=1e-5, atol=1e-6) > 100_000
