"""The `sdmerge` console script: the engine's commands plus `serve`, `worker`, `status` and
`db upgrade`.

Service modules are imported only when their command runs, so `sdmerge merge` stays light.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from merge_engine.cli import build_parser as build_engine_parser
from merge_engine.cli import main as engine_main


def build_parser() -> argparse.ArgumentParser:
    parser = build_engine_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    p = sub.add_parser("serve", help="run the REST API (and, embedded, its worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="database, broker, uploads and artifacts (SDMERGE_DATA_DIR; ./data)")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="a folder models may be registered from (repeatable; SDMERGE_MODEL_ROOTS)")
    p.add_argument("--scan", action="store_true", help="register every checkpoint under the roots first")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--api-workers", type=int, default=1, metavar="N", help="API processes (default 1)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("worker", help="run a worker for the scale-out mode (settings from SDMERGE_*)")
    p.add_argument("--queues", default="merge,hash,preview", help="comma-separated queues to consume")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--check", action="store_true",
                   help="exit 0 if a worker of this host beats (a container health check), 1 if not")
    p.set_defaults(handler=_worker)

    p = sub.add_parser("status", help="the deployment at a glance: queues, workers, running jobs")
    p.add_argument("--url", default=None, help="the API (SDMERGE_URL; http://127.0.0.1:8000)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (2) until interrupted")
    p.set_defaults(handler=_status)

    p = sub.add_parser("db", help="database tools")
    db = p.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db.add_parser("upgrade", help="apply Alembic migrations to SDMERGE_DATABASE_URL").set_defaults(handler=_db_upgrade)
    return parser


def _serve(args: argparse.Namespace) -> int:
    # Flags become the environment so the child worker reads the same settings.
    if args.data_dir:
        os.environ["SDMERGE_DATA_DIR"] = os.path.abspath(args.data_dir)
    if args.model_root:
        os.environ["SDMERGE_MODEL_ROOTS"] = ":".join(os.path.abspath(r) for r in args.model_root)
    from app.serve import serve
    from app.settings import get_settings

    get_settings.cache_clear()
    serve(get_settings(), args.host, args.port, scan=args.scan, access_log=args.access_log,
          api_workers=args.api_workers)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.main import check_worker, run_worker

    if args.check:
        problem = check_worker()
        print(f"sdmerge: {problem}" if problem else "sdmerge: worker alive", file=sys.stderr if problem else sys.stdout)
        return 1 if problem else 0
    run_worker([q for q in args.queues.split(",") if q], args.loglevel)
    return 0


def _status(args: argparse.Namespace) -> int:
    from app.status_cli import run_status

    return run_status(args.url, args.watch)


def _db_upgrade(_args: argparse.Namespace) -> int:
    from app.db import make_engine
    from app.migrate import upgrade
    from app.settings import get_settings

    settings = get_settings()
    settings.prepare_dirs()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    print(f"sdmerge: database at head ({engine.url.render_as_string(hide_password=True)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    code = engine_main(argv, parser=build_parser())
    # The process ends next. Frozen objects are skipped by the collection at exit, which would
    # otherwise walk every object torch made at import: about 0.2 s off every command.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
