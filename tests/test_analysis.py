"""Weight analysis end to end on tiny SD2-shaped checkpoints with known relations."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from merge_engine.analysis import AnalysisError, AnalysisInput, analyze
from merge_engine.analysis_math import classical_mds, cluster_order
from merge_engine.analysis_report import heatmap_inches, map_inches, pixels, write_report
from merge_engine.checkpoint import open_checkpoint
from merge_engine.cli import main
from merge_engine.errors import (
    ArchitectureError,
    LayoutMismatchError,
    MergeCancelled,
    NonFiniteError,
)
from merge_engine.synthetic import tiny_state_dict

TEXT = "cond_stage_model."
NAMES = ["base", "copy", "other_te", "scaled", "outlier", "seed1"]


def _floats(state: dict, fn) -> dict:
    return {k: fn(k, v) if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture
def family(make_model):
    """base, an exact copy, base with seed1's text encoder, base x2, base + large noise, seed1."""
    a, b = tiny_state_dict("sd2", seed=0), tiny_state_dict("sd2", seed=1)
    noise = torch.Generator().manual_seed(7)
    states = [
        a, dict(a), {**a, **{k: v for k, v in b.items() if k.startswith(TEXT)}},
        _floats(a, lambda k, v: v * 2),
        _floats(a, lambda k, v: v + (torch.randn(v.shape, generator=noise) * 3).to(v.dtype)),
        b,
    ]
    return [make_model(f"{name}.safetensors", state=state) for name, state in zip(NAMES, states, strict=True)]


def _direct(paths, component, base=None):
    """Pairwise distances and cosines computed the obvious way, in fp64."""
    from merge_engine.architecture import detect

    def vector(path):
        with open_checkpoint(path) as ckpt:
            info = detect(ckpt.tensors, model=path.name)
            keys = [k for k in info.components[component] if ckpt.tensors[info.stored_key(k)].is_float]
            return torch.cat([ckpt.read_tensor(info.stored_key(k)).double().reshape(-1) for k in sorted(keys)])

    xs = [vector(p) for p in paths]
    if base is not None:
        origin = vector(base)
        xs = [x - origin for x in xs]
    n = len(xs)
    l2 = np.array([[float(torch.linalg.vector_norm(xs[i] - xs[j])) for j in range(n)] for i in range(n)])
    cos = np.array([[float(xs[i] @ xs[j] / (xs[i].norm() * xs[j].norm())) for j in range(n)] for i in range(n)])
    mean = sum(xs) / n
    score = np.array([float(torch.linalg.vector_norm(x - mean)) for x in xs])
    return l2, cos, np.array([float(x.norm()) for x in xs]), score


def _close(ours, theirs, rel=1e-9):
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("with_base", [False, True])
def test_matrices_equal_a_direct_pairwise_fp64_computation(family, make_model, with_base):
    base = make_model("root.safetensors", seed=3) if with_base else None
    result = analyze(family, threads=2, base=base)
    assert set(result.components) == {"unet", "text_encoder", "vae"}
    for component, figures in result.components.items():
        l2, cos, norm, score = _direct(family, component, base)
        f = figures.figures
        _close(f.l2, l2)
        _close(f.cosine, cos)
        _close(f.norm, norm)
        _close(f.outlier_score, score)
    blocks = result.components["unet"].blocks
    assert {"input_blocks.0", "middle_block", "output_blocks.11", "time_embed", "out"} <= set(blocks)
    total = sum(b.norm**2 for b in blocks.values())
    _close(total, result.components["unet"].figures.norm ** 2)


