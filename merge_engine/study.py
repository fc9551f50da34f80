"""Selection studies: the look-and-pick rounds of a community mix, as data. Torch-free: the
service and `sdmerge study` build each round from this, and render it as a preview.

The rounds, as the AstolfoMix author runs them:

* `raw`: the uniform merge of every candidate ("all N"), then each candidate as it is. Picks
  (optional) are the candidates kept for the later rounds.
* `text_encoder`: the blind merge of the kept candidates, with each one's text encoder in turn.
  Picks: the useful text encoders, merged uniformly from then on.
* `unet`: each kept candidate's UNet with the picked text encoders merged (and the study's VAE).
  Picks: the useful UNets.
* `leave_one_out`: the picked UNets merged, less one at a time. Picks: the UNets to leave out.
* `final`: the recipe: the picked UNets (less those left out) and the picked text encoders, each
  merged uniformly, and the study's VAE baked in. Its exact weights are 1/k.

A round is built from the picks recorded so far (`Selection`); what is sampled is either plain
targets or a sweep (merge_engine.preview.sweeps), with one grid column per candidate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionsError

ROUND_KINDS = ("raw", "text_encoder", "unet", "leave_one_out", "final")
PICKED = {"raw": "kept", "text_encoder": "text encoders", "unet": "UNets", "leave_one_out": "left out"}
MAX_CANDIDATES = 256


@dataclass(frozen=True)
class Candidate:
    label: str
    leaf: Any  # recipe JSON of the model: {"sha256", "name"} (the service) or a path (the CLI)
    sha256: str | None = None


@dataclass
class Selection:
    """Which candidates each role takes, from the picks of the latest round of each kind."""

    candidates: Sequence[Candidate]
    picks: dict[str, list[int]] = field(default_factory=dict)  # round kind -> candidate indexes

    def kept(self) -> list[int]:
        return self.picks.get("raw") or list(range(len(self.candidates)))

    def text_encoders(self) -> list[int]:
        return self.picks.get("text_encoder") or self.kept()

    def unets(self) -> list[int]:
        chosen = self.picks.get("unet") or self.kept()
        left_out = set(self.picks.get("leave_one_out", []))
        return [i for i in chosen if i not in left_out]

    def unets_before_leaving_out(self) -> list[int]:
        return self.picks.get("unet") or self.kept()


@dataclass(frozen=True)
class RoundSpec:
    kind: str
    targets: list[dict[str, Any]]  # [{"label", "recipe"}], or [] when `sweep` is set
    sweep: dict[str, Any] | None
    columns: list[int | None]  # the candidate of each grid column (None: not one candidate)
    base: dict[str, Any] | None  # the recipe the round varies


def check_candidates(candidates: Sequence[Candidate]) -> None:
    if len(candidates) < 2:
        raise OptionsError(f"a study needs at least 2 candidates, got {len(candidates)}")
    if len(candidates) > MAX_CANDIDATES:
        raise OptionsError(f"a study takes at most {MAX_CANDIDATES} candidates")
    seen: dict[str, int] = {}
    for i, c in enumerate(candidates):
        key = c.sha256 or json.dumps(c.leaf, sort_keys=True)
        if key in seen:
            raise OptionsError(f"candidate {c.label!r} is listed twice (as {candidates[seen[key]].label!r})")
        seen[key] = i


def uniform(candidates: Sequence[Candidate], picked: Sequence[int]) -> Any:
    """The uniform merge of the picked candidates (one: that model itself)."""
    leaves = [candidates[i].leaf for i in picked]
    return leaves[0] if len(leaves) == 1 else {"method": "uniform", "models": leaves}


def build_round(kind: str, selection: Selection, architecture: str, vae: Any | None) -> RoundSpec:
    """The round `kind` from the picks so far; `vae` (a leaf) is baked into every variant."""
    if kind not in ROUND_KINDS:
        raise OptionsError(f"unknown round kind {kind!r}; choose from {', '.join(ROUND_KINDS)}")
    cands = selection.candidates
    baked = {"vae": vae} if vae is not None else {}
    kept = selection.kept()
    if kind == "raw":
        everything = list(range(len(cands)))
        targets = [{"label": f"all {len(cands)}", "recipe": {"merge": uniform(cands, everything), "components": baked}}]
        targets += [{"label": cands[i].label, "recipe": {"merge": cands[i].leaf, "components": baked}}
                    for i in everything]
        return RoundSpec(kind, targets, None, [None, *everything], None)
    if kind == "text_encoder":
        base = {"merge": uniform(cands, kept), "components": baked}
        return RoundSpec(kind, [], {"kind": "text_encoder", "base": base, "candidates": kept}, list(kept), base)
    te = _text_encoders(selection, architecture)
    if kind == "unet":
        base = {"merge": uniform(cands, kept), "components": {**te, **baked}}
        return RoundSpec(kind, [], {"kind": "unet", "base": base, "candidates": kept}, list(kept), base)
    if kind == "leave_one_out":
        unets = selection.unets_before_leaving_out()
        if len(unets) < 2:
            raise OptionsError("leave_one_out needs at least 2 UNets picked (or kept) to leave one out of")
        base = {"merge": uniform(cands, kept),
                "components": {**te, **baked, "unet": {"method": "uniform", "models": [cands[i].leaf for i in unets]}}}
        return RoundSpec(kind, [], {"kind": "leave_one_out", "base": base, "at": "components.unet"},
                         [None, *unets], base)
    recipe = final_recipe(selection, architecture, vae)
    return RoundSpec(kind, [{"label": "final", "recipe": recipe}], None, [None], recipe)


def _text_encoders(selection: Selection, architecture: str) -> dict[str, Any]:
    merged = uniform(selection.candidates, selection.text_encoders())
    names = ("text_encoder", "text_encoder_2") if architecture == "sdxl" else ("text_encoder",)
    return {name: merged for name in names}


def final_recipe(selection: Selection, architecture: str, vae: Any | None, name: str | None = None) -> dict[str, Any]:
    """The picked UNets and text encoders, each merged uniformly, with the study's VAE."""
    unets = selection.unets()
    if not unets:
        raise OptionsError("every picked UNet was left out: pick UNets again, or leave fewer out")
    components = {**_text_encoders(selection, architecture), **({"vae": vae} if vae is not None else {})}
    recipe: dict[str, Any] = {"merge": uniform(selection.candidates, unets), "components": components}
    if name:
        recipe["name"] = name
    return recipe


