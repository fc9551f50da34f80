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
    p.add_argument("targets", nargs="*", metavar="TARGET", help="a checkpoint file or a recipe .json")
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
    webui.add_argument("--settings", type=Path, metavar="FILE", action="append", default=[],
                       help="an A1111 txt2img API body (.json) or a pasted infotext (.txt): prompt, seed, sampler, "
                            "size, hires fix, clip skip, sd_vae, FreeU, dynamic thresholding; repeatable: one "
                            "topic each (the grid's rows)")
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
    p.add_argument("--sweep", type=Path, metavar="FILE",
                   help="a sweep (.json): {\"base\": B, \"kind\": text_encoder|unet|vae|leave_one_out|weight, ...} "
                        "or {\"base\": B, \"x\": {...}, \"y\": {...}}; B and candidates are files, recipe .json "
                        "files or inline recipes (see docs/PREVIEWS.md)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.png")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(handler=run)


def _target(ref: str | dict, roots: list[str], here: Path | None = None):
    """A checkpoint file, a recipe file (JSON, .mecha, supermerger's mergehistory.csv) or an inline
    recipe -> (label, recipe, resolver)."""
    from merge_engine.preview.render import Target
    from merge_engine.recipe import Recipe, parse_recipe
    from merge_engine.resolve import FileResolver

    if isinstance(ref, dict):
        recipe = parse_recipe(ref)
        name = recipe.name or "recipe"
        return Target(name, recipe, FileResolver(here or Path.cwd(), roots), name)
    path = Path(ref)
    if here is not None and not path.is_absolute() and (here / path).exists():
        path = here / path
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
    if path.suffix.lower() in (".mecha", ".csv"):  # sd-mecha's text, supermerger's history (its last row)
        from merge_engine.importers import import_file

        recipe = import_file(path).recipe
        return Target(recipe.name or path.stem, recipe, FileResolver(path.parent, roots), recipe.name or path.stem)
    resolver = FileResolver(here or Path.cwd(), roots)
    found = resolver.find(ref, required=True)
    assert found is not None
    return Target(found.stem, Recipe(merge=str(found.resolve())), resolver, found.stem)


def _absolute(target):
    """The target's recipe with its path leaves made absolute, so that it can be combined with
    other files' recipes (a sweep's variants) under one resolver."""
    from dataclasses import replace

    from merge_engine.methods import LoraLeaf
    from merge_engine.recipe import rewrite_leaves

    def absolute(leaf):
        ref = leaf.ref if isinstance(leaf, LoraLeaf) else leaf
        return str(target.resolver(ref).path.resolve()) if isinstance(ref, str) else ref

    return replace(target, recipe=rewrite_leaves(target.recipe, absolute))


def _sweep_targets(args: argparse.Namespace):
    """--sweep FILE -> (targets, grid rows, anchor)."""
    from merge_engine.jsonsafe import loads, read_file
    from merge_engine.plan import plan
    from merge_engine.preview.render import Target
    from merge_engine.preview.sweeps import Source, expand, parse_sweep

    raw = read_file(args.sweep, "sweep file", 16 << 20, OptionsError)
    sweep = parse_sweep(loads(raw.decode("utf-8", errors="replace"), what=f"sweep file {args.sweep}",
                              error=OptionsError))
    here = args.sweep.parent

    def source(ref) -> Source:
        if not isinstance(ref, str | dict):
            raise OptionsError(f"a sweep's base and candidates are file names or recipes, got {ref!r}")
        target = _absolute(_target(ref, args.model_root, here))
        return Source(target.label, target.recipe)

    base = source(sweep.base)
    resolver = _target(sweep.base, args.model_root, here).resolver
    planned = plan(base.recipe, resolver)
    planned.close()
    expanded = expand(sweep, base, lambda axis: [source(c) for c in axis.candidates], planned.architecture or "")
    targets = [Target(cell.label, cell.recipe, resolver, cell.model_name) for cell in expanded.cells]
    return targets, expanded.rows, expanded.anchor


def _topics(args: argparse.Namespace, width: int | None, height: int | None) -> tuple[list[Sampling], str | None]:
    """One topic per --settings file (none: one from the flags), each with the flags over it; and
    the VAE the files name (they must agree)."""
    from merge_engine.jsonsafe import loads, read_file
    from merge_engine.preview.a1111_settings import from_infotext, from_txt2img_payload

    if not args.settings:
        if not args.prompt:
            raise OptionsError("give --prompt, or --settings with a prompt")
        return [_flags_over(args, None, width, height)], None
    topics, vaes = [], set()
    for path in args.settings:
        raw = read_file(path, "settings file", 16 << 20, OptionsError)
        text = raw.decode("utf-8", errors="replace")
        if path.suffix.lower() == ".json":
            base, vae = from_txt2img_payload(loads(text, what=f"settings file {path}", error=OptionsError),
                                             seeds_given=bool(args.seed))
        else:
            base, vae = from_infotext(text)
        topics.append(_flags_over(args, base, width, height))
        vaes.add(vae)
    named = sorted(v for v in vaes if v is not None)
    if len(named) > 1 or (named and None in vaes and not args.vae):
        raise OptionsError(f"the settings files ask for different VAEs ({', '.join(named)} or none); give --vae")
    return topics, named[0] if named else None


def _flags_over(args: argparse.Namespace, base: Sampling | None, width: int | None, height: int | None) -> Sampling:
    """The flags given, over `base` (a settings file's) or the defaults."""
    from dataclasses import replace

    from merge_engine.preview.params import DynamicThresholding, FreeU, FreeUStage, Hires

    s = base or Sampling(prompts=tuple(args.prompt), width=width or 512, height=height or 512)
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
    return s


def run(args: argparse.Namespace) -> int:
    from merge_engine.plan import plan
    from merge_engine.preview.params import check_topics
    from merge_engine.preview.render import DecodeVae, Target, render_previews
    from merge_engine.recipe import Recipe
    from merge_engine.resolve import FileResolver

    rows = anchor = None
    if args.sweep is not None:
        if args.targets or args.swap_text_encoder_from:
            raise OptionsError("give TARGETs or --sweep, not both")
        targets, rows, anchor = _sweep_targets(args)
    elif not args.targets:
        raise OptionsError("give at least one TARGET, or --sweep")
    else:
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
    topics, vae_name = _topics(args, width, height)
    check_topics(topics, len(targets))
    vae = None
    if args.vae or vae_name:
        resolver = FileResolver(Path.cwd(), args.model_root)
        found = resolver.find(args.vae or vae_name, required=True)
        vae = DecodeVae(str(found.resolve()), found.name)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise OptionsError(f"the output must be a .png file, got {output}")
    single = len(targets) * sum(t.images_per_target() for t in topics) == 1
    folder = output.with_suffix("")
    for path in [output] + ([] if single else [folder]):
        if path.exists() and not args.overwrite:
            raise OptionsError(f"{path} already exists (use --overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)

    def show(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\rimage {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.", dir=output.parent) as tmp:
        result = render_previews(targets, topics, tmp, device=args.device, progress=show,
                                 image_name=lambda n: f"images/{n:03d}.png", vae=vae, grid_rows=rows, anchor=anchor)
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
