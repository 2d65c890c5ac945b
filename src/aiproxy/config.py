"""config.yaml: load, expand ``${VAR}`` / ``${VAR:-default}``, validate with paths.

Every problem is reported with where it is in the file
(``models[2].provider: no provider named 'opnai'``), all of them at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aiproxy.routing.settings import KEYS as ROUTING_KEYS
from aiproxy.routing.settings import RouteSettings, check_models, parse_routing

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_MAX_BODY = 16 * 1024 * 1024
_CORE_SECTIONS = ("server", "database", "redis", "plugins", "providers", "models")


class ConfigError(Exception):
    """Every problem found in one config, each a ``path: message`` line."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))


@dataclass(slots=True)
class Timeouts:
    """Seconds; ``None`` leaves the value to the next level (model → provider → default)."""

    connect: float | None = None
    read: float | None = None
    write: float | None = None
    pool: float | None = None
    first_token: float | None = None  # a stream's first event (routing retries on it)
    idle: float | None = None  # between stream events, once the first has gone out
    total: float | None = None  # one attempt, start to end

    def over(self, base: Timeouts) -> Timeouts:
        return Timeouts(*(mine if mine is not None else theirs
                          for mine, theirs in zip(self.astuple(), base.astuple(), strict=True)))

    def astuple(self) -> tuple[float | None, ...]:
        return (self.connect, self.read, self.write, self.pool, self.first_token, self.idle, self.total)


DEFAULT_TIMEOUTS = Timeouts(connect=5.0, read=600.0, write=60.0, pool=10.0)


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    master_key: str | None = None
    workers: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY
    access_log: bool = False
    log_level: str = "info"

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)


@dataclass(slots=True)
class ProviderConfig:
    name: str
    plugin: str
    api_base: str | None = None
    api_key: str | None = None
    timeout: Timeouts = field(default_factory=Timeouts)
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ModelConfig:
    name: str  # what clients send; may hold one '*' wildcard
    provider: str
    model: str | None = None  # upstream model; '*' takes what the wildcard matched
    timeout: Timeouts = field(default_factory=Timeouts)
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys for stage plugins
    index: int = 0  # position in models:, for messages
    routing: RouteSettings = field(default_factory=RouteSettings)  # id, weight, pool knobs
    price: dict[str, Any] | None = None  # USD per million tokens (see PRICE_KEYS), for the cost stage


@dataclass(slots=True)
class PluginsConfig:
    dir: Path | None = None
    disable: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    models: list[ModelConfig] = field(default_factory=list)
    database_url: str | None = None
    redis_url: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # one per stage plugin
    source: str = "<dict>"

    def section(self, name: str) -> dict[str, Any]:
        value = self.sections.get(name)
        return value if isinstance(value, dict) else {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- loading

def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a YAML file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], str(p)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML: {problem}"], str(p)) from None
    return parse_config(raw if raw is not None else {}, env=env, source=str(p), base_dir=p.parent)


def parse_config(raw: Any, *, env: Mapping[str, str] | None = None, source: str = "<dict>",
                 base_dir: Path | None = None) -> Config:
    """Validate an already-loaded mapping (what tests and embedders pass)."""
    errors: list[str] = []
    expanded = expand_env(raw, os.environ if env is None else env, errors)
    v = _Validator(errors)
    config = v.config(expanded, base_dir or Path.cwd())
    config.source = source
    if errors:
        raise ConfigError(errors, source)
    return config