def resolve_picks(kind: str, picks: Sequence[Any], columns: Sequence[int | None], candidates: Sequence[Candidate],
                  ids: Sequence[Any] = ()) -> list[int]:
    """Picks (candidate labels, or `ids` such as registry ids) -> candidate indexes, each one a
    column of the round; a clear error for anything else."""
    if kind == "final":
        raise OptionsError("the final round takes no picks: merge it")
    if not isinstance(picks, list) or (not picks and kind != "leave_one_out"):
        raise OptionsError(f"pick at least one candidate for the {kind} round (the {PICKED[kind]})")
    offered = [c for c in columns if c is not None]
    by_label = {candidates[i].label: i for i in offered}
    by_id = {ids[i]: i for i in offered} if ids else {}
    chosen: list[int] = []
    for pick in picks:
        index = by_id.get(pick) if not isinstance(pick, str) else by_label.get(pick)
        if index is None and isinstance(pick, str) and pick.isdigit() and ids:
            index = by_id.get(int(pick))
        if index is None:
            raise OptionsError(f"{pick!r} is not a candidate of this {kind} round; its columns are "
                               f"{', '.join(candidates[i].label for i in offered)}")
        if index not in chosen:
            chosen.append(index)
    if kind == "leave_one_out" and len(chosen) >= len(offered):
        raise OptionsError("leaving every UNet out leaves nothing to merge")
    return chosen


def provenance(study: dict[str, Any], rounds: Sequence[dict[str, Any]], selection: Selection) -> str:
    """The study behind a recipe, for the output's metadata (`sdmerge_study`): candidates, every
    round with its columns and picks, and what the final recipe took."""
    cands = selection.candidates

    def names(indexes: Sequence[int]) -> list[str]:
        return [cands[i].label for i in indexes]

    return json.dumps({
        **study,
        "candidates": [{"name": c.label, **({"sha256": c.sha256} if c.sha256 else {})} for c in cands],
        "rounds": [dict(r) for r in rounds],
        "selection": {"kept": names(selection.kept()), "text_encoders": names(selection.text_encoders()),
                      "unets": names(selection.unets()), "left_out": names(selection.picks.get("leave_one_out", []))},
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
