"""The model registry: registering checkpoint files, finding them by reference, removing them.

Hashing and inspection are the worker's job (`hash_model` task); a model is `hashing` until
then. Services take the session explicitly and never commit: the edge owns the transaction.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.dispatch import enqueue
from app.errors import BadRequest, Conflict, ModelNotReady, NotFound, PayloadTooLarge
from app.models import Model, as_row_id, utcnow
from app.queue import HASH_TASK
from app.services.files import CHECKPOINT_SUFFIXES, check_checkpoint_header, check_name, confine
from app.settings import Settings
from merge_engine.errors import CheckpointError, ResolveError, SdmergeError

MIN_SHA_PREFIX = 10


def register(session: Session, settings: Settings, path: str, name: str | None = None) -> tuple[Model, bool]:
    """(model, created). The same path again answers the existing row; a changed file is re-hashed."""
    real = confine(settings, path)
    name = check_name(name or real.name)
    check_checkpoint_header(real, name)
    stat = real.stat()
    existing = session.scalar(select(Model).where(Model.path == str(real)))
    if existing is not None:
        changed = (existing.size, existing.mtime_ns) != (stat.st_size, stat.st_mtime_ns)
        # A model hashed before CRC32 and BLAKE3 were (migration 0006) gets them now.
        if changed or (existing.status == "ready" and existing.blake3 is None):
            _rehash(session, existing, stat)
        return existing, False
    if session.scalar(select(Model.id).where(Model.name == name)) is not None:
        raise Conflict("another file is registered under this name", details={"name": name})
    model = Model(name=name, path=str(real), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                  status="hashing", dispatched_at=utcnow())
    try:
        with session.begin_nested():
            session.add(model)
    except IntegrityError:  # a concurrent registration of the same path or name won
        raise Conflict("this path or name was registered at the same moment",
                       details={"name": name, "path": str(real)}) from None
    enqueue(session, HASH_TASK, model.id)
    return model, True


def _rehash(session: Session, model: Model, stat: os.stat_result) -> None:
    model.size, model.mtime_ns = stat.st_size, stat.st_mtime_ns
    model.status, model.error, model.dispatched_at = "hashing", None, utcnow()
    model.forget_hashes()
    enqueue(session, HASH_TASK, model.id)


def scan(session: Session, settings: Settings) -> dict[str, list]:
    """Register every checkpoint under the configured roots; report what was skipped and why."""
    registered, skipped = [], []
    for root in settings.model_roots:
        for path in sorted(_files_under(root)):
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES or not path.is_file():
                continue
            try:
                with session.begin_nested():
                    model, created = register(session, settings, str(path))
            except SdmergeError as exc:
                skipped.append({"path": str(path), "error": exc.to_dict()})
                continue
            except (OSError, ValueError, RuntimeError) as exc:  # one unreadable file never fails the scan
                error = CheckpointError(f"cannot read the file: {exc}", model=path.name)
                skipped.append({"path": str(path), "error": error.to_dict()})
                continue
            if created:
                registered.append(model)
    return {"registered": registered, "skipped": skipped}


def _files_under(root: Path):
    for folder, _, names in os.walk(root, followlinks=False):  # a symlinked folder loop is not walked
        yield from (Path(folder) / name for name in names)


async def receive_upload(settings: Settings, filename: str, declared_size: int | None,
                         chunks: AsyncIterator[bytes]) -> Path:
    """Stream a request body into a partial file under tmp/, never holding it in memory."""
    check_name(filename, "filename")
    if not filename.lower().endswith(".safetensors"):
        raise CheckpointError("uploads must be .safetensors files", model=filename)
    limit = settings.max_upload_bytes
    if declared_size is not None and declared_size > limit:
        raise PayloadTooLarge(f"upload of {declared_size} bytes exceeds the limit of {limit}",
                              details={"limit": limit})
    staging = settings.tmp_dir / f"upload-{uuid.uuid4().hex}.partial"
    staging.mkdir()
    received = 0
    try:
        with open(staging / filename, "wb") as out:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", details={"limit": limit})
                out.write(chunk)  # local-disk writes of one chunk are short enough to do inline
        return staging / filename
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def register_upload(session: Session, settings: Settings, received: Path) -> Model:
    """Check the received file, move it into the upload folder and register it; on any
    failure neither the file nor a row is left behind."""
    target = settings.upload_dir / received.name
    try:
        check_checkpoint_header(received, received.name)
        os.link(received, target)  # unlike a rename, fails if the name is taken meanwhile
    except FileExistsError:
        raise Conflict("a file with this name was already uploaded",
                       details={"filename": received.name}) from None
    finally:
        shutil.rmtree(received.parent, ignore_errors=True)
    try:
        model, _ = register(session, settings, str(target), received.name)
        return model
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def list_models(session: Session, *, architecture: str | None = None, name: str | None = None,
                status: str | None = None, hash: str | None = None, after: int | None = None,
                limit: int = 100) -> list[Model]:
    query = select(Model).order_by(Model.id).limit(limit)
    if hash is not None:
        query = query.where(_hash_match(session, hash))
    if architecture:
        query = query.where(Model.architecture == architecture)
    if name:
        query = query.where(Model.name.contains(name, autoescape=True))
    if status:
        query = query.where(Model.status == status)
    if after is not None:
        query = query.where(Model.id > after)
    return list(session.scalars(query))


HASH_KINDS = {"sha256": "sha256", "autov2": "sha256", "autov3": "autov3", "blake3": "blake3",
              "autov1": "legacy_hash", "legacy": "legacy_hash", "crc32": "crc32"}
_PREFIX_KINDS = ("sha256", "autov3", "blake3")  # 64 digits: a prefix of MIN_SHA_PREFIX or more finds them
_SHORT_KINDS = ("legacy_hash", "crc32")  # 8 digits, matched whole


def _hash_match(session: Session, text: str) -> ColumnElement[bool]:
    """Models with this hash, of any kind Civitai shows (or of the kind named as `kind:<hex>`).
    Several files matching is a 409 listing them: the user pastes a longer hash."""
    kind, _, digits = text.strip().lower().rpartition(":")
    columns = ([HASH_KINDS[kind]] if kind in HASH_KINDS else []) if kind else [*_PREFIX_KINDS, *_SHORT_KINDS]
    if not columns or not 8 <= len(digits) <= 64 or any(c not in "0123456789abcdef" for c in digits):
        raise BadRequest("hash must be 8 to 64 hex digits (AutoV1, AutoV2, AutoV3, SHA256, CRC32 or BLAKE3), "
                         f"optionally as kind:<hex> with kind one of {', '.join(HASH_KINDS)}",
                         details={"hash": text[:100]})
    terms = [getattr(Model, c) == digits for c in columns if c in _SHORT_KINDS and len(digits) == 8]
    terms += [getattr(Model, c).startswith(digits) for c in columns if c in _PREFIX_KINDS and len(digits) >= MIN_SHA_PREFIX]
    if not terms:
        raise BadRequest(f"{len(digits)} hex digits cannot be a {' or '.join(columns)} hash "
                         f"(AutoV1 and CRC32 are 8 digits; a sha256, AutoV3 or BLAKE3 prefix is {MIN_SHA_PREFIX} or more)",
                         details={"hash": text[:100]})
    match = or_(*terms)
    files = session.execute(select(Model.id, Model.name, Model.sha256).where(match).order_by(Model.id)
                            .limit(50)).all()
    if len({row.sha256 for row in files}) > 1:
        raise Conflict("this hash matches several files: give more digits or its kind (e.g. crc32:<hex>)",
                       details={"hash": text[:100], "matches": [
                           {"id": row.id, "name": row.name, "sha256": row.sha256} for row in files]})
    return match


def get_model(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound("no such model", details={"id": model_id})
    return model


def delete_model(session: Session, settings: Settings, model_id: int) -> None:
    """Forget a model. Its file stays where it is, unless it was uploaded (the service owns those)."""
    model = get_model(session, model_id)
    session.delete(model)
    session.flush()
    path = Path(model.path)
    if path.parent == settings.upload_dir.resolve():
        path.unlink(missing_ok=True)


def find(session: Session, ref: str) -> Model:
    """A model by id, unique name, or `sha256:<hex>` (a unique prefix of 10+ hex digits)."""
    if "\x00" in ref:  # names no model, and PostgreSQL refuses it in a query
        raise ResolveError("no registered model has this id or name", model=ref)
    if ref.lower().startswith("sha256:"):
        return _by_sha256(session, ref[7:].lower(), ref)
    model = session.scalar(select(Model).where(Model.name == ref)) if len(ref) <= 255 else None
    if model is None and (row_id := as_row_id(ref)) is not None:
        model = session.get(Model, row_id)
    if model is None:
        raise ResolveError("no registered model has this id or name", model=ref)
    return model


def _by_sha256(session: Session, prefix: str, ref: str) -> Model:
    if len(prefix) < MIN_SHA_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise ResolveError(f"a sha256 reference needs at least {MIN_SHA_PREFIX} hex digits", model=ref)
    models = list(session.scalars(
        select(Model).where(Model.sha256.startswith(prefix), Model.status == "ready").order_by(Model.id)
    ))
    if len({m.sha256 for m in models}) > 1:
        raise ResolveError("sha256 prefix matches several models", model=ref,
                           details={"matches": sorted({m.sha256 for m in models})})
    if not models:
        hashing = session.scalar(select(func.count()).select_from(Model).where(Model.status == "hashing"))
        hint = f" ({hashing} models are still hashing)" if hashing else ""
        raise ResolveError(f"no registered model has this sha256{hint}", model=ref)
    return models[0]


def find_ready(session: Session, refs: Sequence[str]) -> list[Model]:
    """Ready models for references (id, name or `sha256:<hex>`), in order. Every reference that
    names no model is listed in one 422 (`details.unresolved`), as for a recipe's leaves; a model
    still hashing is a 409."""
    found, unresolved = [], []
    for ref in refs:
        try:
            found.append(require_ready(find(session, ref), ref))
        except ResolveError as exc:
            unresolved.append({"leaf": ref, "reason": exc.message})
    if unresolved:
        names = ", ".join(u["leaf"] for u in unresolved)
        raise ResolveError(f"{len(unresolved)} model(s) not found in the registry: {names}",
                           model=unresolved[0]["leaf"], details={"unresolved": unresolved})
    return found


def find_leaf(session: Session, sha256: str | None, name: str | None) -> Model | None:
    """A content-named leaf (A1111 conversions, canonical recipes): by sha256, then by file name."""
    if sha256:
        model = session.scalar(select(Model).where(Model.sha256 == sha256, Model.status == "ready")
                               .order_by(Model.id))
        if model is not None:
            return model
    if name and "\x00" not in name:
        base = name.replace("\\", "/").split("/")[-1]
        matches = list(session.scalars(select(Model).where(
            or_(Model.name == base, Model.path.endswith("/" + base, autoescape=True)))))
        if len(matches) == 1:
            return matches[0]
    return None


def require_ready(model: Model, ref: str) -> Model:
    if model.status == "hashing":
        raise ModelNotReady("model is still being hashed; retry shortly", model=ref,
                            details={"id": model.id})
    if model.status != "ready":
        raise ResolveError(f"model failed inspection: {model.error}", model=ref, details={"id": model.id})
    return model
