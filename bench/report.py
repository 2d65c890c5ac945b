"""bench/RESULTS.md from one run's measurements."""

from __future__ import annotations

from typing import Any

from measure import Load

NOTES = """\
## What the profiles showed (py-spy)

- **Before** (aiproxy bare, wrk c16, `httpx.AsyncClient` over httpcore): about 60 % of the
  gateway's CPU was the upstream client. httpcore's pool asks every pooled connection, on
  every request, whether it has expired (`_assign_requests_to_connections` → `has_expired`
  → anyio `get_extra_info` and a readability check of the socket), so its cost grows with
  the pool: with 16 connections in flight, 1.5-2.4 ms of CPU per call (the table above).
  `AsyncClient.send` / `build_request` re-parsed the URL (`_merge_url`, 8 %), walked the
  cookie jar and extracted cookies from every answer (`extract_cookies`, 7 %), and ran the
  auth and redirect machinery. httpcore2 (under `httpx2`) has the same pool design; the
  aiohttp session is the best of the off-the-shelf clients but still costs more per call
  than aiproxy's transport.
- **After**: `aiproxy.transport.Transport` keeps idle connections in a per-origin list that
  the event loop prunes (`connection_lost`), so taking one is a `list.pop`; httptools parses
  the answer in `data_received`. `aiproxy.upstream_client.UpstreamClient` sends providers'
  requests straight to the transport, caches parsed URLs and reads a plain whole body
  without httpx's decoder chain. What is left is spread thin: the socket writes of uvicorn
  and of the transport (syscalls, ~14 %), Starlette's request/response objects and
  middleware stack, building the `httpx.Request` (headers normalised once), the stages.
- **Pauses**: with the provider SDKs, SQLAlchemy and the plugins loaded, every full
  collection walked every start-up object again: ~100 ms pauses every few seconds under
  load (timed with `gc.callbacks`, stages config). `aiproxy serve` now freezes the start-up heap
  (`gc.freeze()`); full collections then take ~2 ms.
- **Streaming** (sequential streams, bare): uvicorn's write per event (13 %, a syscall each)
  and Starlette's `StreamingResponse` (a task group plus a disconnect listener per stream,
  ~28 % together) dominated; the transport's share was ~4 %. Streams now go out through
  `aiproxy.sse.EventStream` (one plain watcher task per stream notices a client that
  left): the added first event went from 1.10 ms to 0.72-0.79 ms in the next full run.
  The benchmark's own streaming client now runs on the load core too (it had been free
  to land on the gateway's core).
- **Every stage on** (stages config, wrk c16, 2026-11-27): the stages take about a quarter of
  the gateway's samples. Before-call ~10 % (quotas 4.7 %, limits 4.0 %: each estimates the
  prompt's tokens on its own, then takes its counters), the cache lookup ~3.4 % (hashing the
  normalised body 2.1 %), after-call and cache-store ~8.6 % (cost 2.1 %, metrics 1.2 %,
  quotas 1.1 %, limits 0.5 %, usage 0.5 %), virtual-key auth 1.3 %; the usage log's batched
  SQLite writes ~3 % (its writer thread). No single stage dominates: what is left is Python's
  per-hook and per-coroutine cost, so the next step is fewer awaits per call (sync hooks
  where a stage does no I/O) and one shared prompt-token estimate per call. With Redis each
  call makes five round trips (limits take and settle, quotas reserve and settle, cache
  get; the cache set is in the background), and redis-py's per-command machinery
  (`execute_command`, connection pool, packing) is ~30 % of samples: a lean RESP client or
  fewer round trips per call is where that configuration's CPU is.
- **Same machine, before and after** (2026-11-28): the machine of the run above served the
  fake upstream at 27.7k req/s (the previous committed run's: 47.9k) and the LiteLLM proxy
  at 35 req/s (there: 64), so every CPU figure is higher for the machine alone. Measured
  right after the run, interleaved on the same machine (wrk c16, 3 x 6 s each, twice), CPU
  per request of the previous commit (6f048e3) and of this one: all stages on 1.11-1.15 ms
  then 0.74-0.76 ms; bare 0.54-0.62 ms then 0.29-0.35 ms. On the previous run's machine
  (0.666 ms all stages on for 6f048e3) that is about 0.44 ms.
- **Counting instructions instead of sampling** (2026-11-28): on a 2-vCPU machine shared with
  other work, CPU time per request moved by 2x between identical runs, and py-spy's samples
  overstate code that makes system calls (`os.urandom` showed as 5 % of samples, ~1 µs in
  fact). [bench/instructions.py](instructions.py) runs `aiproxy serve` under callgrind and
  counts the instructions per request (the same to within ~2 % run to run, whatever else the
  machine does). All stages on, per request: 1,598,793 at the start of that session, then
  1,104,635; bare 879,903 then 534,776. What went:
  - building the upstream `httpx.Request` and `httpx.Response` (headers normalised twice, the
    URL copied, the content encoder, Host and Content-Length added by rebuilding the header
    list): `aiproxy.httpx_lean` fills in the same attributes directly, checked at import
    against httpx's constructors (it falls back to them if an httpx release differs);
  - Starlette's middleware stack, route walk and exception wrappers for the hot POST routes
    (`aiproxy.app.App`: ~10 % of the bare path in process);
  - the disconnect watcher task of every call: it now starts only after 20 ms
    (`WATCH_AFTER`), so a call answered sooner never makes one. Note that this benchmark's
    upstream answers at once, so it never measures the watcher; a call slower than 20 ms pays
    ~10 µs for it;
  - coroutines of stages that do no I/O in process (quotas, the cache lookup) and per-hook
    argument lists and `isawaitable` checks;
  - the usage log's SQLite writes: SQLAlchemy's per-row bind processing (rows now go to
    sqlite3's `executemany` as stored), and random `uid`s that landed every insert on a
    different page of the unique index (they now lead with their time);
  - `os.urandom` for every request id (a per-process prefix and a counter now).
  What is left is spread over uvicorn (its per-request task, header validation by regex),
  the stages (limits ~10 %, keys, cost, metrics, usage rows a few % each) and Python's own
  call overhead; SQLite's own work is ~3 % of the instructions.
"""

