"""The FastAPI application factory. Importing this module creates nothing and imports no torch."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.auth import BearerTokenMiddleware
from app.bodies import BodyLimitMiddleware
from app.errors import install_error_handlers
from app.metrics import make_registry
from app.openapi import install_openapi
from app.routes import analyses, artifacts, docs, merges, models, previews, studies, system, web
from app.runtime import make_runtime
from app.settings import Settings, get_settings
from merge_engine import __version__


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = make_runtime(settings or get_settings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        runtime.close()

    app = FastAPI(title="sdmerge", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Streaming N-way Stable Diffusion checkpoint merges: registry, jobs, artifacts, "
                              "analyses, previews.")
    app.state.runtime = runtime
    app.state.metrics = make_registry(runtime)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, limit=runtime.settings.max_json_bytes)
    app.add_middleware(BearerTokenMiddleware, token=runtime.settings.api_token)  # outermost: before any body is read
    for module in (system, docs, models, merges, artifacts, analyses, previews, studies, web):
        app.include_router(module.router)
    app.mount("/ui/static", web.static_files(), name="ui-static")
    app.mount(docs.VENDOR_URL, StaticFiles(directory=docs.VENDOR_DIR), name="vendor")
    return app
