"""`sdmerge demo DIR`: tiny SD2-shaped models, an example recipe, and their merge, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RecipeError

RECIPE = {
    "name": "demo-mix",
    "merge": {"method": "uniform", "models": [
        "models/demo-a.safetensors", "models/demo-b.safetensors", "models/demo-c.safetensors",
    ]},
    "components": {
        "text_encoder": {"method": "weighted", "models": [
            {"model": "models/demo-a.safetensors", "weight": 2}, "models/demo-b.safetensors",
        ]},
    },
    "output": {"dtype": "fp16"},
}


def run_demo(folder: Path) -> Path:
    from .execute import merge
    from .plan import plan
    from .recipe import parse_recipe
    from .resolve import FileResolver
    from .synthetic import tiny_state_dict, write_checkpoint

    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RecipeError(f"{folder} exists and is not an empty folder")
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for seed, letter in enumerate("abc", start=1):
        path = folder / "models" / f"demo-{letter}.safetensors"
        write_checkpoint(path, tiny_state_dict("sd2", seed=seed))
        print(f"wrote {path} (tiny SD2-shaped checkpoint, real key names)")
    recipe_path = folder / "recipe.json"
    recipe_path.write_text(json.dumps(RECIPE, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {recipe_path}")
    merge_plan = plan(parse_recipe(RECIPE), FileResolver(folder))
    try:
        output = folder / "out" / "demo-mix.safetensors"
        result = merge(merge_plan, output)
    finally:
        merge_plan.close()
    for component, info in merge_plan.to_dict()["components"].items():
        weights = ", ".join(f"{s['model']} x {s['exact_weight']}" for s in info["sources"])
        print(f"  {component}: {weights}")
    print(f"merged into {result.path} ({result.size:,} bytes, {len(merge_plan.keys)} tensors)")
    print(f"next: sdmerge inspect {result.path}   |   sdmerge plan {recipe_path}")
    return result.path
