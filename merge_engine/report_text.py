"""The CLI's text reports: a plan, an inspected file, hashes. `--json` prints the same dicts whole."""

from __future__ import annotations

import json
from typing import Any


def print_plan(summary: dict[str, Any]) -> None:
    print(f"recipe {summary['name'] or '(unnamed)'}  {summary['architecture']}  hash {summary['recipe_hash'][:12]}")
    for component, info in summary["components"].items():
        print(f"  {component}: {info['keys']} keys, {info['params']:,} params from")
        names = [i["name"] for i in summary["inputs"]]
        if "blocks" in info:
            _print_blocks(info["blocks"], names)
            continue
        if "evaluation" in info:
            print(f"    {_evaluation_text(info['evaluation'], names)}")
            continue
        for source in info["sources"]:
            print(f"    {source['weight']:+.6f}  {source['model']}  ({source['exact_weight']})")
    out = summary["output"]
    print(f"  output: {out['keys']} tensors, {out['bytes']:,} bytes, {out['dtype']}; reads {summary['bytes_to_read']:,} bytes")
    if spec := summary["modelspec"]:
        print(f"  modelspec: {spec['architecture']}, {spec.get('prediction_type', 'no prediction type')}, "
              f"title {spec['title']!r} (hash_sha256 sealed after writing)")
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")


def print_inspection(info: dict[str, Any]) -> None:
    if "lora" in info:
        lora = info["lora"]
        kinds = ", ".join(f"{v} {k}" for k, v in lora["kinds"].items())
        parts = ", ".join(f"{k} {v}" for k, v in lora["parts"].items())
        print(f"{info['file']}: LoRA for {lora['trained_for'] or 'an unstated architecture'}, {lora['modules']} modules "
              f"({kinds}; {parts}), {info['format']}, {info['size']:,} bytes")
    else:
        print(f"{info['file']}: {info['architecture'] or 'unknown family'} ({info['variant'] or 'no unet'}), "
              f"{info['format']}, {info['size']:,} bytes")
    for component, c in info["components"].items():
        dtypes = ", ".join(f"{k}x{v}" for k, v in c["dtypes"].items())
        layout = "published layout" if c["reference_layout"] else "custom shapes"
        print(f"  {component}: {c['keys']} keys, {c['params']:,} params, {dtypes}, {layout}")
    print(f"  other keys: {len(info['other_keys'])}, EMA keys: {info['ema_keys']}")
    for key, value in info["metadata"].items():
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"  metadata {key}: {text[:100]}{'…' if len(text) > 100 else ''}")
    if (lineage := info.get("lineage")) and (merge := lineage["merge"]):
        parents = ", ".join(f"{p['name'] or p['sha256'][:10]}" + (f" x{p['weight']}" if p["weight"] else "")
                            for p in merge["parents"][:8])
        more = f" and {len(merge['parents']) - 8} more" if len(merge["parents"]) > 8 else ""
        print(f"  merged ({merge['tool']}, {merge['method'] or 'unknown method'}) from {parents}{more}; "
              f"{len(lineage['ancestors'])} ancestors recorded")
    if hashes := info.get("hashes"):
        for name in ("sha256", "shorthash", "legacy", "autov3", "crc32", "blake3"):
            print(f"  {name}: {hashes[name]}")
        print(f"  civitai: {_civitai_text(hashes)}")
    if "hash_ok" in info.get("modelspec", {}):
        print("  modelspec hash_sha256: " + ("matches the data" if info["modelspec"]["hash_ok"]
                                            else "DOES NOT match the data (edited or corrupted)"))
    for warning in info["warnings"]:
        print(f"  warning: {warning}")


def print_hashes(results: dict[str, dict]) -> None:
    for path, h in results.items():
        print(f"{h['sha256']}  shorthash {h['shorthash']}  legacy {h['legacy']}  autov3 {h['autov3']}"
              f"  crc32 {h['crc32']}  blake3 {h['blake3']}  {path}")
        print(f"  civitai: {_civitai_text(h)}")


def _print_blocks(blocks: dict[str, Any], names: list[str]) -> None:
    """One line per distinct set of block values: what set them, how many keys, the evaluation."""
    for group in blocks["groups"]:
        values = ", ".join(f"{field.rsplit('.', 1)[-1]}={group['values'][field]:g} ({group['set_by'][field]})"
                           for field in blocks["fields"])
        if "evaluation" in group:
            how = _evaluation_text(group["evaluation"], names)
        else:
            how = " ".join(f"{s['weight']:+.6g}*{s['model']}" for s in group["sources"])
        print(f"    {values}: {group['keys']} keys  {how}")
    for override in (o for o in blocks["overrides"] if o["matched"]):
        print(f"    override {override['field'].rsplit('.', 1)[-1]}={override['value']:g} for {override['keys']}: "
              f"{override['matched']} keys")


def _evaluation_text(node: Any, names: list[str]) -> str:
    """A non-linear component's evaluation on one line: ties(k=0.2, …; base=a, models=[b, c])."""
    if isinstance(node, list):
        return "[" + ", ".join(_evaluation_text(n, names) for n in node) + "]"
    if not isinstance(node, dict):
        return "-" if node is None else str(node)
    if "input" in node:
        return names[node["input"]]
    if "sum" in node:
        return " + ".join(f"{t['weight']:.6g}*{_evaluation_text(t['of'], names)}" for t in node["sum"])
    inputs = {k: v for k, v in node.items() if k != "method" and (isinstance(v, list | dict) or v is None)}
    params = ", ".join(f"{k}={v}" for k, v in node.items() if k != "method" and k not in inputs)
    sources = "; ".join(f"{k}={_evaluation_text(v, names)}" for k, v in inputs.items() if v is not None)
    return f"{node['method']}({params}; {sources})"


def _civitai_text(hashes: dict) -> str:
    """The forms Civitai shows (and its search takes), SHA256 and BLAKE3 shortened to 12 here."""
    return "  ".join(f"{kind} {value if len(value) < 64 else value[:12] + '…'}"
                     for kind, value in hashes["civitai"].items())