@pytest.mark.parametrize("device", ["gpu-path-on-cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_device_path_gives_the_same_matrices(family, make_model, monkeypatch, device):
    """The GPU code path (positioned reads, widening and the Gram on the device), run on the CPU
    in CI and on a GPU where there is one, against the direct fp64 computation."""
    import merge_engine.analysis as analysis

    if device != "cuda":
        monkeypatch.setattr(analysis, "_DEVICE_PATH_ON_CPU", True)
    base = make_model("root.safetensors", seed=3)
    result = analyze(family, threads=2, base=base, device="cuda" if device == "cuda" else "cpu",
                     chunk_bytes=1 << 14)  # small chunks: many per tensor, buffers reused
    for component, figures in result.components.items():
        l2, cos, norm, score = _direct(family, component, base)
        _close(figures.figures.l2, l2)
        _close(figures.figures.cosine, cos)
        _close(figures.figures.outlier_score, score)


@pytest.mark.parametrize("device_path", [False, True])
def test_a_nan_in_one_input_is_named(make_model, monkeypatch, device_path):
    import merge_engine.analysis as analysis

    monkeypatch.setattr(analysis, "_DEVICE_PATH_ON_CPU", device_path)
    key = "first_stage_model.decoder.conv_in.weight"
    state = tiny_state_dict("sd2", seed=1)
    state[key] = state[key].clone()
    state[key].view(-1)[5] = float("nan")
    files = [make_model("a.safetensors"), make_model("b.safetensors", state=state), make_model("c.safetensors", seed=2)]
    with pytest.raises(NonFiniteError) as info:
        analyze(files, components=["vae"], threads=2, chunk_bytes=1 << 14)
    assert (info.value.model, info.value.component, info.value.key) == ("b.safetensors", "vae", key)


def test_device_errors_are_clear(family):
    with pytest.raises(AnalysisError, match="unknown device"):
        analyze(family, device="gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(AnalysisError, match="no CUDA device"):
            analyze(family, device="cuda")


def test_identical_components_and_the_outlier_are_found(family):
    result = analyze(family, threads=1)
    unet, text = result.components["unet"], result.components["text_encoder"]
    assert unet.identical_groups == [[0, 1, 2]]  # other_te changed only its text encoder
    assert text.identical_groups == [[0, 1], [2, 5]]  # ... which is seed1's own
    for figures in result.components.values():
        assert figures.figures.outliers == [4]
        assert figures.figures.l2[0, 1] == 0 and figures.figures.cosine[0, 1] == 1
    assert unet.figures.cosine[0, 3] == pytest.approx(1.0)  # scaled weights point the same way
    assert unet.figures.norm[3] == pytest.approx(2 * unet.figures.norm[0])


def test_near_identical_models_keep_exact_distances(make_model):
    a = tiny_state_dict("sd2", seed=0, components=["vae"])
    key = "first_stage_model.decoder.conv_out.bias"
    nudged = {**a, key: a[key].clone()}
    nudged[key].view(torch.int16)[0] += 1  # one fp16 ulp: the smallest difference there is
    paths = [make_model("a.safetensors", state=a), make_model("b.safetensors", state=nudged)]
    result = analyze(paths)
    expected = abs(float(nudged[key][0]) - float(a[key][0]))
    assert expected > 0
    assert result.components["vae"].figures.l2[0, 1] == pytest.approx(expected, rel=1e-12)
    assert result.components["vae"].identical_groups == []


def test_report_files_are_valid_images_of_the_expected_size(family, tmp_path):
    from matplotlib.image import imread

    result = analyze(family, ["unet", "text_encoder"], ["cosine"])
    out = tmp_path / "report"
    written = write_report(result, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    data = json.loads((out / "analysis.json").read_text())
    assert [m["name"] for m in data["models"]] == [f"{n}.safetensors" for n in NAMES]
    assert set(data["components"]) == {"unet", "text_encoder"}
    assert "l2" not in data["components"]["unet"] and len(data["components"]["unet"]["cosine"]) == 6
    for name, inches in (("heatmap-unet-cosine", heatmap_inches(6)), ("map-text_encoder", map_inches(6))):
        image = imread(out / f"{name}.png")
        assert image.shape[:2] == pixels(inches)[::-1]
        assert image.std() > 0.05  # something is drawn
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    assert not list(tmp_path.glob(".*partial"))


def test_cli_writes_the_report(family, tmp_path, capsys):
    out = tmp_path / "cli-report"
    assert main(["analyze", *map(str, family[:3]), "--component", "vae", "--metric", "l2", "-o", str(out)]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert [m["id"] for m in data["models"]] == [0, 1, 2]
    assert all(len(m["sha256"]) == 64 for m in data["models"]) and data["base"] is None
    assert data["components"]["vae"]["identical_groups"] == [[0, 1, 2]]
    assert {p.name for p in out.iterdir()} == {"analysis.json", "heatmap-vae-l2.png", "heatmap-vae-l2.svg",
                                               "map-vae.png", "map-vae.svg"}
    assert "identical base.safetensors = copy.safetensors = other_te.safetensors" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["one_model", "mixed", "missing_key", "missing_component", "shape", "metric"])
def test_bad_inputs_give_clear_errors_and_no_files(make_model, tmp_path, capsys, case):
    a = make_model("a.safetensors")
    states = {
        "mixed": tiny_state_dict("sd1"),
        "missing_key": {k: v for k, v in tiny_state_dict("sd2").items() if not k.endswith("conv_out.bias")},
        "missing_component": tiny_state_dict("sd2", components=["unet", "text_encoder"]),
        "shape": {**tiny_state_dict("sd2"), "first_stage_model.decoder.conv_out.bias": torch.zeros(5).half()},
    }
    files = [a] if case == "one_model" else [a, make_model("b.safetensors", state=states.get(case))]
    extra = ["--metric", "manhattan"] if case == "metric" else []
    out = tmp_path / "report"
    if case == "metric":
        with pytest.raises(SystemExit):  # argparse refuses it; the engine too, below
            main(["analyze", *map(str, files), "-o", str(out), *extra])
        with pytest.raises(AnalysisError, match="unknown metric"):
            analyze(files, metrics=["manhattan"])
        return
    assert main(["analyze", *map(str, files), "-o", str(out), "--no-hash"]) == 2
    message = capsys.readouterr().err
    expected = {"one_model": "at least 2 models", "mixed": "sd1", "missing_key": "conv_out.bias",
                "missing_component": "no vae", "shape": "conv_out.bias"}[case]
    assert expected in message and message.startswith("sdmerge: error:")
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    errors = {"mixed": ArchitectureError, "missing_key": LayoutMismatchError,
              "missing_component": LayoutMismatchError, "shape": LayoutMismatchError}
    if case in errors:
        with pytest.raises(errors[case]) as info:
            analyze(files)
        assert info.value.model in ("a.safetensors", "b.safetensors")


def test_cancel_stops_the_pass(family):
    with pytest.raises(MergeCancelled):
        analyze(family, should_cancel=lambda: True)


def test_memory_does_not_grow_with_the_weights(make_model):
    """Python-side allocations stay at the Gram matrices plus one chunk matrix per thread,
    whether the models hold 2 MB or 50 MB of extra weights."""
    peaks = []
    for count in (2, 48):
        state = tiny_state_dict("sd2", seed=0, components=["vae"])
        extra = {f"first_stage_model.extra.{i}.weight": torch.randn(1 << 19).half() for i in range(count)}
        paths = [make_model(f"m{count}-{i}.safetensors", state={**state, **extra}) for i in range(3)]
        tracemalloc.start()
        result = analyze(paths, threads=1, chunk_bytes=1 << 20)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert result.components["vae"].params > count << 19
    assert peaks[1] < peaks[0] + (2 << 20), peaks  # 48 x 3 x 4 MiB of fp64 weights went through
    assert peaks[1] < 8 << 20, peaks


def test_clustering_and_mds_recover_simple_geometry():
    points = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.0, 0.2], [0.0, 0.1]])
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    order = cluster_order(distance)
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert {order.index(2), order.index(3)} in ({0, 1}, {3, 4})  # the far pair stays together
    coords = classical_mds(distance)
    np.testing.assert_allclose(np.linalg.norm(coords[:, None] - coords[None], axis=-1), distance, atol=1e-9)


def test_inputs_can_carry_service_ids(family):
    models = [AnalysisInput(p, f"model {i}", f"id-{i}", "0" * 64) for i, p in enumerate(family[:2])]
    data = analyze(models, ["vae"]).to_dict()
    assert data["models"][1] == {"id": "id-1", "name": "model 1", "sha256": "0" * 64}


def test_models_of_different_float_dtypes_compare_by_value(make_model):
    a = tiny_state_dict("sd2", seed=0, components=["vae"], dtype=torch.float32)
    paths = [make_model(f"{name}.safetensors", state=_floats(a, lambda k, v, d=dtype: v.to(d)))
             for name, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16))]
    result = analyze(paths)
    l2, cos, norm, score = _direct(paths, "vae")
    _close(result.components["vae"].figures.l2, l2)
    _close(result.components["vae"].figures.norm, norm)
    assert result.components["vae"].identical_groups == []


def test_hard_links_are_identical_without_hashing(family, tmp_path):
    link = tmp_path / "link.safetensors"
    link.hardlink_to(family[3])
    result = analyze([family[3], link, family[0]], ["vae"])
    assert result.components["vae"].identical_groups == [[0, 1]]


def test_a_second_report_replaces_the_first(family, tmp_path):
    out = tmp_path / "report"
    write_report(analyze(family[:2], ["vae"]), out)
    write_report(analyze(family[:2], ["text_encoder"], ["l2"]), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json", "heatmap-text_encoder-l2.png", "heatmap-text_encoder-l2.svg",
        "map-text_encoder.png", "map-text_encoder.svg"]
