"""Storage: the database behind keys, tenants, users, usage logs, templates, conversations.

- :mod:`aiproxy.storage.db` — the async engine for ``database.url`` (SQLite by default,
  PostgreSQL for several replicas) and the session factory.
- :mod:`aiproxy.storage.models` — the tables (SQLAlchemy 2 typed declarative).
- :mod:`aiproxy.storage.migrate` — Alembic migrations shipped inside the package:
  ``upgrade(url)`` on start-up and ``aiproxy db upgrade``.
- :mod:`aiproxy.storage.keys` — the store API: virtual keys, tenants, users
  (:mod:`aiproxy.storage.records`: the records it hands out).
- :mod:`aiproxy.storage.crypto` / :mod:`aiproxy.storage.credentials` — tenants' own
  provider keys, AES-256-GCM encrypted at rest, and ``ENCRYPTION_KEY`` rotation.
- :mod:`aiproxy.storage.commands` — ``aiproxy db …`` and the check ``serve`` runs first.
"""
