"""``aiproxy serve | check-config | plugins``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from aiproxy import __version__, cli_manage
from aiproxy.config import Config, ConfigError, is_loopback, load_config

CONFIG_ENV = "AIPROXY_CONFIG"
LOG_LEVEL_ENV = "AIPROXY_LOG_LEVEL"


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get(CONFIG_ENV) or "config.yaml")


def _load(arg: str | None) -> Config:
    return load_config(_config_path(arg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiproxy", description="An OpenAI-compatible LLM gateway.")
    parser.add_argument("--version", action="version", version=f"aiproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the gateway")
    serve.add_argument("--config", help=f"YAML file (default: ${CONFIG_ENV} or ./config.yaml)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, help="override server.workers")
    serve.add_argument("--log-level", help="override server.log_level")

    check = sub.add_parser("check-config", help="validate the config and print a summary")
    check.add_argument("--config")

    plugins = sub.add_parser("plugins", help="list loaded plugins and the hooks each implements")
    plugins.add_argument("--config")

    db = sub.add_parser("db", help="the database: upgrade its schema, show its revision")
    db.add_argument("action", choices=["upgrade", "current", "rotate-encryption-key"])
    db.add_argument("--config")
    db.add_argument("--url", help="override database.url")
    cli_manage.add_parsers(sub)  # keys, tenants, users

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "db":
            from aiproxy.storage import commands

            return commands.run(args.action, _load(args.config), args.url)
        if args.command in cli_manage.COMMANDS:
            return cli_manage.run(args, _load(args.config))
        if args.command == "check-config":
            return _check(args)
        return _plugins(args)
    except ConfigError as exc:
        print(f"aiproxy: invalid config {exc.source}:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    except Exception as exc:
        from aiproxy.plugins import PluginError

        if isinstance(exc, PluginError):
            print(f"aiproxy: {exc}", file=sys.stderr)
            return 2
        raise


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from aiproxy.app import create_app

    config = _load(args.config)
    server = config.server
    host = args.host or server.host
    port = args.port if args.port is not None else server.port
    workers = args.workers or server.workers
    level = (args.log_level or server.log_level).lower()
    _setup_logging(level)
    if not server.master_key and not is_loopback(host):
        print(f"aiproxy: refusing to listen on {host}: no server.master_key is set, so anyone who "
              "can reach it could spend your provider keys. Set AIPROXY_MASTER_KEY (or "
              "server.master_key), or listen on 127.0.0.1.", file=sys.stderr)
        return 2
    if config.database_url:  # unreachable or behind: say so now, not in a startup traceback
        import asyncio

        from aiproxy.storage.commands import migrate_on_start, prepare

        problem = asyncio.run(prepare(config.database_url, upgrade=migrate_on_start(config)))
        if problem:
            print(f"aiproxy: {problem}", file=sys.stderr)
            return 2
    common = dict(host=host, port=port, log_level=level, access_log=server.access_log,
                  loop="auto", http="auto", lifespan="on", timeout_graceful_shutdown=30,
                  server_header=False)
    if workers > 1:
        os.environ[CONFIG_ENV] = str(_config_path(args.config).resolve())
        os.environ[LOG_LEVEL_ENV] = level
        with _metrics_dir():
            create_app(config)  # fail here, once, on a bad plugin, not in every worker
            uvicorn.run("aiproxy.cli:worker_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    else:
        app = create_app(config)
        settle_heap()
        uvicorn.run(app, **common)  # type: ignore[arg-type]
    return 0


@contextmanager
def _metrics_dir() -> Iterator[None]:
    """Several workers are one gateway to /metrics: prometheus-client keeps each worker's
    values in files under PROMETHEUS_MULTIPROC_DIR (set before any worker imports it), and
    the scraped worker answers for all. A fresh directory per run (a past run's files would
    add its counts), removed after (under $TMPDIR: point it at a tmpfs to keep it in memory)."""
    path = tempfile.mkdtemp(prefix="aiproxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


def worker_app() -> object:
    """The app of one worker process when ``--workers`` > 1."""
    from aiproxy.app import create_app

    _setup_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    app = create_app(_load(None))
    settle_heap()
    return app


def settle_heap() -> None:
    """Put what start-up loaded (modules, SDK types, plugins) out of the collector's reach.

    Otherwise every full collection walks it all again: ~100 ms pauses every few
    seconds under load, measured in bench/ (with this, ~2 ms). No collection first:
    it would add ~100 ms to start-up to free a few hundred kB. Only the serving
    process does this, never an app built in tests.
    """
    gc.freeze()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: a log line per call on the hot path, and URLs
    # some upstreams put credentials in. Its warnings still show.
    quiet = max(logging.WARNING, logging.getLogger().level)
    logging.getLogger("httpx").setLevel(quiet)
    logging.getLogger("httpcore").setLevel(quiet)
    logging.getLogger("alembic").setLevel(quiet)  # aiproxy.database says what migrated


def _check(args: argparse.Namespace) -> int:
    from aiproxy.app import create_app

    config = _load(args.config)
    app = create_app(config)  # loads plugins and checks provider kinds
    import asyncio

    import httpx

    from aiproxy.app import build_providers
    from aiproxy.plugins import provider_kinds

    http = httpx.AsyncClient()
    _, disabled = build_providers(config, provider_kinds(app.state.hooks), http, quiet=True)
    asyncio.run(http.aclose())
    print(f"{config.source}: OK")
    print(f"  server: {config.server.host}:{config.server.port}, workers {config.server.workers}, "
          f"master key {'set' if config.server.master_key else 'NOT set (loopback only)'}")
    if config.database_url:
        from aiproxy.storage.db import redact

        print(f"  database: {redact(config.database_url)}")
    else:
        print("  database: none (keys come from config alone)")
    print(f"  providers ({len(config.providers)}):")
    for name, provider in config.providers.items():
        state = f"left out of routing: {disabled[name]}" if name in disabled else "ready"
        print(f"    {name} ({provider.plugin}): {state}")
    print(f"  models ({len(config.models)}):")
    for m in config.models:
        target = m.model or m.name
        print(f"    {m.name} → {m.provider}:{target}")
    loaded = set(app.state.plugin_manager.sources)
    core = ("database", "redis", "security")
    unused = sorted(k for k in config.sections if k not in loaded and k not in core)
    if unused:
        print(f"  sections no loaded plugin reads (yet): {', '.join(unused)}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from aiproxy.plugins import build_plugin_manager, describe

    pm = build_plugin_manager(_load(args.config))
    rows = describe(pm)
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.source}")
        print(f"{'':<{width}}    hooks: {', '.join(r.hooks) or '(none)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
