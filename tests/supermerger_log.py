"""supermerger's history writer, as its source has it, for test fixtures: `record` appends a row
the way hako-mikan/sd-webui-supermerger's scripts/mergers/mergers.py does after each merge
(`rwmergelog`, then `overwrite_last_weights`, which rewrites the file with csv.writer), from the
`mergedmodel` list `smerge` builds. Kept to their logic line for line so the files are the format."""

from __future__ import annotations

import csv
import datetime
import json
import os
from pathlib import Path

HEADER = ('"ID","time","name","weights alpha","weights beta","model A","model B","model C","alpha","beta","mode",'
          '"use MBW","plus lora","custum name","save setting","use ID"\n')
MODE_INFO = {
    "Weight sum": "Weight sum:A*(1-alpha)+B*alpha",
    "Add difference": "Add difference:A+(B-C)*alpha",
    "Triple sum": "Triple sum:A*(1-alpha-beta)+B*alpha+C*beta",
    "sum Twice": "sum Twice:(A*(1-alpha)+B*alpha)*(1-beta)+C*beta",
}


def merged_model(*, weights_a: str = "", weights_b: str = "", hashes: tuple[str, str, str], alpha: float = 0.5,
                 beta: float = 0.25, mode: str = "Weight sum", useblocks: bool = False, custom_name: str = "",
                 save_sets: tuple[str, ...] = ("save model", "safetensors", "fp16"), deep: str = "",
                 calcmode: str = "normal", fine: str = "", inex: str = "Off", ex_blocks: tuple[str, ...] = (),
                 ex_elems: str = "") -> list:
    """smerge's `mergedmodel` list (mergers.py): weights as the user typed them (empty without MBW)."""
    if not useblocks:
        weights_a = weights_b = ""
    return [weights_a, weights_b, *hashes, alpha, beta, mode, useblocks, custom_name, list(save_sets), [], deep,
            calcmode, 0, fine, 0.3, inex, list(ex_blocks), ex_elems]


def record(path: Path, merged: list, name: str = "merged") -> int:
    """rwmergelog(name, merged) then overwrite_last_weights(weights as merged), as smerge calls them."""
    setting = merged.copy()
    if len(setting) > 7 and setting[7] in MODE_INFO:
        setting[7] = MODE_INFO[setting[7]]
    if not os.path.isfile(path):
        with open(path, "a") as f:
            f.writelines(HEADER)
    with open(path, "r+") as f:
        mlist = list(csv.reader(f))
        mergeid = len(mlist)
        setting.insert(0, name)
        for i, x in enumerate(setting):
            if "," in str(x) or "\n" in str(x):
                setting[i] = f'"{setting[i]}"'
        text = ",".join(map(str, setting))
        text = str(mergeid) + "," + datetime.datetime(2025, 3, 1, 12, 0, mergeid).strftime("%Y.%m.%d %H.%M.%S.%f")[:-7] \
            + "," + text + "\n"
        f.writelines(text)
    useblocks, usebeta = merged[8], "Triple" in merged[7] or "Twice" in merged[7]
    excluded_a = [float(w) for w in merged[0].split(",")] if useblocks else [None] * 110
    excluded_b = [float(w) for w in merged[1].split(",")] if useblocks and usebeta else [None] * 110
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[-1][3] = ",".join(str(x) for x in excluded_a if x is not None)
    rows[-1][4] = ",".join(str(x) for x in excluded_b if x is not None)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return mergeid


def saved_metadata(*, models: dict[str, tuple[str, str]], weights_a: list[float] | None, base_alpha: float,
                   base_beta: float = 0.25, weights_b: list[float] | str | None = "", mode: str = "Weight sum",
                   calcmode: str = "normal", deep: str | list = "", inex: str = "Off") -> dict:
    """The metadata `smerge` gives a model it saves (mergers.py, "always set metadata"): `models`
    maps model_a/_b/_c to (sha256, name); the weights are the lists merged, BASE apart."""
    useblocks = weights_a is not None
    names = {role: sha for role, (sha, _) in models.items()}
    merge_recipe = {
        "type": "sd-webui-supermerger",
        "weights_alpha": weights_a if useblocks else None,
        "weights_beta": weights_b if useblocks else None,
        "weights_alpha_orig": ",".join(str(x) for x in [base_alpha, *weights_a]) if useblocks else None,
        "weights_beta_orig": "" if useblocks else None,
        "model_a": names["model_a"], "model_b": names["model_b"], "model_c": names.get("model_c", names["model_a"]),
        "base_alpha": base_alpha, "base_beta": base_beta, "mode": mode, "mbw": useblocks,
        "elemental_merge": deep, "calcmode": calcmode, f"{inex}": [] + [""],
    }
    sd_merge_models = {sha: {"name": name, "legacy_hash": sha[:8]} for sha, name in models.values()}
    return {"__metadata__": {"format": "pt", "sd_merge_recipe": json.dumps(merge_recipe),
                             "sd_merge_models": json.dumps(sd_merge_models)}}
