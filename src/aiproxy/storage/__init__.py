"""Storage: the database behind keys, tenants, users, usage logs, templates, conversations.

- :mod:`aiproxy.storage.db` — the async engine for ``database.url`` (SQLite by default,
  PostgreSQL for several replicas) and the session factory.
- :mod:`aiproxy.storage.models` — the tables (SQLAlchemy 2 typed declarative).
- :mod:`aiproxy.storage.migrate` — Alembic migrations shipped inside the package:
  ``upgrade(url)`` on start-up and ``aiproxy db upgrade``.
- :mod:`aiproxy.storage.keys` — the store API: virtual keys, tenants, users.
"""
