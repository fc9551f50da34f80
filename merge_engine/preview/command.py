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
    p.add_argument("--prompt", action="append", required=True, help="repeatable: one grid row each")
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


def run(args: argparse.Namespace) -> int:
    from merge_engine.plan import plan
    from merge_engine.preview.render import Target, render_previews
    from merge_engine.recipe import Recipe

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
    if width is None or height is None:
        first = plan(targets[0].recipe, targets[0].resolver)
        first.close()
        from merge_engine.preview.models import architecture_config

        size = architecture_config(first.architecture or "")["size"]
        width, height = width or size, height or size
    sampling = Sampling(prompts=tuple(args.prompt), negative_prompt=args.negative_prompt,
                        seeds=tuple(args.seed or [0]), steps=args.steps, cfg_scale=args.cfg_scale,
                        sampler=args.sampler, width=width, height=height,
                        prediction_type=args.prediction_type, batch_size=args.batch_size)
    sampling.validate(len(targets))
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
                                 image_name=lambda n: f"images/{n:03d}.png")
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
