"""`sdmerge preview TARGET... --prompt P -o OUT.png`: the CLI side of previews.

A target is a checkpoint file or a recipe JSON (found like `merge` finds them: the path, then by
file name under `--model-root`). One image is written at OUT; more make a labelled grid at OUT
and the single images in the folder OUT's stem names. Everything is written under temporary
names first and moved into place at the end, so an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from merge_engine.errors import OptionsError, RecipeError
from merge_engine.preview.params import DEFAULT_PREDICTION, PREDICTION_TYPES, SAMPLERS, Sampling


def add_parser(sub, roots: argparse.ArgumentParser) -> None:
    p = sub.add_parser("preview", parents=[roots], help="sample images from checkpoints or recipes (no files merged)")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="a checkpoint file or a recipe .json")
    p.add_argument("--prompt", action="append", help="repeatable: one grid row each (default: --settings' prompt)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, action="append", help="repeatable (default: 0)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--sampler", default="euler", choices=list(SAMPLERS))
    p.add_argument("--width", type=int, help="default: the architecture's (SD1 512, SD2 768, SDXL 1024)")
    p.add_argument("--height", type=int)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help=f"default: {', '.join(f'{a} {p}' for a, p in DEFAULT_PREDICTION.items())}")
    p.add_argument("--batch-size", type=int, default=4)
    webui = p.add_argument_group("the WebUI's settings (a flag given here overrides --settings)")
    webui.add_argument("--settings", type=Path, metavar="FILE",
                       help="an A1111 txt2img API body (.json) or a pasted infotext (.txt): prompt, seed, sampler, "
                            "size, hires fix, clip skip, sd_vae, FreeU, dynamic thresholding")
    webui.add_argument("--clip-skip", type=int, help="the WebUI's CLIP_stop_at_last_layers (default 1)")
    webui.add_argument("--vae", metavar="REF", help="decode with the VAE of this file (the WebUI's sd_vae)")
    webui.add_argument("--hires-scale", type=float, help="hires fix: upscale by this (turns hires fix on)")
    webui.add_argument("--hires-upscaler", help="Latent (default), Latent (antialiased), Latent (bicubic), ..., "
                                                "Lanczos, Nearest")
    webui.add_argument("--hires-steps", type=int, help="second-pass steps (default: as many as the first pass)")
    webui.add_argument("--denoising-strength", type=float, help="hires fix's second pass (default 0.7)")
    webui.add_argument("--freeu", type=float, nargs=4, metavar=("B1", "S1", "B2", "S2"),
                       help="FreeU backbone and skip factors of the first two stages (sd-webui-freeu)")
    webui.add_argument("--freeu-version", choices=("1", "2"), default=None, help="default 2")
    webui.add_argument("--mimic-scale", type=float, help="dynamic thresholding's mimic CFG scale (turns it on)")
    webui.add_argument("--interpolate-phi", type=float, help="dynamic thresholding's interpolate phi (default 1)")
    p.add_argument("--device", default="auto", help="auto (GPU in fp16 if present, else CPU in fp32), cpu, cuda")
    p.add_argument("--swap-text-encoder-from", nargs="+", metavar="REF", default=[],
                   help="text-encoder sweep: one column per REF, each the first TARGET with REF's text encoder")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.png")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(handler=run)


def _target(ref: str, roots: list[str]):
    """A checkpoint file or a recipe file -> (label, recipe, resolver)."""
    from merge_engine.preview.render import Target
    from merge_engine.recipe import Recipe, parse_recipe
    from merge_engine.resolve import FileResolver

    path = Path(ref)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise RecipeError(f"recipe file {path} cannot be read as JSON: {exc}") from None
        recipe = parse_recipe(data)
        name = recipe.name or path.stem
        return Target(name, recipe, FileResolver(path.parent, roots), name)
    resolver = FileResolver(Path.cwd(), roots)
    found = resolver.find(ref, required=True)
    assert found is not None
    return Target(found.stem, Recipe(merge=str(found.resolve())), resolver, found.stem)


def _sampling(args: argparse.Namespace, width: int, height: int) -> tuple[Sampling, str | None]:
    """--settings (a txt2img body or an infotext) as the base, the flags given over it."""
    from dataclasses import replace

    from merge_engine.jsonsafe import read_file
    from merge_engine.preview.a1111_settings import from_infotext, from_txt2img_payload
    from merge_engine.preview.params import DynamicThresholding, FreeU, FreeUStage, Hires

    base, vae = None, None
    if args.settings:
        raw = read_file(args.settings, "settings file", 16 << 20, OptionsError)
        text = raw.decode("utf-8", errors="replace")
        if args.settings.suffix.lower() == ".json":
            from merge_engine.jsonsafe import loads

            base, vae = from_txt2img_payload(loads(text, what=f"settings file {args.settings}", error=OptionsError))
        else:
            base, vae = from_infotext(text)
    if base is None and not args.prompt:
        raise OptionsError("give --prompt, or --settings with a prompt")
    s = base or Sampling(prompts=tuple(args.prompt), width=width, height=height)
    given = {name: value for name, value in (
        ("prompts", tuple(args.prompt) if args.prompt else None),
        ("negative_prompt", args.negative_prompt if args.negative_prompt or base is None else None),
        ("seeds", tuple(args.seed) if args.seed else None),
        ("steps", args.steps if base is None or args.steps != 20 else None),
        ("cfg_scale", args.cfg_scale if base is None or args.cfg_scale != 7.0 else None),
        ("sampler", args.sampler if base is None or args.sampler != "euler" else None),
        ("width", args.width), ("height", args.height), ("prediction_type", args.prediction_type),
        ("batch_size", args.batch_size if base is None or args.batch_size != 4 else None),
        ("clip_skip", args.clip_skip)) if value is not None}
    s = replace(s, **given)
    if any(v is not None for v in (args.hires_scale, args.hires_upscaler, args.hires_steps, args.denoising_strength)):
        h = s.hires or Hires()
        s = replace(s, hires=replace(h, **{k: v for k, v in (
            ("scale", args.hires_scale), ("upscaler", args.hires_upscaler), ("second_pass_steps", args.hires_steps),
            ("denoising_strength", args.denoising_strength)) if v is not None}))
    if args.freeu or args.freeu_version:
        f = s.freeu or FreeU()
        stages = f.stages
        if args.freeu:
            b1, s1, b2, s2 = args.freeu
            stages = (FreeUStage(b1, s1), FreeUStage(b2, s2), f.stages[2])
        s = replace(s, freeu=replace(f, stages=stages, version=args.freeu_version or f.version))
    if args.mimic_scale is not None or args.interpolate_phi is not None:
        d = s.dynamic_thresholding or DynamicThresholding()
        s = replace(s, dynamic_thresholding=replace(d, **{k: v for k, v in (
            ("mimic_scale", args.mimic_scale), ("interpolate_phi", args.interpolate_phi)) if v is not None}))
    return s, vae


def run(args: argparse.Namespace) -> int:
    from merge_engine.plan import plan
    from merge_engine.preview.render import DecodeVae, Target, render_previews
    from merge_engine.recipe import Recipe
    from merge_engine.resolve import FileResolver

    targets = [_target(ref, args.model_root) for ref in args.targets]
    if args.swap_text_encoder_from:
        base = targets[0]
        swaps = []
        for ref in args.swap_text_encoder_from:
            donor = _target(ref, args.model_root)
            if not isinstance(donor.recipe.merge, str):
                raise OptionsError(f"--swap-text-encoder-from takes checkpoint files, not recipes: {ref}")
            recipe = Recipe(name=f"{base.label} + TE {donor.label}", merge=base.recipe.merge,
                            components={**base.recipe.components, "text_encoder": donor.recipe.merge})
            swaps.append(Target(f"TE: {donor.label}", recipe, base.resolver, recipe.name or donor.label))
        targets = [base, *swaps]
    width, height = args.width, args.height
    if (width is None or height is None) and not args.settings:
        first = plan(targets[0].recipe, targets[0].resolver)
        first.close()
        from merge_engine.preview.models import architecture_config

        size = architecture_config(first.architecture or "")["size"]
        width, height = width or size, height or size
    sampling, vae_name = _sampling(args, width, height)
    sampling.validate(len(targets))
    vae = None
    if args.vae or vae_name:
        resolver = FileResolver(Path.cwd(), args.model_root)
        found = resolver.find(args.vae or vae_name, required=True)
        vae = DecodeVae(str(found.resolve()), found.name)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise OptionsError(f"the output must be a .png file, got {output}")
    single = len(targets) * sampling.images_per_target() == 1
    folder = output.with_suffix("")
    for path in [output] + ([] if single else [folder]):
        if path.exists() and not args.overwrite:
            raise OptionsError(f"{path} already exists (use --overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)

    def show(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\rimage {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as tmp:
        result = render_previews(targets, sampling, tmp, device=args.device, progress=show,
                                 image_name=lambda n: f"images/{n:03d}.png", vae=vae)
        if single:
            os.replace(result.images[0].path, output)
        else:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(Path(tmp) / "images", folder)
            assert result.grid is not None
            os.replace(result.grid, output)
    if not args.quiet:
        what = "image" if single else f"grid of {len(result.images)} images (singles in {folder})"
        print(f"wrote {output}: {what}, {result.seconds:.1f} s")
    return 0
