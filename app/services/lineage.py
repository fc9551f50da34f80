"""A model's lineage graph: what it was merged from, and what those were merged from, as far as
the recorded recipes say.

Each file's own claim (merge_engine.lineage: its merge with weighted parents, and the ancestors'
merges carried forward in `sd_merge_models`) was read once, when the model was hashed or the
merge output (artifact) stored: the `lineage` columns. Rows from before those columns (migration
0006) are read from their stored metadata. Nodes are files, named by sha256 (a parent recorded only by name is `name:<name>`). The
walk is breadth-first from the model; at each node the best source of its merge wins: a
registered model's own file, then an artifact's, then what a descendant carried forward.

Files are claims, and a hostile one may claim anything: a node is visited once (a cycle is an
edge back to a node already seen, and `cyclic` says so), and the walk stops at `MAX_NODES` nodes,
`MAX_EDGES` edges or the depth asked (`truncated` says so). Nothing here reads a model file.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Artifact, Model
from app.services.registry import get_model, require_ready
from merge_engine.lineage import recorded_lineage

MAX_DEPTH = 64
MAX_NODES = 500
MAX_EDGES = 5_000
MAX_CARRIED = 20_000  # ancestor entries gathered from all the files read in one walk


def model_lineage(session: Session, model_id: int, depth: int = MAX_DEPTH) -> dict[str, Any]:
    model = require_ready(get_model(session, model_id), str(model_id))
    walk = _Walk(session)
    root = walk.add(model.sha256, model.name, 0)
    walk.nodes[root]["model_id"], walk.nodes[root]["model_name"] = model.id, model.name
    frontier, level = [root], 0
    while frontier:
        frontier = walk.visit(frontier, expand=level < depth)
        level += 1
    return {"model_id": model.id, "root": root, "nodes": list(walk.nodes.values()), "edges": walk.edges,
            "cyclic": _cyclic(walk.nodes, walk.edges), "truncated": walk.truncated,
            "limits": {"max_depth": depth, "max_nodes": MAX_NODES, "max_edges": MAX_EDGES}}


class _Walk:
    def __init__(self, session: Session):
        self.session = session
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: list[dict[str, Any]] = []
        self.carried: dict[str, dict[str, Any]] = {}
        self.truncated = False

    def add(self, sha256: str | None, name: str | None, depth: int) -> str:
        key = sha256 or f"name:{name}"
        self.nodes[key] = {"id": key, "sha256": sha256, "name": name, "depth": depth, "model_id": None,
                           "model_name": None, "artifact_id": None, "merge": None, "merge_from": None}
        return key

    def visit(self, keys: list[str], expand: bool) -> list[str]:
        """Fill in one level's nodes (two queries for the whole level); the next level's keys."""
        shas = [self.nodes[k]["sha256"] for k in keys if self.nodes[k]["sha256"]]
        models = _first_by_sha(self.session.scalars(
            select(Model).where(Model.sha256.in_(shas), Model.status == "ready").order_by(Model.id)))
        artifacts = _first_by_sha(self.session.scalars(select(Artifact).where(Artifact.sha256.in_(shas))))
        found = []
        for key in keys:
            node = self.nodes[key]
            model, artifact = models.get(node["sha256"]), artifacts.get(node["sha256"])
            if model is not None and node["model_id"] is None:
                node["model_id"], node["model_name"] = model.id, model.name
                node["name"] = node["name"] or model.name
            if artifact is not None:
                node["artifact_id"], node["name"] = artifact.id, node["name"] or artifact.filename
            merge = self._merge(node, model, artifact)
            if merge is None or not merge["parents"]:
                continue
            if not expand:
                self.truncated = True
                continue
            found += self._parents(key, merge["parents"], node["depth"] + 1)
        return found

    def _merge(self, node: dict[str, Any], model: Model | None, artifact: Artifact | None) -> dict[str, Any] | None:
        own, source = None, None
        if model is not None:
            own, source = model.lineage or recorded_lineage(model.header_metadata or {}), "model"
        if own is None and artifact is not None:
            own, source = artifact.lineage or recorded_lineage(artifact.header_metadata or {}), "artifact"
        if own is not None:
            self.truncated |= bool(own.get("truncated"))
            for sha256, entry in own.get("ancestors", {}).items():
                if len(self.carried) >= MAX_CARRIED:
                    self.truncated = True
                    break
                self.carried.setdefault(sha256, entry)
        carried = self.carried.get(node["sha256"] or "")
        if carried is not None:
            node["name"] = node["name"] or carried.get("name")
        merge = own.get("merge") if own is not None else None
        if merge is None and carried is not None and carried.get("merge") is not None:
            merge, source = carried["merge"], "carried"
        if merge is not None:
            node["merge"] = {k: merge.get(k) for k in ("tool", "method", "name", "recipe_hash")}
            node["merge_from"] = source
        return merge

    def _parents(self, child: str, parents: Iterable[dict[str, Any]], depth: int) -> list[str]:
        new = []
        for parent in parents:
            if not parent.get("sha256") and not parent.get("name"):
                continue
            key = parent.get("sha256") or f"name:{parent['name']}"
            if key not in self.nodes:
                if len(self.nodes) >= MAX_NODES:
                    self.truncated = True
                    continue
                new.append(self.add(parent.get("sha256"), parent.get("name"), depth))
            if len(self.edges) >= MAX_EDGES:
                self.truncated = True
                break
            weight = parent.get("weight")
            self.edges.append({"parent": key, "child": child, "weight_exact": weight,
                               "weight": float(Fraction(weight)) if weight is not None else None,
                               "components": parent.get("components")})
        return new


def _first_by_sha(rows: Iterable[Any]) -> dict[str, Any]:
    first: dict[str, Any] = {}
    for row in rows:
        first.setdefault(row.sha256, row)
    return first


def _cyclic(nodes: dict[str, dict[str, Any]], edges: list[dict[str, Any]]) -> bool:
    """Whether some file is recorded as its own ancestor (iterative three-colour DFS)."""
    parents: dict[str, list[str]] = {key: [] for key in nodes}
    for edge in edges:
        parents[edge["child"]].append(edge["parent"])
    state = dict.fromkeys(nodes, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in nodes:
        if state[start]:
            continue
        stack = [(start, iter(parents[start]))]
        state[start] = 1
        while stack:
            key, rest = stack[-1]
            step = next(rest, None)
            if step is None:
                state[key] = 2
                stack.pop()
            elif state[step] == 1:
                return True
            elif state[step] == 0:
                state[step] = 1
                stack.append((step, iter(parents[step])))
    return False
