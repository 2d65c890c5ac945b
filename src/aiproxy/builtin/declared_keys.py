"""Keys declared in config.yaml, for small setups with no key management::

    keys:
      declared:
        - name: ci
          key: ${AIPROXY_CI_KEY}          # an environment reference, expanded at load
          tier: pro
          allowed_models: [mock-gpt]
          tenant: acme                    # labels: no database row is needed
          user: ci-bot
        - name: dashboard
          hash: "sha256:9f86d081…"        # or the SHA-256 hex of the key, never the key
          role: admin

A literal ``key:`` in the file is refused (a secret in a file is one commit away
from a public repository): write ``${ENV_VAR}`` or ``hash: sha256:<hex>``.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import yaml

from aiproxy.storage.keys import hash_key
from aiproxy.storage.names import ROLES, TIERS
from aiproxy.storage.records import KeyRecord

_HEX = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("name", "key", "hash", "tier", "role", "allowed_models", "tenant", "user",
           "monthly_limit_tokens", "expires_at", "metadata")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class DeclaredKeyError(ValueError):
    """Every problem in ``keys.declared``, each with its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def parse_declared(items: Any, source: str) -> dict[str, KeyRecord]:
    """``keys.declared`` → records by key hash. Raises DeclaredKeyError naming each problem."""
    errors: list[str] = []
    if items is None:
        return {}
    if not isinstance(items, list):
        raise DeclaredKeyError(["keys.declared: expected a list of keys"])
    literal = _literal_keys(source)
    out: dict[str, KeyRecord] = {}
    for i, item in enumerate(items):
        path = f"keys.declared[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{path}: expected a mapping")
            continue
        for k in item:
            if k not in _FIELDS:
                errors.append(f"{path}.{k}: unknown setting (expected one of: {', '.join(_FIELDS)})")
        name = str(item.get("name") or f"declared-{i}")
        key, digest = item.get("key"), item.get("hash")
        if i in literal:
            errors.append(f"{path}.key: a literal key in {source}; write it as ${{ENV_VAR}} "
                          "or give its hash (hash: sha256:<hex>)")
            continue
        if (key is None) == (digest is None):
            errors.append(f"{path}: give exactly one of key (an ${{ENV}} reference) or hash")
            continue
        if key is not None:
            if not isinstance(key, str) or len(key) < 16:
                errors.append(f"{path}.key: must be at least 16 characters (is the variable set?)")
                continue
            digest = hash_key(key)
        else:
            text = str(digest).removeprefix("sha256:").lower()
            if not _HEX.fullmatch(text):
                errors.append(f"{path}.hash: expected sha256:<64 hex digits>")
                continue
            digest = text
        tier, role = str(item.get("tier", "free")), str(item.get("role", "member"))
        if tier not in TIERS:
            errors.append(f"{path}.tier: expected one of {', '.join(TIERS)}, got {tier!r}")
        if role not in ROLES:
            errors.append(f"{path}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        models = item.get("allowed_models")
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            errors.append(f"{path}.allowed_models: expected a list of model names")
            models = None
        limit = item.get("monthly_limit_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            errors.append(f"{path}.monthly_limit_tokens: expected a whole number of tokens")
            limit = None
        expires = _when(item.get("expires_at"), f"{path}.expires_at", errors)
        if digest in out:
            errors.append(f"{path}: the same key is declared twice")
        given = item.get("metadata")
        metadata: dict[str, Any] = given if isinstance(given, dict) else {}
        out[digest] = KeyRecord(
            id=f"config:{name}", prefix="", name=name, user_id=_opt(item.get("user")),
            tenant_id=_opt(item.get("tenant")), tier=tier, role=role,
            allowed_models=tuple(models) if models is not None else None,
            monthly_limit_tokens=limit, current_usage=0, usage_period=None, expires_at=expires,
            revoked_at=None, replaced_by=None, created_at=EPOCH, last_used_at=None,
            metadata={**metadata, "declared": True})
    if errors:
        raise DeclaredKeyError(errors)
    return out


def _opt(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _when(value: Any, path: str, errors: list[str]) -> dt.datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    else:
        try:
            when = dt.datetime.fromisoformat(str(value))
        except ValueError:
            errors.append(f"{path}: expected an ISO 8601 date or time, got {value!r}")
            return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _literal_keys(source: str) -> set[int]:
    """Indexes of ``keys.declared`` entries whose ``key:`` is written out in the file
    itself rather than as a ``${VAR}`` reference (read from the raw, unexpanded YAML)."""
    path = Path(source)
    if not path.is_file():
        return set()  # a config built in code: nothing on disk to leak
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    keys = raw.get("keys") if isinstance(raw, dict) else None
    declared = keys.get("declared") if isinstance(keys, dict) else None
    if not isinstance(declared, list):
        return set()
    return {i for i, item in enumerate(declared)
            if isinstance(item, dict) and item.get("key") not in (None, "")
            and "${" not in str(item.get("key"))}
