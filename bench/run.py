"""The aiproxy benchmark: one command, one run, everything back to back on this machine.

    make bench                      # the full run; writes bench/RESULTS.md
    python bench/run.py --quick     # a short run (seconds per point, 10,000-call soak)
    python bench/run.py --compare litellm   # also the LiteLLM proxy, in bench/.venvs/litellm

A fast fake upstream (bench/upstream.py) and wrk share core 0; the gateway is pinned
to core 1 (where the machine has two). First wrk goes straight to the upstream, then
through aiproxy in each configuration, then through each upstream client aiproxy could
use, then (optionally) through another gateway on the same upstream. See README.md
("Performance") and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import report
from measure import Load, Processes, Stream

ROOT = measure.HERE.parent
MASTER_KEY = "sk-bench-master-key"
LOAD_CORE, PROXY_CORE = 0, 1
CONCURRENCY = (1, 16, 64)
TRANSPORTS = ("httpx", "httpx-fastpath", "httpcore2", "aiohttp", "aiproxy")


@dataclass
class Settings:
    seconds: float  # per load point
    soak_calls: int
    soak_limit: float  # seconds the soak may take at most
    streams: int
    chunk_delay_ms: float = 2.0
    tokens: int = 32


@dataclass
class Target:
    """One gateway (or the upstream itself) under one configuration, measured."""

    name: str
    cold_start_s: float | None = None
    rss_start_mb: float | None = None
    rss_after_mb: float | None = None
    rss_series: list[float] = field(default_factory=list)
    soak_calls: int = 0
    load: dict[int, Load] = field(default_factory=dict)
    stream: Stream | None = None
    note: str = ""


VIRTUAL_KEY = "sk-bench" + "0" * 38  # the shape of a virtual key: sk- and 43 characters


#: The stage sections of the "all stages" configurations: every stage on, none in the way.
#: Limits, quotas and budgets are counted on every call (tokens estimated and settled) but
#: set far above what a run reaches; every body differs (temperature 0), so the cache looks
#: up and misses, then stores; cost prices the bench model; usage logs go to the database.
STAGES = """keys:
  required: true
  declared: [{name: bench, hash: "sha256:DIGEST", tier: enterprise}]
limits:
  tiers: {enterprise: {requests: 1000000000, tokens_per_minute: 1000000000000}}
quotas:
  plans: {enterprise: {monthly_tokens: 1000000000000000}}
  budgets: {tiers: {enterprise: {key: {monthly_usd: 1000000000}}}}
cache: {enabled: true}
cost:
  prices: {bench-model: {input: 2.5, output: 10, cached_input: 1.25}}
  alert_threshold_usd: 1000000000
usage: {}
metrics: {}
"""
MODES = ("bare", "stages", "stages-redis-pg")
STAGE_HEADERS = ("x-aiproxy-cache", "x-aiproxy-cost", "x-ratelimit-limit-requests",
                 "x-ratelimit-limit-tokens")


def config_yaml(fast: int, slow: int, mode: str, work: Path, *, redis_url: str | None = None,
                database_url: str | None = None) -> str:
    """*bare*: no stage at all. *stages*: every stage, in process, usage logs to SQLite.
    *stages-redis-pg*: the same with Redis (limits, quotas, cache, cost, cooldowns) and PostgreSQL."""
    if mode == "bare":
        head = """server: {host: 127.0.0.1, port: PORT, log_level: warning}
plugins: {dir: null, disable: [keys, database, limits, quotas, cache, cost, usage, metrics]}
"""
    else:
        digest = hashlib.sha256(VIRTUAL_KEY.encode()).hexdigest()
        url = database_url if mode == "stages-redis-pg" else f"sqlite+aiosqlite:///{work}/bench.db"
        head = f"""server: {{host: 127.0.0.1, port: PORT, log_level: warning, master_key: {MASTER_KEY}}}
plugins: {{dir: null}}
database: {{url: "{url}", migrate_on_start: true}}
""" + STAGES.replace("DIGEST", digest)
        if mode == "stages-redis-pg":
            head += f'redis: {{url: "{redis_url}", prefix: "aiproxy-bench-{os.urandom(4).hex()}:"}}\n'
    return head + f"""providers:
  fast: {{plugin: openai, api_base: "http://127.0.0.1:{fast}/v1", api_key: sk-bench-upstream}}
  slow: {{plugin: openai, api_base: "http://127.0.0.1:{slow}/v1", api_key: sk-bench-upstream}}
models:
  - {{name: bench-model, provider: fast}}
  - {{name: bench-stream, provider: slow, model: bench-model}}
