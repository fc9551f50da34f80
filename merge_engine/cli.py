"""`sdmerge`: a short shell over parse, plan, execute and write.

Bad input exits with status 2 and one line on stderr naming what is wrong and where; `--debug`
shows the traceback instead. The service adds its own commands to this parser (app/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from . import __version__, jsonsafe
from .errors import RecipeError, SdmergeError
from .preview.command import add_parser as add_preview_parser
from .preview.study_command import add_parser as add_study_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdmerge", description="Merge Stable Diffusion checkpoints.")
    parser.add_argument("--version", action="version", version=f"sdmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    roots = argparse.ArgumentParser(add_help=False)
    roots.add_argument("--model-root", action="append", default=[], metavar="DIR",
                       help="find models by file name under DIR (repeatable)")
    roots.add_argument("--resolve", action="append", default=[], metavar="NAME_OR_SHA=PATH",
                       help="where an A1111 recipe's model is (repeatable)")

    p = sub.add_parser("merge", parents=[roots], help="run a recipe into a .safetensors file")
    p.add_argument("recipe", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--threads", type=int, default=0, help="worker threads (default: cores, max 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--hash", action="store_true", help="also print the output's sha256 (computed while writing)")
    p.add_argument("--verify-inputs", action="store_true",
                   help="also hash every input while merging and compare with its recorded sha256")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--row", type=int, help="of a supermerger mergehistory.csv: the row ID (default: the last)")
    p.set_defaults(handler=_merge)

    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument("-o", "--output", type=Path, required=True)
    writing.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"], default="fp16")
    for flag in ("--threads", "--device", "--overwrite", "--hash", "--quiet"):
        writing.add_argument(flag, **({"type": int, "default": 0} if flag == "--threads" else {"default": "cpu"}
                                      if flag == "--device" else {"action": "store_true"}))

    p = sub.add_parser("export", parents=[roots, writing], help="write components of a model alone (a VAE- "
                                                                "or text-encoder-only file)")
    p.add_argument("model", help="the checkpoint")
    p.add_argument("components", nargs="+", metavar="COMPONENT", choices=[*PARTS, "clip_l", "clip_g"],
                   help="unet, text_encoder (clip_l), text_encoder_2 (clip_g), vae")
    p.set_defaults(handler=_export)

    p = sub.add_parser("assemble", parents=[roots, writing], help="a checkpoint from parts: the UNet of one "
                                                                  "file, the text encoder or VAE of others")
    for part in ("unet", "text-encoder", "clip-l", "text-encoder-2", "clip-g", "vae"):
        p.add_argument(f"--{part}", metavar="FILE", dest=part.replace("-", "_"))
    p.set_defaults(handler=_assemble)

    p = sub.add_parser("plan", parents=[roots], help="dry run: resolve and check a recipe, read no weights")
    p.add_argument("recipe", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--row", type=int, help="of a supermerger mergehistory.csv: the row ID (default: the last)")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("inspect", help="architecture, components, dtypes, metadata and hashes of a file")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-hash", action="store_true", help="skip hashing (fast)")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("hash", help="sha256, A1111 short and legacy hashes, AutoV3, CRC32, BLAKE3 (and the forms Civitai shows)")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_hash)

    recipe = sub.add_parser("recipe", help="recipe tools").add_subparsers(dest="recipe_command", required=True)
    p = recipe.add_parser("convert", parents=[roots], help="A1111 merge metadata -> native recipe")
    p.add_argument("file", type=Path, help="a JSON dump of the metadata, or a .safetensors file")
    p.add_argument("-o", "--output", type=Path, help="write the recipe here (default: stdout)")
    p.set_defaults(handler=_convert)
    p = recipe.add_parser("import", parents=[roots], help="another tool's recipe -> native recipe: sd-mecha's "
                                                          ".mecha, supermerger's mergehistory.csv or saved metadata")
    p.add_argument("recipe", type=Path, metavar="FILE")
    p.add_argument("--row", type=int, help="a mergehistory.csv row by its ID (default: the last)")
    p.add_argument("-o", "--output", type=Path, help="write the recipe here (default: stdout)")
    p.set_defaults(handler=_import)
    p = recipe.add_parser("schema", help="the recipe's JSON Schema")
    p.set_defaults(handler=_schema)

    p = sub.add_parser("analyze", help="distances between checkpoints per component: JSON, heatmaps, maps")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    p.add_argument("--component", action="append", choices=["unet", "text_encoder", "text_encoder_2", "vae"],
                   help="component to analyse (repeatable; default: all of the first file's)")
    p.add_argument("--metric", action="append", choices=["l2", "cosine"], help="repeatable; default: both")
    p.add_argument("--base", type=Path, help="compare task vectors: each model minus this base model")
    p.add_argument("--threads", type=int, default=0, help="reader threads (default: cores, max 4)")
    p.add_argument("--device", default="cpu", help="where the Gram matrices are summed: cpu, cuda, cuda:N")
    p.add_argument("--no-hash", action="store_true", help="leave sha256 out of the report (no full-file hashing)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(handler=_analyze)

    add_preview_parser(sub, roots)
    add_study_parser(sub, roots)

    p = sub.add_parser("demo", help="write tiny SD2-shaped models and a recipe into DIR, then merge them")
    p.add_argument("dir", type=Path)
    p.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except SdmergeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"sdmerge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file problem no check above foresaw: still one line, not a traceback
        if args.debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"sdmerge: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdmerge: interrupted", file=sys.stderr)
        return 130


def load_recipe(args: argparse.Namespace) -> tuple[Any, Any]:
    """A native recipe, A1111 metadata, or another tool's recipe (importers: a .mecha text, a
    supermerger history or metadata), converted on the way in; and its resolver."""
    from .a1111 import apply_resolution, convert_a1111, is_a1111_metadata
    from .importers import detect, import_data, import_file
    from .recipe import parse_recipe
    from .resolve import FileResolver

    path = args.recipe
    raw = jsonsafe.read_file(path, "recipe file", MAX_RECIPE_BYTES, RecipeError)
    resolver = FileResolver(path.parent, args.model_root)
    if detect(path, raw):
        imported = import_file(path, row=getattr(args, "row", None))
        return _resolved(imported, args, resolver), resolver
    data = jsonsafe.loads(raw, what=f"recipe file {path}", error=RecipeError)
    if (imported := import_data(data)) is not None:
        return _resolved(imported, args, resolver), resolver
    if isinstance(data, dict) and is_a1111_metadata(data):
        recipe, unresolved = apply_resolution(convert_a1111(data), _overrides(args.resolve),
                                              lambda leaf: _locate(resolver, leaf))
        _fail_unresolved(unresolved)
        return recipe, resolver
    return parse_recipe(data), resolver


def _resolved(imported: Any, args: argparse.Namespace, resolver: Any) -> Any:
    """An imported recipe with its sha256-named leaves located (as an A1111 conversion's)."""
    from .a1111 import apply_resolution

    for warning in imported.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not imported.leaves:  # references by path or short hash, found as any recipe's are
        from .importers import resolve_refs

        overrides = {}
        for item in args.resolve:
            key, sep, path = item.partition("=")
            if not (key and sep and path):
                raise RecipeError(f"--resolve expects NAME=PATH, got {item!r}", details={"argument": item})
            overrides[key] = str(Path(path).resolve())
        return resolve_refs(imported.recipe, overrides)
    recipe, unresolved = apply_resolution(imported, _overrides(args.resolve), lambda leaf: _locate(resolver, leaf))
    _fail_unresolved(unresolved)
    return recipe


MAX_RECIPE_BYTES = 64 << 20


def _locate(resolver: Any, leaf: Any) -> Path | None:
    path = resolver.locate(leaf.sha256, leaf.name)
    return path.resolve() if path else None


def _overrides(items: list[str]) -> dict[str, str]:
    from .a1111 import resolve_overrides

    return {key: str(Path(path).resolve()) for key, path in resolve_overrides(items).items()}


def _fail_unresolved(unresolved: list[Any]) -> None:
    if unresolved:
        names = ", ".join(leaf.label() for leaf in unresolved)
        raise RecipeError(f"{len(unresolved)} models not found: {names} (use --model-root or --resolve)",
                          details={"unresolved": [leaf.label() for leaf in unresolved]})


def _merge(args: argparse.Namespace) -> int:
    recipe, resolver = load_recipe(args)
    return _write(recipe, resolver, args)


PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _export(args: argparse.Namespace) -> int:
    from .recipe import parse_recipe
    from .resolve import FileResolver

    recipe = {"merge": args.model, "output": {"components": args.components, "dtype": args.dtype}}
    return _write(parse_recipe(recipe), FileResolver(Path.cwd(), args.model_root), args)


def _assemble(args: argparse.Namespace) -> int:
    from .recipe import parse_recipe
    from .resolve import FileResolver

    given = {name: getattr(args, name) for name in ("unet", "text_encoder", "clip_l", "text_encoder_2", "clip_g", "vae")
             if getattr(args, name)}
    if "unet" not in given:
        raise RecipeError("assemble needs --unet (the file every other part is taken over)")
    parts = {name: path for name, path in given.items() if name != "unet"}
    recipe = {"merge": given["unet"], "components": parts, "output": {"dtype": args.dtype}}
    return _write(parse_recipe(recipe), FileResolver(Path.cwd(), args.model_root), args)


def _write(recipe: Any, resolver: Any, args: argparse.Namespace) -> int:
    from . import kernels
    from .execute import ExecOptions, merge
    from .plan import plan
    from .progress import ProgressBar

    merge_plan = plan(recipe, resolver)
    try:
        bar = None if args.quiet else ProgressBar(sys.stderr)
        options = ExecOptions(threads=args.threads, device=args.device,
                              verify_inputs=getattr(args, "verify_inputs", False))
        result = merge(merge_plan, args.output, options=options, progress=bar, overwrite=args.overwrite,
                       compute_sha256=args.hash)
        if bar:
            bar.close()
    finally:
        merge_plan.close()
    if not args.quiet:
        for warning in merge_plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.device == "cpu" and kernels.native() is None:
            print(f"note: merged with {kernels.describe()}, which is slower", file=sys.stderr)
        print(f"wrote {result.path} ({result.size / 1e9:.2f} GB, {len(merge_plan.keys)} tensors, "
              f"{result.seconds:.1f} s)")
    if result.sha256:
        print(f"sha256 {result.sha256} (shorthash {result.sha256[:10]})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan
    from .report_text import print_plan

    recipe, resolver = load_recipe(args)
    merge_plan = plan(recipe, resolver)
    merge_plan.close()
    summary = merge_plan.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_plan(summary)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_checkpoint
    from .report_text import print_inspection

    info = inspect_checkpoint(args.file, hashes=not args.no_hash)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_inspection(info)
    return 0


def _hash(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .hashing import hash_file
    from .report_text import print_hashes

    results = {}
    for path in args.files:
        open_checkpoint(path).close()  # a clear error for a missing or non-checkpoint file
        results[str(path)] = hash_file(path).to_dict()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_hashes(results)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .a1111 import apply_resolution, convert_a1111, load_a1111_metadata
    from .resolve import FileResolver

    conversion = convert_a1111(load_a1111_metadata(args.file))
    recipe = conversion.recipe
    if args.resolve or args.model_root:
        resolver = FileResolver(Path.cwd(), args.model_root)
        recipe, unresolved = apply_resolution(conversion, _overrides(args.resolve),
                                              lambda leaf: _locate(resolver, leaf))
        _fail_unresolved(unresolved)
    for warning in conversion.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return _write_recipe(recipe, args.output, f": {len(conversion.leaves)} leaves")


def _import(args: argparse.Namespace) -> int:
    from .importers import import_file
    from .resolve import FileResolver

    imported = import_file(args.recipe, row=args.row)
    if args.resolve or args.model_root:  # else sha256-named leaves stay so, for the service or a later --resolve
        recipe = _resolved(imported, args, FileResolver(args.recipe.parent, args.model_root))
    else:
        recipe = imported.recipe
        for warning in imported.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return _write_recipe(recipe, args.output)


def _write_recipe(recipe: Any, output: Path | None, note: str = "") -> int:
    """A converted or imported recipe, as JSON, to `output` or standard output."""
    text = json.dumps(recipe.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}{note}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, inputs_from_files
    from .analysis_report import write_report
    from .progress import ProgressBar

    models = inputs_from_files(args.files, hashes=not args.no_hash)
    base = inputs_from_files([args.base], hashes=not args.no_hash, ids=["base"])[0] if args.base else None
    bar = None if args.quiet else ProgressBar(sys.stderr)
    result = analyze(models, args.component, args.metric or ("l2", "cosine"), base=base, progress=bar,
                     threads=args.threads, device=args.device)
    if bar:
        bar.close()
    written = write_report(result, args.output)
    if not args.quiet:
        for component, figures in result.components.items():
            flagged = ", ".join(models[i].name for i in figures.figures.outliers) or "none"
            groups = "; ".join(" = ".join(models[i].name for i in g) for g in figures.identical_groups) or "none"
            print(f"{component}: outliers {flagged}; identical {groups}")
        print(f"wrote {len(written)} files to {args.output} ({result.seconds:.1f} s)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
