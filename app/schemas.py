"""What the API accepts and answers, apart from recipes (the engine's `Recipe` is the body)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_serializer

from merge_engine.hashing import civitai_forms

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("*", when_used="json")
    def _utc(self, value: Any) -> Any:
        # Rows hold naive UTC; say so on the wire.
        return value.isoformat() + "Z" if isinstance(value, datetime) else value


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable code, e.g. invalid_recipe, unknown_model, not_found")
    message: str = Field(description="what is wrong, naming the model, component and key at fault")
    details: dict[str, Any] = Field(description="the model, component and key, and more where known")


class ErrorOut(BaseModel):
    """Every error answer, whatever its status."""

    error: ErrorDetail


class ReadyOut(BaseModel):
    status: str = Field(description="ready or not ready")
    checks: dict[str, str] = Field(description="database, broker, disk: ok or the error")
    disk: dict[str, Any] = Field(description="free_bytes, total_bytes and min_free_bytes of the data dir")


class BrokerStatusOut(BaseModel):
    status: str = Field(description="ok, or the error the broker answered with")
    queues: dict[str, int] = Field(description="messages waiting per queue (merge, hash, preview)")


class WorkerOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    hostname: str
    pid: int
    queues: list[str]
    device: str
    started_at: float = Field(description="Unix time")
    beat_at: float = Field(description="Unix time of the last heartbeat (every 5 s)")
    age_seconds: float
    alive: bool = Field(description="heard of within 30 s")
    running: dict[str, Any] | None = Field(description="the kind and id of the work it runs, if any")


class RunningOut(BaseModel):
    kind: str = Field(description="merge, analysis or preview")
    id: int
    name: str | None
    attempts: int
    started_at: str | None
    running_seconds: float | None
    heartbeat_age_seconds: float = Field(description="seconds since its worker last renewed the lease")
    lease_expired: bool
    progress: dict[str, Any] | None


class FailureOut(BaseModel):
    kind: str
    id: int
    name: str | None
    finished_at: str | None
    error: dict[str, Any]


class StatusOut(BaseModel):
    time: str
    broker: BrokerStatusOut
    workers: list[WorkerOut]
    work: dict[str, dict[str, int]] = Field(description="rows per kind (merge, analysis, preview, model) and status")
    running: list[RunningOut]
    recent_failures: list[FailureOut]
    disk: dict[str, Any]


class RegisterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="relative to a model root, or absolute inside one")
    name: str | None = Field(default=None, description="defaults to the file name")


class ModelOut(_Out):
    id: int
    name: str
    path: str
    size: int
    mtime_ns: int
    status: str
    error: str | None
    architecture: str | None
    components: dict[str, Any] | None
    metadata: dict[str, Any] | None = Field(validation_alias="header_metadata")
    sha256: str | None = Field(description="of the whole file: A1111's hash (its first 10 digits are the "
                                           "\"Model hash\" of generation parameters) and Civitai's AutoV2")
    autov3: str | None = Field(description="sha256 of the tensor data after the safetensors header (Civitai's "
                                           "AutoV3): survives metadata edits")
    legacy_hash: str | None = Field(description="A1111's old 8-digit hash (Civitai's AutoV1)")
    crc32: str | None = Field(description="CRC-32 of the whole file, 8 hex digits (null: hashed before sdmerge knew "
                                          "it; registering the path again fills it in)")
    blake3: str | None = Field(description="BLAKE3 of the whole file (null: as crc32)")
    created_at: datetime
    updated_at: datetime

    @computed_field(description="the hashes as Civitai shows them: upper case, AutoV1 8 digits, AutoV2 10, "
                                "AutoV3 12, CRC32 8, SHA256 and BLAKE3 in full; any finds the model "
                                "(GET /models?hash=)")
    @property
    def civitai(self) -> dict[str, str]:
        return civitai_forms(self.sha256, self.legacy_hash, self.autov3, self.crc32, self.blake3)


class LineageMerge(BaseModel):
    tool: str | None = Field(description="sdmerge or webui (A1111's Checkpoint Merger)")
    method: str | None = Field(description="the merge's method (sdmerge) or interp_method (A1111)")
    name: str | None = Field(description="the recipe's name or A1111's custom_name")
    recipe_hash: str | None


class LineageNode(BaseModel):
    id: str = Field(description="the node's sha256, or name:<file name> for a parent recorded by name only")
    sha256: str | None
    name: str | None = Field(description="the file name its child's recipe records (else the registry's)")
    depth: int = Field(description="merges between it and the model (0: the model itself)")
    model_id: int | None = Field(description="the registered model with this sha256, if any")
    model_name: str | None = Field(description="its name in the registry")
    artifact_id: int | None = Field(description="the merge output of this service with this sha256, if any")
    merge: LineageMerge | None = Field(description="how this file was made, if a recorded recipe says")
    merge_from: str | None = Field(description="whose record says so: model (its own file), artifact, or carried "
                                               "(a descendant's sd_merge_models)")


class LineageEdge(BaseModel):
    parent: str = Field(description="a node id")
    child: str = Field(description="a node id: the merge that took `parent` in")
    weight: float | None = Field(description="the parent's coefficient in the flattened merge; null where the merge "
                                             "is not a weighted sum (a non-linear method, block weights)")
    weight_exact: str | None = Field(description="the same, exact (\"1/3\")")
    components: dict[str, str | None] | None = Field(description="the parent's weight in each component the "
                                                                 "recipe names")


class LineageOut(BaseModel):
    model_id: int
    root: str = Field(description="the model's node id")
    nodes: list[LineageNode]
    edges: list[LineageEdge] = Field(description="parent -> child, one per recorded input of a merge")
    cyclic: bool = Field(description="some file is recorded as its own ancestor (a hostile or edited file)")
    truncated: bool = Field(description="the walk stopped at a limit, or a file's record was cut")
    limits: dict[str, int] = Field(description="max_depth, max_nodes and max_edges of the walk")


class ScanOut(BaseModel):
    registered: list[ModelOut]
    skipped: list[dict[str, Any]]


class ArtifactOut(_Out):
    id: int
    sha256: str
    size: int
    filename: str
    created_at: datetime

    @computed_field
    @property
    def url(self) -> str:
        return f"/artifacts/{self.id}"


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None = Field(description="cursor for the next page, or null at the end")


class LeasedOut(_Out):
    """What every kind of leased work shows: analyses and previews (merge jobs: `JobOut`)."""

    id: int
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    progress: dict[str, Any] | None
    error: dict[str, Any] | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobOut(LeasedOut):
    """A merge job: the leased-work fields, then the recipe and its output."""

    name: str | None
    recipe: dict[str, Any]
    recipe_hash: str
    architecture: str | None
    output_size: int | None
    shards: int | None = Field(description="the shards the merge runs in across workers (asked for with "
                                           "`\"shards\": k` in the body, or from the settings); null: one task")
    artifact: ArtifactOut | None


class AnalysisOut(LeasedOut):
    models: list[dict[str, Any]] = Field(description="{id, name, sha256} of each model, in request order")
    base: dict[str, Any] | None
    components: list[str]
    metrics: list[str]
    architecture: str | None
    files: dict[str, Any] | None = Field(description="once succeeded: heatmap and map URLs per component")
    result: dict[str, Any] | None = Field(
        description="once succeeded, in GET /analyses/{id}: the report (analysis.json): per component "
                    "the N x N matrices of each metric, norms, outliers, identical groups, UNet blocks")


class PreviewImageOut(BaseModel):
    index: int
    url: str
    target_index: int
    topic_index: int = 0
    prompt_index: int
    seed: int
    infotext: str = Field(description="A1111 generation parameters, also in the PNG's `parameters` text chunk")


class PreviewOut(LeasedOut):
    targets: list[dict[str, Any]] = Field(description="label (the grid's column header), model_name, source "
                                                      "and the canonical recipe of each target")
    sampling: dict[str, Any] = Field(description="the first topic's sampling")
    topics: list[dict[str, Any]] = Field(description="each topic's sampling (one: the request's own)")
    grid_rows: list[str] | None = Field(default=None, description="an XY sweep's row headers (targets are its "
                                                                  "table, row by row)")
    grid: str | None = Field(description="once succeeded, the grid's URL (null for a single image)")
    images: list[PreviewImageOut] = Field(description="once succeeded; in order target, topic, prompt, seed")
    seconds: float | None = None


class StudyColumnOut(BaseModel):
    label: str = Field(description="the grid column's header")
    candidate: str | None = Field(description="the candidate the column shows (null: not one candidate, e.g. all N)")


class StudyRoundOut(_Out):
    study: int
    number: int
    kind: str = Field(description="raw | text_encoder | unet | leave_one_out | final")
    preview: int | None = Field(description="the preview that samples the round (GET /previews/{id})")
    status: str = Field(description="the preview's status (deleted if it was removed)")
    grid: str | None = Field(description="once succeeded, the grid's URL: one column per candidate")
    columns: list[StudyColumnOut]
    base: dict[str, Any] | None = Field(description="the recipe the round varies")
    picks: list[str] | None = Field(description="the candidates picked (leave_one_out: those left out)")
    picked_at: datetime | None
    created_at: datetime


class StudyOut(_Out):
    id: int
    name: str | None
    architecture: str | None
    candidates: list[dict[str, Any]] = Field(description="{id, name, sha256} of each candidate")
    vae: dict[str, Any] | None = Field(description="the model whose VAE is baked in, if any")
    settings: dict[str, Any] = Field(description="the preview settings and topics every round samples with")
    rounds: list[StudyRoundOut]
    selection: dict[str, list[str]] = Field(description="kept, text_encoders, unets and left_out, from the picks")
    final_recipe: dict[str, Any] | None = Field(description="the recipe of the picks so far")
    merge: int | None = Field(description="the merge job made from the study, if any")
    created_at: datetime
    updated_at: datetime


class RoundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="raw | text_encoder | unet | leave_one_out | final")


class PicksRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    picks: list[str | int] = Field(max_length=256, description="candidate names or registry ids (leave_one_out: "
                                                               "those to leave out; may be empty)")