"""


def fresh_database(admin_url: str, name: str = "aiproxy_bench") -> str:
    """A new, empty PostgreSQL database ``name`` on the server of ``admin_url``; its URL."""
    import asyncio

    import asyncpg  # installed with aiproxy

    plain = admin_url.replace("postgresql+asyncpg://", "postgresql://")

    async def recreate() -> None:
        conn = await asyncpg.connect(plain)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(recreate())
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


class Bench:
    def __init__(self, settings: Settings, work: Path) -> None:
        self.s = settings
        self.work = work
        self.procs = Processes()
        self.fast = self.slow = 0
        self.redis_url: str | None = None
        self.database_url: str | None = None

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    # ------------------------------------------------------------ the upstreams
    def start_upstreams(self) -> None:
        self.fast, self.slow = measure.free_port(), measure.free_port()
        for port, extra in ((self.fast, []), (self.slow, ["--chunk-delay-ms", str(self.s.chunk_delay_ms)])):
            proc = self.procs.start(measure.pinned(
                [sys.executable, str(measure.HERE / "upstream.py"), "--port", str(port),
                 "--tokens", str(self.s.tokens), *extra], LOAD_CORE), self.log(f"upstream-{port}"))
            measure.wait_first_200(port, proc, 10, {})

    def direct(self) -> Target:
        t = Target("direct to the fake upstream")
        for c in CONCURRENCY:
            t.load[c] = measure.wrk(self.fast, c, self.s.seconds, LOAD_CORE)
        t.stream = measure.streams(self.slow, self.s.streams, self.s.seconds * 3)
        return t

    # ------------------------------------------------------------ a gateway
    def gateway(self, name: str, cmd: list[str], port: int, auth: str | None, *, soak: bool,
                levels: tuple[int, ...] = CONCURRENCY, stream_model: str = "bench-stream",
                env: dict[str, str] | None = None, start_limit: float = 60, unique: bool = False) -> Target:
        t = Target(name)
        headers = {"authorization": f"Bearer {auth}"} if auth else {}
        proc = self.procs.start(measure.pinned(cmd, PROXY_CORE), self.log(name.replace(" ", "_")), env)
        try:
            t.cold_start_s = measure.wait_first_200(port, proc, start_limit, headers)
            t.rss_start_mb = measure.rss_mb(proc.pid)
            if unique:  # the staged configurations: every stage must show in the answer
                seen = measure.stage_headers(port, headers)
                missing = [h for h in STAGE_HEADERS if h not in seen]
                if missing or seen.get("x-aiproxy-cache") != "miss":
                    raise RuntimeError(f"{name}: a stage did not run (missing {missing}, saw {seen})")
            measure.wrk(port, 16, min(2.0, self.s.seconds), LOAD_CORE, auth, unique=unique)  # warm-up
            for c in levels:
                t.load[c] = measure.wrk(port, c, self.s.seconds, LOAD_CORE, auth, cpu_pid=proc.pid,
                                        unique=unique)
            t.stream = measure.streams(port, self.s.streams, self.s.seconds * 3, auth,
                                       model=stream_model)
            if soak:
                self.soak(t, port, auth, proc.pid, unique)
            t.rss_after_mb = measure.rss_mb(proc.pid)
        finally:
            self.procs.stop(proc)
        return t

    def soak(self, t: Target, port: int, auth: str | None, pid: int, unique: bool = False) -> None:
        """``soak_calls`` calls in slices, RSS sampled after each (bounded by ``soak_limit`` s)."""
        start = time.monotonic()
        t.rss_series = [measure.rss_mb(pid)]
        while t.soak_calls < self.s.soak_calls and time.monotonic() - start < self.s.soak_limit:
            got = measure.wrk(port, 16, min(3.0, self.s.seconds / 3), LOAD_CORE, auth, unique=unique)
            t.soak_calls += got.requests
            t.rss_series.append(measure.rss_mb(pid))

    def aiproxy(self, mode: str, soak: bool) -> Target:
        port = measure.free_port()
        path = self.work / f"{mode}.yaml"
        database_url = fresh_database(self.database_url) if mode == "stages-redis-pg" and \
            self.database_url else None
        path.write_text(config_yaml(self.fast, self.slow, mode, self.work, redis_url=self.redis_url,
                                    database_url=database_url).replace("PORT", str(port)))
        exe = shutil.which("aiproxy", path=str(Path(sys.executable).parent)) or "aiproxy"
        staged = mode != "bare"
        return self.gateway(f"aiproxy {mode}", [exe, "serve", "--config", str(path)], port,
                            VIRTUAL_KEY if staged else None, soak=soak, unique=staged)

    def transport(self, name: str) -> Target:
        port = measure.free_port()
        path = self.work / f"transport-{name}.yaml"
        path.write_text(config_yaml(self.fast, self.slow, "bare", self.work).replace("PORT", str(port)))
        cmd = [sys.executable, str(measure.HERE / "transports.py"), name, "serve", "--config", str(path)]
        return self.gateway(f"aiproxy bare, client {name}", cmd, port, None, soak=False, levels=(1, 16))

    def litellm(self) -> Target:
        import litellm_mode
        venv = litellm_mode.ensure_venv(measure.HERE / ".venvs" / "litellm", self.log("litellm-install"))
        port = measure.free_port()
        cmd, env = litellm_mode.command(venv, self.work, port, self.fast, self.slow)
        t = self.gateway("LiteLLM proxy", cmd, port, MASTER_KEY, soak=False, env=env, start_limit=180)
        t.note = f"litellm {litellm_mode.version(venv)}, one worker (`--num_workers 1`), master key only"
        return t


def _target(data: dict[str, Any]) -> Target:
    t = Target(**{k: v for k, v in data.items() if k not in ("load", "stream")})
    t.load = {int(c): Load(**x) for c, x in data.get("load", {}).items()}
    t.stream = Stream(**data["stream"]) if data.get("stream") else None
    return t


def from_json(path: Path) -> dict[str, Any]:
    """A run's results as ``main`` saved them (bench/results/raw/full.json), to write the
    table again (``--from-json``) after a change to the report's wording, not its figures."""
    raw = json.loads(path.read_text())
    out: dict[str, Any] = {"machine": raw["machine"], "settings": raw["settings"]}
    for name, value in raw.items():
        if name in ("machine", "settings"):
            continue
        out[name] = [_target(t) for t in value] if isinstance(value, list) else _target(value)
    return out


