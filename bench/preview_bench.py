"""Benchmark: preview sampling against plain diffusers, and a text-encoder sweep (issue 4).

    python bench/preview_bench.py --json preview.json            # GPU: 768x768, 20 steps, fp16
    .venv/bin/python bench/preview_bench.py --tiny               # CPU: tiny SD2 models, 64x64

Full size (needs a GPU): a synthetic full-size SD2.1 checkpoint (fp16, random values, real keys
and shapes) and 8 text-encoder-only files are written to --cache-dir. Measured in one process,
on one warm GPU, in this order:

* `plain`: diffusers' `StableDiffusionPipeline` built from the very UNet and VAE modules the
  preview loaded, called with precomputed `prompt_embeds` (768x768, 20 steps, Euler, CFG 7),
  seconds per image at batch 1 and 4;
* `sdmerge`: the preview sampler on the same modules and embeddings, same settings;
* `swap`: replacing only the text encoder in place (ms), and loading a whole model (s);
* `sweep`: `render_previews` for base + 8 text-encoder candidates x 4 prompts (32 images,
  batch 4): planning, in-memory merges, sampling, PNGs and the grid, end to end. The files are
  hashed first (as registering them in the service does), outside the timed part.

Random weights make noise images, which costs the same time as real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from merge_engine.hashing import hash_file  # noqa: E402
from merge_engine.plan import plan  # noqa: E402
from merge_engine.preview import render as render_module  # noqa: E402
from merge_engine.preview.params import Sampling  # noqa: E402
from merge_engine.preview.render import Target, _Renderer, render_previews  # noqa: E402
from merge_engine.recipe import parse_recipe  # noqa: E402
from merge_engine.resolve import FileResolver  # noqa: E402
from merge_engine.synthetic import tiny_state_dict, write_checkpoint, write_full_size  # noqa: E402

PROMPTS = ("a photo of an astronaut riding a horse on the moon, highly detailed",
           "portrait of a girl with long silver hair, (masterpiece:1.2), best quality",
           "a cozy cabin in a snowy forest at night, warm light, [blurry]",
           "a bowl of ramen, studio lighting, 85mm, sharp focus")
NEGATIVE = "lowres, bad anatomy, worst quality"
CANDIDATES = 8


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_models(cache: Path, tiny: bool, device: str) -> tuple[Path, list[Path]]:
    cache.mkdir(parents=True, exist_ok=True)
    base = cache / ("tiny-base.safetensors" if tiny else "sd2-preview-base.safetensors")
    tes = [cache / (f"tiny-te-{i}.safetensors" if tiny else f"sd2-te-{i}.safetensors") for i in range(CANDIDATES)]
    started = time.perf_counter()
    if not base.exists():
        if tiny:
            write_checkpoint(base, tiny_state_dict("sd2", seed=100))
        else:
            write_full_size(base, "sd2", seed=100, device=device)
    for i, path in enumerate(tes):
        if not path.exists():
            if tiny:
                write_checkpoint(path, tiny_state_dict("sd2", seed=200 + i, components=["text_encoder"]))
            else:
                write_full_size(path, "sd2", seed=200 + i, components=["text_encoder"], device=device)
    print(f"models ready in {time.perf_counter() - started:.1f} s", flush=True)
    return base, tes


def _alternating(runs: dict, images: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per image of each run, taken in turn (A B A B ...) after one warm-up each, so
    clock ramps and noise fall on both alike."""
    for fn in runs.values():
        fn()  # warm-up: cuDNN/cuBLAS autotuning, allocator
    sync()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - started) / images)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny SD2 models, 64x64, 4 steps (CPU figures)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-plain", action="store_true", help="do not time diffusers' pipeline")
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "preview")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tes = make_models(args.cache_dir, args.tiny, gen_device)
    size, steps = (64, 4) if args.tiny else (768, 20)
    started = time.perf_counter()
    for path in [base, *tes]:
        hash_file(path)  # what registering the models does, once
    print(f"hashed in {time.perf_counter() - started:.1f} s", flush=True)
    resolver = FileResolver(args.cache_dir)
    results: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                 "cpus": os.cpu_count()},
                     "settings": {"size": size, "steps": steps, "sampler": "euler", "cfg_scale": 7}}

    # --- one loaded model: the preview sampler against diffusers' pipeline, same modules ---
    sampling = Sampling(prompts=PROMPTS, negative_prompt=NEGATIVE, seeds=(1,), steps=steps, width=size,
                        height=size, sampler="euler", cfg_scale=7.0, batch_size=4)
    renderer = _Renderer(*_device(args.device), None)
    planned = plan(parse_recipe({"merge": base.name}), resolver)
    started = time.perf_counter()
    import diffusers  # noqa: F401
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
    results["import_and_cuda_init_s"] = time.perf_counter() - started
    started = time.perf_counter()
    model = renderer.model_for(planned, True)
    sync()
    results["load_full_model_s"] = time.perf_counter() - started
    model.loaded.clear()  # every component again, into the modules already built
    started = time.perf_counter()
    model.load(planned, exact_copy=True)
    sync()
    results["reload_all_weights_s"] = time.perf_counter() - started
    te_plan = plan(parse_recipe({"merge": base.name, "components": {"text_encoder": tes[0].name}}), resolver)
    swaps = []
    for target_plan in (te_plan, planned) * 2:
        started = time.perf_counter()
        changed = model.load(target_plan, exact_copy=False)
        sync()
        swaps.append(time.perf_counter() - started)
        assert changed == ["text_encoder"], changed
    results["swap_text_encoder_ms"] = statistics.median(swaps) * 1000
    print(f"import+init {results['import_and_cuda_init_s']:.2f} s, load {results['load_full_model_s']:.2f} s, "
          f"reload weights {results['reload_all_weights_s']:.2f} s, "
          f"text-encoder swap {results['swap_text_encoder_ms']:.0f} ms", flush=True)

    for batch in (1, 4):
        jobs = [(i % len(PROMPTS), 1) for i in range(batch)]
        runs = {"sdmerge": lambda jobs=jobs: renderer._sample(model, sampling, [PROMPTS[p] for p, _ in jobs], [seed for _, seed in jobs])}
        if not args.skip_plain:
            runs["plain"] = _plain_pipeline(model, renderer, batch, size, steps)
        times = _alternating(runs, batch, args.repeat)
        ours = statistics.median(times["sdmerge"])
        results[f"sdmerge_s_per_image_batch{batch}"] = ours
        print(f"sdmerge batch {batch}: {ours:.3f} s/image", flush=True)
        if "plain" in times:
            theirs = statistics.median(times["plain"])
            results[f"plain_s_per_image_batch{batch}"] = theirs
            results[f"plain_over_sdmerge_batch{batch}"] = theirs / ours
            print(f"plain diffusers batch {batch}: {theirs:.3f} s/image (ratio plain/sdmerge {theirs / ours:.2f})", flush=True)
    planned.close()
    te_plan.close()
    renderer.model = None  # the sweep loads its model itself: its time counts in the sweep
    render_module._KEPT.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # --- the sweep, end to end ---
    targets = [Target(path.stem, parse_recipe({"name": f"te-{i}", "merge": base.name,
                                               "components": {"text_encoder": path.name}}),
                      resolver, f"te-{i}") for i, path in enumerate(tes)]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = render_previews(targets, sampling, out, device=args.device)
        sync()
        results["sweep_s"] = time.perf_counter() - started
        results["sweep_images"] = len(result.images)
    print(f"sweep: {results['sweep_images']} images in {results['sweep_s']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def _device(name: str):
    from merge_engine.preview.render import pick_device

    return pick_device(name)


def _plain_pipeline(model, renderer, batch: int, size: int, steps: int):
    """diffusers' StableDiffusionPipeline over the same UNet and VAE, given prompt embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="v_prediction", steps_offset=1,
                                       timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(vae=model.modules["vae"].module, text_encoder=None, tokenizer=None,
                                   unet=model.modules["unet"].module, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, _ = renderer._conditioning(model, [PROMPTS[i % len(PROMPTS)] for i in range(batch)], 1)
    uncond, _ = renderer._conditioning(model, [NEGATIVE] * batch, 1)
    generator = torch.Generator("cpu").manual_seed(1)

    def run():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=7.0, generator=generator, output_type="np").images

    return run


if __name__ == "__main__":
    raise SystemExit(main())
