"""Provenance through the service: a model overwritten in place after it was hashed (even with its
mtime set back) never yields a succeeded artifact; the attempt fails naming it, the model is
hashed again, and a resubmission merges the new bytes. Poisoned metadata still ends in a state."""

from __future__ import annotations

import hashlib
import json
import os

from merge_engine.synthetic import tiny_state_dict, write_checkpoint
from tests.service.conftest import data_files


def overwrite_in_place(path, keep_mtime: bool) -> None:
    before = path.stat()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x55" * 4096, before.st_size - 8192)  # inside the last tensors' data
    finally:
        os.close(fd)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_input_rewritten_after_hashing_fails_the_merge_and_is_rehashed(client, run_tasks, ready_model,
                                                                          model_root, settings):
    own = model_root / "own.safetensors"  # a file of this test's own: the others are shared hard links
    write_checkpoint(own, tiny_state_dict("sd2", seed=7))
    a, b = ready_model("sd2-1.safetensors", "a"), ready_model("own.safetensors", "b")
    body = {"merge": {"method": "uniform", "models": ["a", "b"]}}
    job = client.post("/merges", json=body).json()
    overwrite_in_place(own, keep_mtime=True)  # the registry's size and mtime still match

    ran = run_tasks()
    assert ran == ["sdmerge.merge", "sdmerge.hash_model"], ran
    failed = client.get(f"/merges/{job['id']}").json()
    assert failed["status"] == "failed" and failed["artifact"] is None
    assert failed["error"]["code"] == "input_changed", failed["error"]
    assert "own.safetensors" in failed["error"]["message"] or failed["error"]["details"].get("model") == "b"
    rehashed = client.get(f"/models/{b['id']}").json()
    assert rehashed["status"] == "ready"
    assert rehashed["sha256"] == hashlib.sha256(own.read_bytes()).hexdigest() != b["sha256"]
    assert data_files(settings) == []  # no artifact, no partial file

    again = client.post("/merges", json=body)
    assert again.status_code == 202 and again.json()["id"] != job["id"]
    run_tasks()
    done = client.get(f"/merges/{again.json()['id']}").json()
    assert done["status"] == "succeeded", done
    inputs = json.loads(client.get(f"/artifacts/{done['artifact']['id']}/metadata").json()["sdmerge_inputs"])
    assert [i["sha256"] for i in inputs] == [a["sha256"], rehashed["sha256"]]


def test_a_model_with_poisoned_metadata_is_hashed(client, run_tasks, model_root):
    poison = {"deep": "[" * 20_000 + "]" * 20_000, "digits": "[" + "7" * 5000 + "]",
              "huge": "x" * (2 << 20), "sd_merge_recipe": "{" * 50_000}
    write_checkpoint(model_root / "poison.safetensors", tiny_state_dict("sd2", seed=3), poison)
    created = client.post("/models", json={"path": "poison.safetensors"})
    assert created.status_code == 201, created.text
    run_tasks()
    model = client.get(f"/models/{created.json()['id']}").json()
    assert model["status"] == "ready", model
    assert model["metadata"]["deep"] == poison["deep"] and model["metadata"]["digits"] == poison["digits"]
    assert model["metadata"]["huge"].startswith("<") and "not stored" in model["metadata"]["huge"]