def _ms(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _load(t: Any, c: int) -> Load | None:
    return t.load.get(c) if t is not None else None


def _added(t: Any, d: Any, c: int, which: str) -> float | None:
    a, b = _load(t, c), _load(d, c)
    return None if a is None or b is None else getattr(a, which) - getattr(b, which)


def _peak(t: Any) -> float | None:
    rps = [x.rps for x in t.load.values()] if t is not None else []
    return max(rps) if rps else None


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def targets(r: dict[str, Any]) -> list[str]:
    s, d, lite = r.get("stages"), r["direct"], r.get("litellm")
    cpu = _load(s, 16).cpu_ms_per_req if _load(s, 16) else None
    add1 = _added(s, d, 1, "p50_ms")
    p99_16 = _added(s, d, 16, "p99_ms")
    peak, dpeak, lpeak = _peak(s), _peak(d), _peak(lite) if lite is not None and lite.load else None
    ttft = (s.stream.ttft_ms - d.stream.ttft_ms) if s and s.stream and d.stream else None
    series = s.rss_series if s else []
    growth = (max(series) - series[1]) if len(series) > 2 else None
    rows = [
        ("proxy CPU per non-streaming request (c16)", "≤ 0.6 ms", f"{_ms(cpu, 3)} ms",
         cpu is not None and cpu <= 0.6),
        ("added latency p50, concurrency 1", "≤ 1 ms", f"{_ms(add1, 3)} ms",
         add1 is not None and add1 <= 1),
        ("added latency p99, concurrency 16", "≤ 5 ms", f"{_ms(p99_16)} ms",
         p99_16 is not None and p99_16 <= 5),
        ("throughput vs LiteLLM proxy (1 worker each)", "≥ 30x",
         f"{peak / lpeak:.1f}x ({peak:.0f} vs {lpeak:.0f} req/s)" if peak and lpeak else
         "not run (`--compare litellm`)" if lite is None else f"LiteLLM failed: {lite.note}",
         (peak / lpeak >= 30) if peak and lpeak else None),
        ("throughput vs direct to upstream", "≥ 40 %",
         f"{100 * peak / dpeak:.1f} % ({peak:.0f} vs {dpeak:.0f} req/s)" if peak and dpeak else "-",
         (peak / dpeak >= 0.4) if peak and dpeak else None),
        ("streaming first token added", "≤ 1 ms", f"{_ms(ttft, 3)} ms", ttft is not None and ttft <= 1),
        ("RSS per worker after the soak", "≤ 120 MB", f"{_ms(s.rss_after_mb if s else None, 1)} MB",
         s is not None and s.rss_after_mb is not None and s.rss_after_mb <= 120),
        (f"RSS growth over {s.soak_calls if s else 0:,} calls (after the first slice)", "flat",
         f"{_ms(growth, 1)} MB", None if growth is None else growth <= 5),
        ("cold start to first 200", "≤ 1.5 s", f"{_ms(s.cold_start_s if s else None, 2)} s",
         s is not None and s.cold_start_s is not None and s.cold_start_s <= 1.5),
    ]
    why = _reasons(r, cpu, add1, dpeak, peak)
    out = ["| target (all stages on) | goal | measured | | why, when not met |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {_verdict(ok)} | {why.get(a.split(' (')[0], '') if ok is False else ''} |"
            for a, b, c, ok in rows]
    return out


def _reasons(r: dict[str, Any], cpu: float | None, add1: float | None, dpeak: float | None,
             peak: float | None = None) -> dict[str, str]:
    """Why a target can be missed, in this run's own figures."""
    load = r["machine"].get("load_start", "?")
    floor = 1e6 / (0.4 * dpeak) if dpeak else None
    bare = r.get("bare")
    bare_cpu = _load(bare, 16).cpu_ms_per_req if _load(bare, 16) else None
    staged = (f"bare (no stage) is {bare_cpu:.3f} ms here; every stage on adds {cpu - bare_cpu:.3f} ms "
              "(auth, limits with a token estimate and settle, quotas, a cache lookup and store, cost, "
              "metrics, and the usage log's SQLite writes in the same process). CPU time per request "
              f"follows the machine: straight to the fake upstream served {dpeak:,.0f} req/s in this run; "
              "see \"Same machine, before and after\" below for this code against the previous one on it"
              if cpu and bare_cpu and dpeak else f"load average at the start {load}")
    bare_peak = _peak(bare)
    lite = r.get("litellm")
    lpeak = _peak(lite) if lite is not None and lite.load else None
    return {
        "proxy CPU per non-streaming request": staged,
        "throughput vs LiteLLM proxy": (
            f"with every stage on, one worker serves {peak:.0f} req/s; bare it serves {bare_peak:.0f} "
            f"({bare_peak / lpeak:.0f}x); LiteLLM ran with a master key only"
            if peak and bare_peak and lpeak else ""),
        "added latency p99, concurrency 16": (
            f"16 calls in flight on one core queue behind each other: p50 alone is about 16 x CPU per "
            f"call = {16 * cpu:.1f} ms, and p99 adds collector and scheduler jitter (load average at "
            f"the start {load})" if cpu else ""),
        "throughput vs direct to upstream": (
            f"the fake answers pre-encoded bytes from raw asyncio; 40 % of it is {floor:.0f} µs per call "
            f"through the gateway, while the bare gateway (no stage) spends {bare_cpu * 1000:.0f} µs of "
            "CPU per call: parsing and answering HTTP in Python on both sides costs more than that "
            "alone; more workers scale it per core" if floor and bare_cpu else ""),
        "streaming first token added": (
            f"the non-streaming added p50 at c1 is {_ms(add1, 3)} ms; the rest is the streaming path "
            "above the transport (the response and its disconnect watcher, the gateway's relay, the "
            "provider's SSE re-framing), see the profile below"),
        "cold start to first 200": (
            "imports (SQLAlchemy, the provider SDKs' types, …): `python -X importtime -m aiproxy`"),
    }


def _series(values: list[float], points: int = 8) -> str:
    """At most ``points`` evenly spaced samples, first and last included."""
    if not values:
        return "-"
    step = max(1, -(-(len(values) - 1) // (points - 1)))  # ceiling division
    picked = values[::step]
    if picked[-1] is not values[-1]:
        picked.append(values[-1])
    return " → ".join(f"{x:.1f}" for x in picked)


def load_table(r: dict[str, Any], rows: list[Any], levels: tuple[int, ...] = (1, 16, 64)) -> list[str]:
    head = "| | " + " | ".join(f"c{c} p50 / p99 ms | c{c} req/s" for c in levels) + " | CPU ms/req (c16) |"
    out = [head, "|---" * (2 * len(levels) + 2) + "|"]
    for t in rows:
        if t is None:
            continue
        if not t.load:
            out.append(f"| {t.name} | " + " | ".join("-" for _ in range(2 * len(levels))) + f" | {t.note} |")
            continue
        cells = []
        for c in levels:
            x = t.load.get(c)
            if x is None:
                cells += ["-", "-"]
                continue
            errors = f" (**{x.errors:,} errors**)" if x.errors else ""
            cells += [f"{x.p50_ms:.2f} / {x.p99_ms:.2f}", f"{x.rps:,.0f}{errors}"]
        c16 = t.load.get(16)
        cpu = _ms(c16.cpu_ms_per_req, 3) if c16 and c16.cpu_ms_per_req is not None else "-"
        out.append(f"| {t.name} | " + " | ".join(cells) + f" | {cpu} |")
    return out


def markdown(r: dict[str, Any], quick: bool) -> str:
    m, st, d = r["machine"], r["settings"], r["direct"]
    gateways = [r.get("bare"), r.get("stages"), r.get("stages-redis-pg"), r.get("litellm")]
    lines = [
        "# aiproxy benchmark results" + (" (quick run)" if quick else ""),
        "",
        f"Measured {m['date']} on {m['cpus']} vCPU ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['wrk']}. Reproduce: `make bench` (or `python bench/run.py --quick`; "
        "`--compare litellm` adds the LiteLLM proxy). How it works: [bench/run.py](run.py). "
        f"Load average (1, 5, 15 min) at the start {m.get('load_start', '?')}, at the end "
        f"{m.get('load_end', '?')}: on a 2-vCPU machine anything above ~0.5 is other work "
        "competing with the run, and every figure below is worse for it.",
        "",
        f"Setup: the fake upstream ([bench/upstream.py](upstream.py), zero latency, {st['tokens']} tokens) "
        "and wrk share core 0; the gateway runs one worker pinned to core 1. wrk is a closed loop of "
        f"c connections for {st['seconds']:g} s per point; latencies are wrk's. Added latency = through the "
        "gateway minus straight to the upstream at the same concurrency, in the same run. CPU per request is "
        "the gateway process's utime+stime over the point divided by its requests. Streaming: "
        f"{st['streams']} streams one after another from a small asyncio client, upstream chunks "
        f"{st['chunk_delay_ms']:g} ms apart.",
        "",
        "**Configurations.** *bare*: no master key, no stage plugin (keys, database, limits, quotas, "
        "cache, cost, usage, metrics disabled); the openai provider to the fake. *stages* (the targets "
        "are for it): every stage on, in process: a master key; each call authenticated by a virtual "
        "key (`keys.required`, a declared key of tier enterprise, looked up in the in-process key cache); "
        "rate limits on requests and tokens per minute for the key, its user and tenant (tokens "
        "estimated before, settled after), a monthly token plan and a USD budget, all far above what "
        "the run reaches; the response cache looked up and missed on every call (every body differs, "
        "temperature 0) then stored; cost priced; one usage-log row per call written in batches to "
        "SQLite; Prometheus metrics. *stages-redis-pg*: the same with `redis.url` set (limits, quotas, "
        "cache, cost spend and cooldowns in Redis) and the database on PostgreSQL "
        "(`--redis-url` / `--database-url`)."
        + (f" *LiteLLM proxy*: {r['litellm'].note}, in its own virtual environment "
           "(bench/.venvs/litellm), on the same fake upstream." if r.get("litellm") and r["litellm"].load
           else ""),
        "",
        "## Targets",
        "",
        *targets(r),
        "",
        "## Non-streaming load",
        "",
        *load_table(r, [d, *gateways]),
        "",
        "Added latency (gateway - direct), ms:",
        "",
        "| | c1 p50 | c1 p99 | c16 p50 | c16 p99 | c64 p50 | c64 p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in gateways:
        if t is not None and t.load:
            cells = [_ms(_added(t, d, c, w), 3) for c in (1, 16, 64) for w in ("p50_ms", "p99_ms")]
            lines.append(f"| {t.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Streaming", "", "| | first event p50 ms | added | gap between events p50 ms | added |",
              "|---|---|---|---|---|"]
    for t in [d, *gateways]:
        if t is not None and t.stream is not None:
            ds = d.stream
            added_first = "" if t is d else _ms(t.stream.ttft_ms - ds.ttft_ms, 3)
            added_gap = "" if t is d else _ms(t.stream.gap_ms - ds.gap_ms, 3)
            lines.append(f"| {t.name} | {t.stream.ttft_ms:.3f} | {added_first} | {t.stream.gap_ms:.3f} | "
                         f"{added_gap} |")
    lines += ["", "## Start-up and memory", "",
              "| | cold start to first 200 | RSS at start | RSS after | soak calls "
              "| RSS over the soak (MB) |",
              "|---|---|---|---|---|---|"]
    for t in gateways:
        if t is not None and t.cold_start_s is not None:
            series = _series(t.rss_series)
            lines.append(f"| {t.name} | {t.cold_start_s:.2f} s | {_ms(t.rss_start_mb, 1)} MB | "
                         f"{_ms(t.rss_after_mb, 1)} MB | {t.soak_calls:,} | {series} |")
    if r.get("transports"):
        lines += ["", "## Choosing the upstream client (aiproxy bare, same run)", "",
                  "Each is served by `bench/transports.py NAME serve`; see that file for what each name is.",
                  "", *load_table(r, r["transports"], levels=(1, 16))]
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"
