"""Another tool's recipe through the API: a .mecha text is converted, planned and merged, and is
the very merge its native recipe names (the service finds the same job, the same artifact)."""

from __future__ import annotations

MECHA = """version 0.1.0
model "/home/someone/models/sd2-1.safetensors" model_config="sd1-ldm" merge_space="weight"
model "/home/someone/models/sd2-2.safetensors" model_config="sd1-ldm" merge_space="weight"
dict key=0.25
literal &2 model_config="singleton-mecha" merge_space="param"
merge "convert_singleton" &3
merge "weighted_sum" &0 &1 &4"""


def test_a_mecha_text_merges_as_its_native_recipe(client, run_tasks, ready_model):
    a, b = ready_model("sd2-1.safetensors", "a"), ready_model("sd2-2.safetensors", "b")
    body = {"mecha": MECHA, "resolve": {"sd2-1.safetensors": "a", "sd2-2.safetensors": "b"}}
    response = client.post("/merges", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["recipe"]["merge"]["alpha"] == 0.25
    assert [job["recipe"]["merge"][x]["sha256"] for x in "ab"] == [a["sha256"], b["sha256"]]
    assert run_tasks() == ["sdmerge.merge"]
    done = client.get(f"/merges/{job['id']}").json()
    assert done["status"] == "succeeded", done
    native = client.post("/merges", json={"merge": {"method": "weighted_sum", "a": "a", "b": "b", "alpha": 0.25},
                                          "output": {"dtype": "fp16"}})
    assert native.status_code == 200 and native.json()["id"] == job["id"]
    assert native.json()["artifact"]["sha256"] == done["artifact"]["sha256"]

    refused = client.post("/merges", json={"mecha": MECHA.replace('"weighted_sum"', '"rotate"')})
    assert refused.status_code == 422
    assert "line 7 (merge): a method sdmerge cannot run exactly: 'rotate'" in refused.json()["error"]["message"]
    unknown = client.post("/merges/plan", json={"mecha": MECHA})  # no resolve: the paths name no registered model
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_model"