def expand_env(value: Any, env: Mapping[str, str], errors: list[str], path: str = "") -> Any:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$`` in every string, recursively.

    ``:-`` takes the default when the variable is unset or empty, as the shell does.
    An unset ``${VAR}`` with no default is an error at its path.
    """
    if isinstance(value, str):
        if "$" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            got = env.get(name)
            if default is not None:
                return got if got else default
            if got is None:
                errors.append(f"{path or '<root>'}: environment variable {name} is not set "
                              f"(write ${{{name}:-default}} to give a default)")
                return ""
            return got

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, errors, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, errors, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---------------------------------------------------------------- validation

class _Validator:
    """Reads typed values out of plain YAML data, noting every mistake with its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors

    def err(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # scalars ------------------------------------------------------------
    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {_kind(value)}")
            return {}
        return value

    def string(self, value: Any, path: str, *, required: bool = False) -> str | None:
        if value is None or value == "":
            if required:
                self.err(path, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.err(path, f"expected a string, got {_kind(value)}")
            return None
        return str(value)

    def number(self, value: Any, path: str, conv: Callable[[Any], Any], *,
               minimum: float | None = None, default: Any = None) -> Any:
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            self.err(path, f"expected a number, got {_kind(value)}")
            return default
        try:
            number = conv(value)
        except (TypeError, ValueError):
            self.err(path, f"expected a number, got {value!r}")
            return default
        if conv is int and isinstance(value, float) and value != number:
            self.err(path, f"expected a whole number, got {value!r}")
            return default
        if minimum is not None and number < minimum:
            self.err(path, f"must be at least {minimum:g}, got {number!r}")
            return default
        return number

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        self.err(path, f"expected true or false, got {value!r}")
        return default

    def strings(self, value: Any, path: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            self.err(path, f"expected a list of strings, got {_kind(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]", required=True)
            if s is not None:
                out.append(s)
        return out

    def only(self, data: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                self.err(_join(path, str(key)), f"unknown setting (expected one of: {', '.join(allowed)})")

    def timeouts(self, value: Any, path: str) -> Timeouts:
        if value is None:
            return Timeouts()
        if not isinstance(value, dict):  # one number: the read timeout, the one people mean
            return Timeouts(read=self.number(value, path, float, minimum=0.001))
        keys = ("connect", "read", "write", "pool", "first_token", "idle", "total")
        self.only(value, path, keys)
        return Timeouts(**{k: self.number(value.get(k), f"{path}.{k}", float, minimum=0.001)
                           for k in keys})

    def price(self, value: Any, path: str) -> dict[str, Any] | None:
        """A model's price, USD per million tokens: ``input`` and ``output`` required,
        ``cached_input`` / ``cache_write`` optional, ``long_context`` (rates for prompts
        over its ``threshold`` tokens) optional. Numbers are kept as written."""
        if value is None:
            return None
        data = self.mapping(value, path)
        self.only(data, path, (*PRICE_KEYS, "long_context"))
        out: dict[str, Any] = {}
        for key in PRICE_KEYS:
            number = self.rate(data.get(key), f"{path}.{key}")
            if number is not None:
                out[key] = data[key]
            elif key in ("input", "output") and data.get(key) in (None, ""):
                self.err(f"{path}.{key}", "is required (USD per million tokens; 0 for none)")
        long = data.get("long_context")
        if long is not None:
            ldata = self.mapping(long, f"{path}.long_context")
            self.only(ldata, f"{path}.long_context", ("threshold", *PRICE_KEYS))
            if ldata.get("threshold") in (None, ""):
                self.err(f"{path}.long_context.threshold", "is required (prompt tokens above which "
                         "these rates apply)")
            threshold = ldata.get("threshold")
            if isinstance(threshold, float) and not math.isfinite(threshold):  # int() would raise
                self.err(f"{path}.long_context.threshold", f"expected a whole number, got {threshold!r}")
            else:
                self.number(threshold, f"{path}.long_context.threshold", int, minimum=1)
            for key in PRICE_KEYS:
                self.rate(ldata.get(key), f"{path}.long_context.{key}")
            out["long_context"] = {k: v for k, v in ldata.items() if v not in (None, "")}
        return out

    def rate(self, value: Any, path: str) -> float | None:
        """USD per million tokens: a finite number, at least 0 (YAML's .inf and .nan are floats)."""
        number = self.number(value, path, float, minimum=0)
        if number is not None and not math.isfinite(number):
            self.err(path, f"expected a finite number, got {value!r}")
            return None
        return number

    # sections -----------------------------------------------------------
    def config(self, raw: Any, base_dir: Path) -> Config:
        data = self.mapping(raw, "<root>")
        server = self.server(self.mapping(data.get("server"), "server"))
        plugins = self.plugins(self.mapping(data.get("plugins"), "plugins"), base_dir)
        providers = self.providers(data.get("providers"))
        models = self.models(data.get("models"), providers)
        database = self.mapping(data.get("database"), "database")
        self.only(database, "database", ("url", "echo", "pool_size", "migrate_on_start"))
        redis = self.mapping(data.get("redis"), "redis")
        self.only(redis, "redis", ("url", "prefix"))
        sections = {k: v for k, v in data.items() if k not in _CORE_SECTIONS}
        for key in sections:
            if not isinstance(key, str):
                self.err(str(key), "section names must be strings")
                continue
            near = difflib.get_close_matches(key, _CORE_SECTIONS, n=1, cutoff=0.8)
            if near:  # any other section belongs to a plugin; this one is a misspelling
                self.err(key, f"unknown section; did you mean '{near[0]}'?")
        sections["database"] = database
        sections["redis"] = redis
        return Config(
            server=server, plugins=plugins, providers=providers, models=models,
            database_url=self.string(database.get("url"), "database.url"),
            redis_url=self.string(redis.get("url"), "redis.url"),
            sections=sections,
        )

    def server(self, data: dict[str, Any]) -> ServerConfig:
        self.only(data, "server", ("host", "port", "master_key", "workers", "max_body_bytes",
                                   "access_log", "log_level"))
        d = ServerConfig()
        level = (self.string(data.get("log_level"), "server.log_level") or d.log_level).lower()
        if level not in ("critical", "error", "warning", "info", "debug"):
            self.err("server.log_level", f"expected critical, error, warning, info or debug, got {level!r}")
            level = d.log_level
        port = self.number(data.get("port"), "server.port", int, minimum=0, default=d.port)
        if port > 65535:
            self.err("server.port", f"must be at most 65535, got {port}")
        return ServerConfig(
            host=self.string(data.get("host"), "server.host") or d.host,
            port=port,
            master_key=self.string(data.get("master_key"), "server.master_key"),
            workers=self.number(data.get("workers"), "server.workers", int, minimum=1, default=1),
            max_body_bytes=self.number(data.get("max_body_bytes"), "server.max_body_bytes", int,
                                       minimum=1024, default=d.max_body_bytes),
            access_log=self.boolean(data.get("access_log"), "server.access_log", d.access_log),
            log_level=level,
        )

    def plugins(self, data: dict[str, Any], base_dir: Path) -> PluginsConfig:
        self.only(data, "plugins", ("dir", "disable"))
        if "dir" in data and data["dir"] in (None, "", False):
            folder = None  # explicitly off
        else:
            name = self.string(data.get("dir"), "plugins.dir") or "plugins"
            folder = (base_dir / name) if not Path(name).is_absolute() else Path(name)
        return PluginsConfig(dir=folder, disable=self.strings(data.get("disable"), "plugins.disable"))

    def providers(self, raw: Any) -> dict[str, ProviderConfig]:
        out: dict[str, ProviderConfig] = {}
        for name, value in self.mapping(raw, "providers").items():
            path = f"providers.{name}"
            data = self.mapping(value, path)
            self.only(data, path, ("plugin", "api_base", "api_key", "timeout", "headers", "options"))
            headers = self.mapping(data.get("headers"), f"{path}.headers")
            api_base = self.string(data.get("api_base"), f"{path}.api_base")
            if api_base and not api_base.startswith(("http://", "https://")):
                self.err(f"{path}.api_base", f"expected an http:// or https:// URL, got {api_base!r}")
            out[str(name)] = ProviderConfig(
                name=str(name),
                plugin=self.string(data.get("plugin"), f"{path}.plugin") or str(name),
                api_base=api_base,
                api_key=self.string(data.get("api_key"), f"{path}.api_key"),
                timeout=self.timeouts(data.get("timeout"), f"{path}.timeout"),
                headers={str(k): str(v) for k, v in headers.items() if v is not None},
                options=self.mapping(data.get("options"), f"{path}.options"),
            )
        return out

    def models(self, raw: Any, providers: dict[str, ProviderConfig]) -> list[ModelConfig]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.err("models", f"expected a list, got {_kind(raw)}")
            return []
        out = []
        for i, value in enumerate(raw):
            path = f"models[{i}]"
            data = self.mapping(value, path)
            if not data:
                if value is not None and not isinstance(value, dict):
                    continue
                self.err(path, "expected a mapping with at least name and provider")
                continue
            name = self.string(data.get("name"), f"{path}.name", required=True)
            provider = self.string(data.get("provider"), f"{path}.provider", required=True)
            if provider is not None and provider not in providers:
                known = ", ".join(sorted(providers)) or "none are configured"
                self.err(f"{path}.provider", f"no provider named {provider!r} (providers: {known})")
            if name is not None and name.count("*") > 1:
                self.err(f"{path}.name", "at most one '*' wildcard is allowed")
            known_keys = ("name", "provider", "model", "timeout", "options", "price", *ROUTING_KEYS)
            out.append(ModelConfig(
                name=name or "", provider=provider or "",
                model=self.string(data.get("model"), f"{path}.model"),
                timeout=self.timeouts(data.get("timeout"), f"{path}.timeout"),
                options=self.mapping(data.get("options"), f"{path}.options"),
                extra={k: v for k, v in data.items() if k not in known_keys},
                index=i,
                routing=parse_routing(self, data, path),
                price=self.price(data.get("price"), f"{path}.price"),
            ))
        check_models(self, out)
        return out


#: the rates a ``price:`` may give, USD per million tokens
PRICE_KEYS = ("input", "output", "cached_input", "cache_write")


def parse_price(value: Any, path: str, errors: list[str]) -> dict[str, Any] | None:
    """Validate a ``price:`` mapping as a model entry's is (for plugins that take prices)."""
    return _Validator(errors).price(value, path)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
