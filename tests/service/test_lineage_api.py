"""The registry's Civitai hashes (stored, shown, found by any of them) and a model's lineage
graph from recorded recipes: a chain of merges through the service, A1111's carried lineage, and
a hostile file whose recorded lineage loops and never ends."""

from __future__ import annotations

import hashlib
import json
import zlib

import blake3

from app.models import Artifact, Model
from app.services.lineage import MAX_NODES
from merge_engine.synthetic import tiny_state_dict, write_checkpoint


def merged(client, run_tasks, body: dict) -> dict:
    response = client.post("/merges", json=body)
    assert response.status_code == 202, response.text
    run_tasks()
    job = client.get(f"/merges/{response.json()['id']}").json()
    assert job["status"] == "succeeded", job
    return job["artifact"]


def publish(client, artifact: dict, path) -> None:
    """Put a merge output where a model root sees it, as a user who downloaded it would."""
    path.write_bytes(client.get(artifact["url"]).content)


def test_hashes_are_stored_shown_and_each_finds_the_model(client, ready_model, model_root):
    model = ready_model("sd2-1.safetensors", "a")
    ready_model("sd2-2.safetensors", "b")
    raw = (model_root / "sd2-1.safetensors").read_bytes()
    assert model["crc32"] == f"{zlib.crc32(raw):08x}" and model["blake3"] == blake3.blake3(raw).hexdigest()
    assert model["autov3"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    shown = model["civitai"]
    assert shown == {"AutoV1": model["legacy_hash"].upper(), "AutoV2": model["sha256"][:10].upper(),
                     "AutoV3": model["autov3"][:12].upper(), "SHA256": model["sha256"].upper(),
                     "CRC32": model["crc32"].upper(), "BLAKE3": model["blake3"].upper()}
    pasted = [*shown.values(), model["sha256"][:16], model["blake3"][:10], f"crc32:{model['crc32']}",
              f"AutoV1:{shown['AutoV1']}", f"autov3:{model['autov3']}", f" {shown['AutoV2']} "]
    for text in pasted:
        found = client.get("/models", params={"hash": text})
        assert found.status_code == 200, (text, found.text)
        assert [m["id"] for m in found.json()["items"]] == [model["id"]], text
    assert client.get("/models", params={"hash": "0" * 10}).json()["items"] == []
    for bad in ("xyz12345", "1234567", "123456789", "a" * 65, "md5:" + "a" * 32, "autov3:12345678"):
        answer = client.get("/models", params={"hash": bad})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request", (bad, answer.text)


def test_a_hash_two_files_share_is_a_409_naming_both(client, ready_model, runtime):
    a, b = ready_model("sd2-1.safetensors", "a"), ready_model("sd2-2.safetensors", "b")
    with runtime.sessions.begin() as session:  # the state an 8-digit collision leaves: b's CRC32 is a's AutoV1
        session.get(Model, b["id"]).crc32 = a["legacy_hash"]
    answer = client.get("/models", params={"hash": a["legacy_hash"]})
    assert answer.status_code == 409, answer.text
    assert {m["id"] for m in answer.json()["error"]["details"]["matches"]} == {a["id"], b["id"]}
    assert [m["id"] for m in client.get("/models", params={"hash": f"autov1:{a['legacy_hash']}"}).json()["items"]] \
        == [a["id"]]


def test_a_model_hashed_before_crc32_and_blake3_gets_them_when_registered_again(client, ready_model, runtime,
                                                                              run_tasks):
    a = ready_model("sd2-1.safetensors", "a")
    with runtime.sessions.begin() as session:  # as migration 0006 leaves an older row
        session.get(Model, a["id"]).crc32 = session.get(Model, a["id"]).blake3 = None
    assert client.get(f"/models/{a['id']}").json()["blake3"] is None
    again = client.post("/models", json={"path": "sd2-1.safetensors"})
    assert again.status_code == 200 and again.json()["status"] == "hashing"
    assert run_tasks() == ["sdmerge.hash_model"]
    assert client.get(f"/models/{a['id']}").json()["blake3"] == a["blake3"]


def test_lineage_of_a_chain_of_merges(client, ready_model, run_tasks, model_root, runtime):
    a, b, c = (ready_model(f"sd2-{i}.safetensors", n) for i, n in ((1, "a"), (2, "b"), (3, "c")))
    m1_out = merged(client, run_tasks, {"name": "m1", "merge": {"method": "uniform", "models": ["a", "b"]}})
    publish(client, m1_out, model_root / "m1.safetensors")
    m1 = ready_model("m1.safetensors", "m1")
    body = {"name": "m2", "merge": {"method": "weighted", "normalize": False, "models": [
        {"model": "m1", "weight": 0.75}, {"model": "c", "weight": 0.25}]}}
    m2_out = merged(client, run_tasks, body)
    publish(client, m2_out, model_root / "m2.safetensors")
    m2 = ready_model("m2.safetensors", "m2")

    graph = client.get(f"/models/{m2['id']}/lineage").json()
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert graph["root"] == m2["sha256"] and not graph["cyclic"] and not graph["truncated"]
    assert set(nodes) == {m["sha256"] for m in (m2, m1, a, b, c)}
    root = nodes[m2["sha256"]]
    assert (root["model_id"], root["artifact_id"], root["depth"]) == (m2["id"], m2_out["id"], 0)
    assert root["merge"]["method"] == "weighted" and root["merge"]["name"] == "m2"
    assert nodes[m1["sha256"]]["merge_from"] == "model" and nodes[m1["sha256"]]["merge"]["method"] == "uniform"
    assert [(nodes[x["sha256"]]["model_id"], nodes[x["sha256"]]["model_name"]) for x in (a, b, c)] == [
        (a["id"], "a"), (b["id"], "b"), (c["id"], "c")]
    assert nodes[a["sha256"]]["name"] == "sd2-1.safetensors"  # as m1's recipe records it
    assert all(nodes[x["sha256"]]["merge"] is None and nodes[x["sha256"]]["depth"] == d
               for x, d in ((a, 2), (b, 2), (c, 1)))
    edges = {(e["parent"], e["child"]): (e["weight_exact"], e["weight"]) for e in graph["edges"]}
    assert edges == {(m1["sha256"], m2["sha256"]): ("3/4", 0.75), (c["sha256"], m2["sha256"]): ("1/4", 0.25),
                     (a["sha256"], m1["sha256"]): ("1/2", 0.5), (b["sha256"], m1["sha256"]): ("1/2", 0.5)}

    # a row hashed before migration 0006 has no lineage column: its stored metadata serves
    with runtime.sessions.begin() as session:
        session.get(Model, m2["id"]).lineage = None
    assert client.get(f"/models/{m2['id']}/lineage").json() == graph

    # m1 no longer registered: the service's own artifact row still says how it was made
    assert client.delete(f"/models/{m1['id']}").status_code == 204
    graph = client.get(f"/models/{m2['id']}/lineage").json()
    m1_node = next(n for n in graph["nodes"] if n["sha256"] == m1["sha256"])
    assert (m1_node["model_id"], m1_node["artifact_id"], m1_node["merge_from"]) == (None, m1_out["id"], "artifact")
    assert len(graph["edges"]) == 4
    with runtime.sessions.begin() as session:  # stored with the artifact; an older row's metadata serves
        artifact = session.get(Artifact, m1_out["id"])
        assert artifact.lineage["merge"]["method"] == "uniform"
        artifact.lineage = None
    assert client.get(f"/models/{m2['id']}/lineage").json() == graph
    assert len(client.get(f"/models/{m2['id']}/lineage", params={"depth": 1}).json()["edges"]) == 2

    leaf = client.get(f"/models/{a['id']}/lineage").json()
    assert [n["id"] for n in leaf["nodes"]] == [a["sha256"]] and leaf["edges"] == []


def test_lineage_errors(client, run_tasks):
    missing = client.get("/models/999999/lineage")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/models/x/lineage").status_code == 422
    hashing = client.post("/models", json={"path": "sd2-1.safetensors"}).json()
    assert client.get(f"/models/{hashing['id']}/lineage").status_code == 409
    run_tasks()
    assert client.get(f"/models/{hashing['id']}/lineage", params={"depth": 0}).status_code == 422


def webui(primary: str, secondary: str | None = None, m: float = 0.5) -> dict:
    return {"type": "webui", "primary_model_hash": primary, "secondary_model_hash": secondary,
            "tertiary_model_hash": None, "interp_method": "Weighted sum" if secondary else "No interpolation",
            "multiplier": m, "custom_name": "x"}


def test_a1111_lineage_carried_forward_is_walked(client, ready_model, model_root):
    a = ready_model("sd2-1.safetensors", "a")
    x, unknown = "e" * 64, "d" * 64
    metadata = {"sd_merge_recipe": json.dumps(webui(x, a["sha256"], 0.25)),
                "sd_merge_models": json.dumps({x: {"name": "x.safetensors", "legacy_hash": "00000000",
                                                   "sd_merge_recipe": webui(unknown, a["sha256"], 0.5)},
                                               a["sha256"]: {"name": "sd2-1.safetensors"},
                                               unknown: {"name": "old.ckpt"}})}
    write_checkpoint(model_root / "webui.safetensors", tiny_state_dict("sd2", seed=5), metadata)
    top = ready_model("webui.safetensors", "top")
    graph = client.get(f"/models/{top['id']}/lineage").json()
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes[x]["merge_from"] == "carried" and nodes[x]["name"] == "x.safetensors"
    assert nodes[unknown]["name"] == "old.ckpt" and nodes[unknown]["model_id"] is None
    assert nodes[a["sha256"]]["model_id"] == a["id"]
    edges = {(e["parent"], e["child"]): e["weight_exact"] for e in graph["edges"]}
    assert edges == {(x, top["sha256"]): "3/4", (a["sha256"], top["sha256"]): "1/4",
                     (unknown, x): "1/2", (a["sha256"], x): "1/2"}


def test_a_hostile_looping_endless_lineage_is_cut(client, ready_model, model_root):
    """x and y each claim the other as parent, and a chain of 3,000 ancestors hangs off y: the
    answer comes at once, flags the cycle and the cut, and stays within the node limit."""
    x, y = "a" * 64, "b" * 64
    chain = [f"{i:064x}" for i in range(1, 3001)]
    models = {x: {"name": "x", "sd_merge_recipe": webui(y)}, y: {"name": "y", "sd_merge_recipe": webui(x, chain[0])}}
    models |= {h: {"name": f"c{i}", "sd_merge_recipe": webui(chain[i + 1] if i + 1 < len(chain) else x)}
               for i, h in enumerate(chain)}
    metadata = {"sd_merge_recipe": json.dumps(webui(x, y)), "sd_merge_models": json.dumps(models)}
    write_checkpoint(model_root / "loop.safetensors", tiny_state_dict("sd2", seed=6), metadata)
    loop = ready_model("loop.safetensors", "loop")
    graph = client.get(f"/models/{loop['id']}/lineage").json()
    assert graph["cyclic"] and graph["truncated"]
    assert len(graph["nodes"]) <= MAX_NODES and {x, y} <= {n["id"] for n in graph["nodes"]}
    assert client.get(f"/models/{loop['id']}/lineage", params={"depth": 3}).json()["truncated"]
