"""The OpenAPI document: every answer a client can get, documented with the shape it has.

FastAPI documents only the success answers and its own 422 (`HTTPValidationError`), while every
error this service gives is `{"error": {code, message, details}}` (app/errors.py). The statuses
that apply to whole classes of operations, because a middleware or the one error handler gives
them, are added here by rule; the ones particular to an operation are in its route's `responses`.
Recipe bodies are described by the engine's own recipe JSON Schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.auth import OPEN_PATHS
from app.schemas import ErrorOut
from merge_engine.recipe import Recipe, recipe_schema

ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
READS = frozenset({"get", "head"})
DESCRIPTIONS = {
    400: "malformed JSON, a bad parameter, or a value the database cannot hold", 401: "missing or wrong bearer token (when SDMERGE_API_TOKEN is set)",
    404: "no such row", 409: "conflicts with the state of what exists", 413: "request body too large",
    422: "invalid request: the message names the field at fault", 503: "the database is unavailable; retry",
    507: "no space left where the service writes",
}
A1111_METADATA = {
    "type": "object",
    "title": "A1111Metadata",
    "description": "A1111 merge metadata, as the WebUI's checkpoint merger writes it, converted to a recipe "
                   "with exact leaf weights; `resolve` maps a leaf's name or sha256 prefix to a model reference.",
    "properties": {
        "__metadata__": {"type": "object", "properties": {
            "sd_merge_recipe": {"anyOf": [{"type": "string"}, {"type": "object"}]},
            "sd_merge_models": {"anyOf": [{"type": "string"}, {"type": "object"}]}},
            "required": ["sd_merge_recipe"]},
        "resolve": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["__metadata__"],
}
IMPORTED_RECIPE = {
    "type": "object",
    "title": "ImportedRecipe",
    "description": "another tool's recipe, converted with exact weights (what cannot be converted exactly is a "
                   "422 naming the line, row or field): `mecha`, the text of an sd-mecha .mecha recipe; or "
                   "`supermerger_history`, the text of supermerger's mergehistory.csv, with `row` the merge's ID "
                   "(default: the last). A model supermerger saved is posted as its metadata "
                   "(`{\"__metadata__\": {...}}`, as A1111's). `resolve` maps a model reference (a .mecha path or "
                   "its file name) to a registered model.",
    "properties": {"mecha": {"type": "string"}, "supermerger_history": {"type": "string"},
                   "row": {"type": "integer"}, "resolve": {"type": "object", "additionalProperties": {"type": "string"}}},
}
RECIPE_BODY = {"required": True, "content": {"application/json": {"schema": {"anyOf": [
    {"$ref": "#/components/schemas/Recipe"}, {"$ref": "#/components/schemas/A1111Metadata"},
    {"$ref": "#/components/schemas/ImportedRecipe"}]}}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: these error statuses, in the error shape."""
    return {status: {"model": ErrorOut, "description": DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_component_schemas(ErrorOut))
    recipe = recipe_schema(ref_template="#/components/schemas/{model}")
    schemas.update({**recipe.pop("$defs"), Recipe.__name__: recipe})
    schemas["A1111Metadata"] = A1111_METADATA
    schemas["ImportedRecipe"] = IMPORTED_RECIPE
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    spec["components"]["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer", "description": "SDMERGE_API_TOKEN, where the service has one set"}}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            _complete(path, method, operation)
    return spec


def _component_schemas(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), model.__name__: schema}


def _complete(path: str, method: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    statuses = set()
    if path not in OPEN_PATHS:  # the token middleware; the database unavailable, or refusing a value
        statuses |= {400, 401, 503}
        operation["security"] = [{"bearer": []}, {}]  # a token is needed only where one is set
    if "{" in path:
        statuses |= {404, 422}
    if operation.get("parameters"):
        statuses.add(422)
    if "requestBody" in operation:
        statuses |= {400, 413, 422}
    if method not in READS and path not in OPEN_PATHS:
        statuses.add(507)
    for status in sorted(statuses):
        responses.setdefault(str(status), {"description": DESCRIPTIONS[status]})
    for status, response in responses.items():
        # FastAPI's own 422 included: our handler answers every error (a 416 is Starlette's text)
        if status.startswith(("4", "5")) and status != "416":
            response["content"] = {"application/json": {"schema": ERROR_REF}}