def machine() -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "?")
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"cpus": str(os.cpu_count()), "cpu": model, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "wrk": wrk.strip() or "wrk",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": loadavg()}


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages: other work on the machine skews every figure."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short points and a 10,000-call soak")
    parser.add_argument("--compare", choices=["litellm"], help="also measure another gateway")
    parser.add_argument("--no-transports", action="store_true", help="skip the upstream-client comparison")
    parser.add_argument("--redis-url", help="with --database-url: also run all stages on this Redis "
                                            "(e.g. redis://127.0.0.1:6379/14) and PostgreSQL")
    parser.add_argument("--database-url", help="a PostgreSQL server the bench may create the database "
                                               "aiproxy_bench on (postgresql+asyncpg://user@host/db)")
    parser.add_argument("--out", type=Path, help="markdown results (default bench/RESULTS.md; "
                                                  "--quick: bench/results/raw/quick.md)")
    parser.add_argument("--from-json", type=Path, help="write the table again from a saved run's "
                                                       "results (bench/results/raw/full.json)")
    args = parser.parse_args()
    if args.from_json:
        quick = args.from_json.name.startswith("quick")
        raw_md = measure.HERE / "results" / "raw" / "quick.md"
        out = args.out or (raw_md if quick else measure.HERE / "RESULTS.md")
        out.write_text(report.markdown(from_json(args.from_json), quick=quick))
        print(f"bench: results in {out}")
        return 0
    signal.signal(signal.SIGTERM, _interrupted)  # stop what we started, as on Ctrl-C
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed: `sudo apt-get install -y wrk` (Debian/Ubuntu) "
              "or `brew install wrk`", file=sys.stderr)
        return 2
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > PROXY_CORE:
        # the streaming client runs in this process: keep it off the gateway's core, with wrk
        os.sched_setaffinity(0, {LOAD_CORE})
    settings = Settings(seconds=3, soak_calls=10_000, soak_limit=40, streams=50) if args.quick else \
        Settings(seconds=10, soak_calls=100_000, soak_limit=180, streams=200)
    raw = measure.HERE / "results" / "raw"
    out = args.out or (raw / "quick.md" if args.quick else measure.HERE / "RESULTS.md")
    with tempfile.TemporaryDirectory(prefix="aiproxy-bench-") as tmp:
        bench = Bench(settings, Path(tmp))
        results: dict[str, Any] = {"machine": machine(), "settings": asdict(settings)}
        try:
            bench.start_upstreams()
            step = print
            step("direct …", flush=True)
            results["direct"] = bench.direct()
            bench.redis_url, bench.database_url = args.redis_url, args.database_url
            modes = MODES if args.redis_url and args.database_url else MODES[:2]
            for mode in modes:
                step(f"aiproxy {mode} …", flush=True)
                results[mode] = bench.aiproxy(mode, soak=True)
            results["transports"] = []
            if not args.no_transports:
                for name in TRANSPORTS:
                    step(f"client {name} …", flush=True)
                    try:
                        results["transports"].append(bench.transport(name))
                    except Exception as exc:  # e.g. aiohttp not installed: say so, carry on
                        failed = Target(f"aiproxy bare, client {name}", note=str(exc)[:200])
                        results["transports"].append(failed)
            if args.compare == "litellm":
                step("LiteLLM proxy …", flush=True)
                try:
                    results["litellm"] = bench.litellm()
                except Exception as exc:
                    results["litellm"] = Target("LiteLLM proxy", note=str(exc)[:300])
        finally:
            bench.procs.stop_all()
            raw.mkdir(parents=True, exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                shutil.copy(log, raw / log.name)
    results["machine"]["load_end"] = loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.markdown(results, quick=args.quick))
    (raw / ("quick.json" if args.quick else "full.json")).write_text(
        json.dumps(results, default=lambda o: asdict(o), indent=1))
    print(f"bench: results in {out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
