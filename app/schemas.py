"""What the API accepts and answers, apart from recipes (the engine's `Recipe` is the body)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_serializer

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("*", when_used="json")
    def _utc(self, value: Any) -> Any:
        # Rows hold naive UTC; say so on the wire.
        return value.isoformat() + "Z" if isinstance(value, datetime) else value


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
    sha256: str | None
    autov3: str | None
    legacy_hash: str | None
    created_at: datetime
    updated_at: datetime


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


class JobOut(_Out):
    id: int
    status: str
    name: str | None
    recipe: dict[str, Any]
    recipe_hash: str
    architecture: str | None
    output_size: int | None
    progress: dict[str, Any] | None
    error: dict[str, Any] | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifact: ArtifactOut | None


class Page(BaseModel, Generic[T]):
    items: list[T]
    next: str | None = Field(description="cursor for the next page, or null at the end")
