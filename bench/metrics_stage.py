"""Per-call cost of the metrics stage: after-call and on-error recording, µs/call.

    python bench/metrics_stage.py            # one process, then multiprocess mode (mmap files)

Builds the stage's Instruments as the app does, records a whole answer, a stream and an
error N times with time.perf_counter, best of 7. Each mode runs in its own interpreter
(prometheus-client picks its value class at import from PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

N = 50_000


def measure() -> dict[str, float]:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry
    from starlette.datastructures import Headers

    from aiproxy.builtin.metrics.instruments import Instruments
    from aiproxy.builtin.metrics.settings import MetricsSettings
    from aiproxy.call import Call, Principal, Usage
    from aiproxy.errors import ProxyError

    instruments = Instruments(MetricsSettings(), CollectorRegistry())
    deployment: object = SimpleNamespace(name="gpt-4o", provider=SimpleNamespace(name="openai"))

    def call(stream: bool) -> Call:
        c = Call(request_id="r", operation="chat", body={}, model="gpt-4o", stream=stream, headers=Headers())
        c.deployment = deployment  # type: ignore[assignment]
        c.principal = Principal(id="k", tenant="acme")
        c.usage = Usage(120, 40, 160)
        c.cost = 0.0012
        c.response_headers["x-aiproxy-cache"] = "miss"
        c.finished = c.started + 0.8
        if stream:
            c.first_byte = c.started + 0.2
        return c

    whole, streamed = call(False), call(True)
    error = ProxyError(502, "upstream failed")
    out = {}
    for name, run in (("after-call, whole", lambda: instruments.answered(whole)),
                      ("after-call, stream", lambda: instruments.answered(streamed)),
                      ("on-error", lambda: instruments.failed(whole, error))):
        best = float("inf")
        for _ in range(7):
            began = time.perf_counter()
            for _ in range(N):
                run()
            best = min(best, time.perf_counter() - began)
        out[name] = best / N * 1e6
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        for name, us in measure().items():
            print(f"  {name:<20} {us:6.2f} µs/call")
        return
    print("one process:")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    subprocess.run([sys.executable, __file__, "--child"], env=env, check=True)
    with tempfile.TemporaryDirectory(prefix="aiproxy-metrics-bench-") as shared:
        print("multiprocess mode (several workers):")
        subprocess.run([sys.executable, __file__, "--child"], env={**env, "PROMETHEUS_MULTIPROC_DIR": shared},
                       check=True)


if __name__ == "__main__":
    main()
