"""Benchmark: a selection study at the author's scale (issue 11), against plain diffusers.

    .venv/bin/python bench/study_bench.py --tiny --json study.json          # CPU: tiny SD2 models, 64x64
    python bench/study_bench.py --candidates 23 --json study.json           # GPU: full-size SD2, 1024x576

The study: N candidates (default 23), 12 topics (A1111 payloads, distinct prompts), 1 seed,
Euler, CFG 6, 48 steps at 1024x576 (tiny: 8 steps at 64x64), batch 4; the text-encoder round
(N columns), the UNet round with 4 text encoders picked (N columns), and the final (10 UNets,
4 text encoders): 2 x 12 x N + 12 images, run by `sdmerge study` in this process. Measured:

* wall time of each round and of the whole study, and seconds per image;
* `plain`: seconds per image of diffusers' `StableDiffusionPipeline` over the same UNet and VAE
  modules (precomputed prompt embeddings, same size, steps, batch), in the same run, after the
  study (without transformers installed: that pipeline's loop written out, `_Loop`); the ratio sdmerge/plain is the study's whole cost per image (loading variants, text
  encoding, PNGs and grids included) over bare sampling;
* variant-switch time: every `PreviewModel.load` (in-memory merges and in-place weight writes),
  summed, and its share of the total;
* peak host memory (max RSS) and peak GPU memory.

Candidates are synthetic checkpoints (real keys and shapes, random values) written once to
--cache-dir; full-size SD2 files are 2.6 GB each (23 of them: 60 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from merge_engine.cli import main as sdmerge  # noqa: E402
from merge_engine.hashing import hash_file  # noqa: E402
from merge_engine.preview import pipeline  # noqa: E402

SUBJECTS = ("an astronaut riding a horse", "a girl with long silver hair", "a cabin in a snowy forest",
            "a bowl of ramen", "a red sports car in the rain", "a cat sleeping on a windowsill",
            "a castle on a cliff at sunset", "a robot reading a book", "a market street in Tokyo at night",
            "a portrait of an old fisherman", "a field of sunflowers", "a dragon over the mountains")


def make_candidates(cache: Path, n: int, tiny: bool) -> list[Path]:
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint, write_full_size

    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / (f"tiny-candidate-{i:02d}.safetensors" if tiny else f"sd2-candidate-{i:02d}.safetensors")
             for i in range(n)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    for i, path in enumerate(paths):
        if not path.exists():
            if tiny:
                write_checkpoint(path, tiny_state_dict("sd2", seed=300 + i))
            else:
                write_full_size(path, "sd2", seed=300 + i, device=device)
    for path in paths:
        hash_file(path)  # as registering them does, once, outside the timed part
    print(f"{n} candidates ready in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny SD2 models at 64x64, 8 steps (CPU figures)")
    p.add_argument("--candidates", type=int, default=23)
    p.add_argument("--topics", type=int, default=12)
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of the plain pipeline")
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "study")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.tiny:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    steps = args.steps or (8 if args.tiny else 48)
    width, height = args.width or (64 if args.tiny else 1024), args.height or (64 if args.tiny else 576)
    candidates = make_candidates(args.cache_dir, args.candidates, args.tiny)
    te_picks = [c.stem for c in candidates[:4]]
    unet_picks = [c.stem for c in candidates[:10]]

    work = args.cache_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    topics = [{"prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, highly detailed", "negative_prompt": "lowres, blurry",
               "seed": 1, "steps": steps, "cfg_scale": 6, "sampler_name": "Euler", "width": width, "height": height,
               "batch_size": 1} for i in range(args.topics)]
    study = {"name": "bench", "candidates": [str(c) for c in candidates], "topics": topics,
             "settings": {"batch_size": args.batch_size}, "rounds": ["text_encoder", "unet", "final"],
             "picks": {"text_encoder": te_picks, "unet": unet_picks}}
    study_file = work / "study.json"
    study_file.write_text(json.dumps(study))

    switch = []
    original_load = pipeline.PreviewModel.load

    def timed_load(self, *a, **kw):
        started = time.perf_counter()
        try:
            return original_load(self, *a, **kw)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            switch.append(time.perf_counter() - started)

    rounds: list[tuple[str, float]] = []
    from merge_engine.preview import study_command

    original_round = study_command._round

    def timed_round(args_, number, kind, *rest):
        started = time.perf_counter()
        entry = original_round(args_, number, kind, *rest)
        rounds.append((kind, time.perf_counter() - started))
        return entry

    pipeline.PreviewModel.load = timed_load
    study_command._round = timed_round
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        code = sdmerge(["study", str(study_file), "-o", str(work / "out"), "--device", args.device, "-q"])
    finally:
        pipeline.PreviewModel.load = original_load
        study_command._round = original_round
    total = time.perf_counter() - started
    if code != 0:
        return code
    images = 2 * args.topics * args.candidates + args.topics
    results: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "settings": {"candidates": args.candidates, "topics": args.topics, "seeds": 1, "steps": steps,
                     "size": f"{width}x{height}", "sampler": "Euler", "batch_size": args.batch_size,
                     "tiny": args.tiny},
        "rounds_s": {kind: round(seconds, 3) for kind, seconds in rounds},
        "total_s": round(total, 3), "images": images, "sdmerge_s_per_image": total / images,
        "switch_s": round(sum(switch), 3), "switch_share": sum(switch) / total, "loads": len(switch),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    print(f"study: {images} images in {total:.1f} s ({total / images:.3f} s/image); rounds "
          + ", ".join(f"{k} {s:.1f} s" for k, s in rounds)
          + f"; variant switches {sum(switch):.2f} s ({100 * sum(switch) / total:.1f}% of the total)", flush=True)

    results.update(plain_baseline(candidates[0], steps, width, height, args))
    results["sdmerge_over_plain"] = results["sdmerge_s_per_image"] / results["plain_s_per_image"]
    print(f"plain diffusers: {results['plain_s_per_image']:.3f} s/image; sdmerge/plain "
          f"{results['sdmerge_over_plain']:.2f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def plain_baseline(candidate: Path, steps: int, width: int, height: int, args) -> dict:
    """diffusers' pipeline over the same modules, at the same size, steps and batch."""
    from merge_engine.plan import plan
    from merge_engine.preview.render import _Renderer, pick_device
    from merge_engine.recipe import parse_recipe
    from merge_engine.resolve import FileResolver

    device, dtype = pick_device(args.device)
    renderer = _Renderer(device, dtype, None)
    planned = plan(parse_recipe({"merge": candidate.name}), FileResolver(candidate.parent))
    model = renderer.model_for(planned, True)
    batch = args.batch_size
    prompts = [f"{SUBJECTS[i % len(SUBJECTS)]}, highly detailed" for i in range(batch)]
    cond, _ = renderer._conditioning(model, prompts, 1)
    uncond, _ = renderer._conditioning(model, ["lowres, blurry"] * batch, 1)
    pipe = _pipeline(model)
    generator = torch.Generator("cpu").manual_seed(1)

    def run():
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width,
             num_inference_steps=steps, guidance_scale=6.0, generator=generator, output_type="np")

    run()  # warm-up
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / batch)
    planned.close()
    return {"plain_s_per_image": statistics.median(times), "plain_runs_s_per_image": times,
            "plain": type(pipe).__name__}


def _pipeline(model):
    """StableDiffusionPipeline over the modules when transformers is installed; else the same
    pipeline's denoising loop written out with diffusers' own scheduler (its __call__ needs
    transformers only to import)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="v_prediction", steps_offset=1,
                                       timestep_spacing="linspace")
    unet, vae = model.modules["unet"].module, model.modules["vae"].module
    try:
        import transformers  # noqa: F401
        from diffusers import StableDiffusionPipeline
    except ImportError:
        return _Loop(unet, vae, scheduler)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Loop:
    """StableDiffusionPipeline.__call__ from prompt embeddings: its steps, in its order."""

    def __init__(self, unet, vae, scheduler):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler

    @torch.no_grad()
    def __call__(self, *, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps, guidance_scale,
                 generator, output_type):
        device, dtype = prompt_embeds.device, prompt_embeds.dtype
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels, height // 8, width // 8)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        latents = latents * self.scheduler.init_noise_sigma
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        for t in self.scheduler.timesteps:
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            uncond, cond = noise.chunk(2)
            latents = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents,
                                          return_dict=False)[0]
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


if __name__ == "__main__":
    raise SystemExit(main())
