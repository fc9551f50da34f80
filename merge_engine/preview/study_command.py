"""`sdmerge study STUDY.json -o DIR`: the selection rounds on one machine, nothing merged to disk
but the picks' final recipe (and only if you ask for it with `sdmerge merge DIR/final.json`).

STUDY.json names the candidates (files), the topics (A1111 txt2img bodies or infotexts: files,
or inline bodies), the settings over them, an optional VAE to bake in, the rounds to run (default
text_encoder, unet, final) and the picks made so far:

    {"name": "mix", "candidates": ["a.safetensors", "b.safetensors", "c.safetensors"],
     "topics": ["topics/cat.json", "topics/street.txt"], "settings": {"steps": 48, "seeds": [1]},
     "rounds": ["raw", "text_encoder", "unet", "leave_one_out", "final"],
     "picks": {"text_encoder": ["b", "c"]}}

Each round is rendered once into DIR/NN-<kind>.png (its singles in DIR/NN-<kind>/), then its
picks are taken from the file, or asked for (`--interactive`: names or column numbers); without
them the run stops and says which to add. DIR/record.json keeps the rounds, columns and picks,
and DIR/final.json is the final recipe, with the study in its output metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from merge_engine.errors import OptionsError

DEFAULT_ROUNDS = ("text_encoder", "unet", "final")
NEEDS_PICKS = ("text_encoder", "unet", "leave_one_out")


def add_parser(sub, roots: argparse.ArgumentParser) -> None:
    p = sub.add_parser("study", parents=[roots], help="selection rounds (text encoders, UNets, leave one out) "
                                                       "rendered as grids; the picks' recipe written as final.json")
    p.add_argument("study", type=Path, metavar="STUDY.json")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    p.add_argument("--interactive", action="store_true", help="ask for each round's picks on the terminal")
    p.add_argument("--device", default="auto", help="auto (GPU in fp16 if present, else CPU in fp32), cpu, cuda")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from merge_engine.jsonsafe import loads, read_file
    from merge_engine.plan import plan
    from merge_engine.preview.command import _absolute, _target
    from merge_engine.study import Candidate, Selection, check_candidates

    raw = read_file(args.study, "study file", 16 << 20, OptionsError)
    spec = loads(raw.decode("utf-8", errors="replace"), what=f"study file {args.study}", error=OptionsError)
    if not isinstance(spec, dict):
        raise OptionsError(f"study file {args.study} must hold a JSON object")
    unknown = sorted(set(spec) - {"name", "candidates", "topics", "settings", "vae", "rounds", "picks"})
    if unknown:
        raise OptionsError(f"study file {args.study}: unknown fields {', '.join(unknown)}")
    here = args.study.parent
    refs = spec.get("candidates")
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise OptionsError("candidates must be a list of checkpoint files")
    targets = [_absolute(_target(ref, args.model_root, here)) for ref in refs]
    candidates = [Candidate(t.label, t.recipe.merge, str(t.recipe.merge)) for t in targets]
    check_candidates(candidates)
    vae = str(_absolute(_target(spec["vae"], args.model_root, here)).recipe.merge) if spec.get("vae") else None
    rounds = spec.get("rounds", list(DEFAULT_ROUNDS))
    if not isinstance(rounds, list) or not rounds:
        raise OptionsError("rounds must be a list of round kinds")
    picks = spec.get("picks") or {}
    if not isinstance(picks, dict):
        raise OptionsError('picks must be an object: {"text_encoder": [names], ...}')
    topics = _topics(spec, here)
    first = plan(targets[0].recipe, targets[0].resolver)
    first.close()
    architecture = first.architecture or ""

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "record.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {"rounds": []}
    selection = Selection(candidates)
    done: list[dict[str, Any]] = []
    for number, kind in enumerate(rounds, start=1):
        entry = _round(args, number, kind, selection, architecture, vae, topics, targets[0].resolver,
                       previous["rounds"])
        if kind in NEEDS_PICKS or (kind == "raw" and "raw" in picks):
            chosen = _picks(args, kind, entry, picks, selection)
            if chosen is None:
                done.append(entry)
                _write_record(record_path, spec, done)
                print(f"round {number} ({kind}): look at {entry['grid']} and add \"picks\": {{\"{kind}\": [...]}} "
                      f"to {args.study} (candidate names), then run again", file=sys.stderr)
                return 0
            entry["picks"] = [candidates[i].label for i in chosen]
            selection.picks[kind] = chosen
        done.append(entry)
        _write_record(record_path, spec, done)
    _write_final(out, spec, done, selection, architecture, vae, args)
    return 0


def _topics(spec: dict[str, Any], here: Path):
    """One Sampling per topic, with the settings over each."""
    from merge_engine.jsonsafe import loads, read_file
    from merge_engine.preview.a1111_settings import from_infotext, from_txt2img_payload
    from merge_engine.preview.params import Sampling, check_topics

    settings = spec.get("settings") or {}
    if not isinstance(settings, dict):
        raise OptionsError("settings must be an object of preview settings (steps, seeds, width, ...)")
    names = {f.name for f in fields(Sampling)}
    if unknown := sorted(set(settings) - names):
        raise OptionsError(f"unknown settings {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    topics = []
    for item in spec.get("topics") or []:
        if isinstance(item, str):
            path = here / item if not Path(item).is_absolute() else Path(item)
            text = read_file(path, "topic file", 16 << 20, OptionsError).decode("utf-8", errors="replace")
            base, _ = (from_txt2img_payload(loads(text, what=f"topic file {path}", error=OptionsError),
                                            seeds_given="seeds" in settings)
                       if path.suffix.lower() == ".json" else from_infotext(text))
        elif isinstance(item, dict):
            base, _ = from_txt2img_payload(item, seeds_given="seeds" in settings)
        else:
            raise OptionsError("a topic is a file (A1111 txt2img body .json, or infotext .txt) or an inline body")
        topics.append(replace(base, **settings))
    if not topics:
        if "prompts" not in settings:
            raise OptionsError("give topics, or prompts in settings")
        topics = [Sampling(**settings)]
    check_topics(topics, 1)
    return topics


def _round(args, number: int, kind: str, selection, architecture: str, vae, topics, resolver,
           previous: list[dict[str, Any]]) -> dict[str, Any]:
    """Render the round (unless DIR already holds it, for the same recipes and settings)."""
    from merge_engine.preview.render import Target, render_previews
    from merge_engine.preview.sweeps import Source, expand, parse_sweep
    from merge_engine.recipe import parse_recipe
    from merge_engine.study import build_round

    spec = build_round(kind, selection, architecture, vae)
    if spec.sweep is not None:
        sweep = parse_sweep({**spec.sweep, "candidates": [selection.candidates[i].leaf for i in
                                                         spec.sweep.get("candidates", [])]}
                            if "candidates" in spec.sweep else spec.sweep)
        labels = {c.leaf: c.label for c in selection.candidates}
        expanded = expand(sweep, Source("base", parse_recipe(spec.sweep["base"])),
                          lambda axis: [Source(labels[c], parse_recipe({"merge": c})) for c in axis.candidates],
                          architecture, lambda leaf: labels.get(leaf) if isinstance(leaf, str) else None)
        cells = [Target(c.label, c.recipe, resolver, c.label) for c in expanded.cells]
        anchor = expanded.anchor
    else:
        cells = [Target(t["label"], parse_recipe(t["recipe"]), resolver, t["label"]) for t in spec.targets]
        anchor = None
    stem = f"{number:02d}-{kind}"
    grid, folder = args.output / f"{stem}.png", args.output / stem
    key = json.dumps({"recipes": [c.recipe.canonical_json() for c in cells],
                      "topics": [t.to_dict() for t in topics]}, sort_keys=True)
    entry = {"number": number, "kind": kind, "columns": [c.label for c in cells],
             "candidates": [selection.candidates[i].label if i is not None else None for i in spec.columns],
             "grid": str(grid), "key": key}
    if any(p.get("key") == key and p.get("number") == number for p in previous) and grid.is_file():
        return entry  # rendered by an earlier run

    def show(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\rround {number} ({kind}): image {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix=f".{stem}.", dir=args.output) as tmp:
        result = render_previews(cells, topics, tmp, device=args.device, progress=show,
                                 image_name=lambda n: f"images/{n:03d}.png", anchor=anchor)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(Path(tmp) / "images", folder)
        if result.grid is not None:
            os.replace(result.grid, grid)
        else:  # one image: the grid is that image
            shutil.copyfile(folder / result.images[0].path.name, grid)
    if not args.quiet:
        print(f"round {number} ({kind}): {grid}, {result.seconds:.1f} s", file=sys.stderr)
    return entry


def _picks(args, kind: str, entry: dict[str, Any], picks: dict[str, Any], selection) -> list[int] | None:
    from merge_engine.study import resolve_picks

    columns = [next((i for i, c in enumerate(selection.candidates) if c.label == label), None)
               for label in entry["candidates"]]
    if kind in picks:
        return resolve_picks(kind, picks[kind], columns, selection.candidates)
    if not args.interactive:
        return None
    offered = [(n, label) for n, label in enumerate(entry["columns"], start=1)]
    print(f"round {entry['number']} ({kind}) is {entry['grid']}; columns: " +
          ", ".join(f"{n} {label}" for n, label in offered), file=sys.stderr)
    what = "left out" if kind == "leave_one_out" else "picked"
    while True:
        answer = input(f"{kind} {what} (names or column numbers, comma separated): ").strip()
        items = [a.strip() for a in answer.split(",") if a.strip()]
        chosen: list[Any] = []
        for item in items:
            if item.isdigit() and 1 <= int(item) <= len(columns) and columns[int(item) - 1] is not None:
                chosen.append(selection.candidates[columns[int(item) - 1]].label)
            else:
                chosen.append(item)
        try:
            return resolve_picks(kind, chosen, columns, selection.candidates)
        except OptionsError as exc:
            print(exc.message, file=sys.stderr)


def _write_record(path: Path, spec: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"name": spec.get("name"), "rounds": rounds}, indent=2, ensure_ascii=False))
    os.replace(partial, path)


def _write_final(out: Path, spec: dict[str, Any], rounds: list[dict[str, Any]], selection, architecture: str,
                 vae, args) -> None:
    from merge_engine.recipe import parse_recipe
    from merge_engine.study import final_recipe, provenance

    name = spec.get("name")
    clean = "".join("_" if c in "/\\\0" else c for c in name).strip() if isinstance(name, str) else None
    recipe = final_recipe(selection, architecture, vae, clean or None)
    record = provenance({"name": name, "vae": Path(vae).name if vae else None},
                        [{k: r[k] for k in ("number", "kind", "columns") if k in r} | {"picks": r.get("picks")}
                         for r in rounds], selection)
    recipe["output"] = {"metadata": {"sdmerge_study": record}}
    parse_recipe(recipe)  # a recipe `sdmerge merge` takes
    final = out / "final.json"
    partial = final.with_name(".final.json.partial")
    partial.write_text(json.dumps(recipe, indent=2, ensure_ascii=False))
    os.replace(partial, final)
    if not args.quiet:
        print(f"wrote {final}: merge it with `sdmerge merge {final} -o OUT.safetensors`", file=sys.stderr)
