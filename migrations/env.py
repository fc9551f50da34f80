"""Alembic environment. `app.migrate` hands us an open connection; plain `alembic` gets a URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from app.db import make_engine
from app.models import Base

# Any fixed number: every process that migrates Postgres takes this lock, so an API and several
# workers starting together apply each migration once.
MIGRATION_LOCK = 740_317_001


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        run_migrations(conn)
        conn.commit()
    engine.dispose()
