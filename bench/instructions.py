"""Instructions per request of a real ``aiproxy serve``, counted by valgrind (callgrind).

CPU time per request moves with whatever else the machine runs (a busy sibling core can
double it); the instructions a request executes do not. This starts the fake upstream
and ``aiproxy serve`` under callgrind (instrumentation off during start-up), warms up,
counts the instructions of the gateway process (all its threads; not the kernel's work)
over a wrk run, and prints instructions per request. Slow (the gateway runs ~50x slower
under valgrind), so the run is short; the count per request barely moves between runs.

    python bench/instructions.py stages                  # this checkout
    python bench/instructions.py bare --src /other/src   # another checkout, to compare

Needs valgrind (``apt-get install valgrind``) and wrk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import run as bench


def count(mode: str, src: Path, conns: int, seconds: float) -> tuple[int, int]:
    """(instructions, requests) of one counted wrk run against ``mode`` served from ``src``."""
    work = Path(tempfile.mkdtemp(prefix="aiproxy-instructions-"))
    procs = measure.Processes()
    try:
        fast, slow = measure.free_port(), measure.free_port()
        for port in (fast, slow):
            up = procs.start([sys.executable, str(measure.HERE / "upstream.py"), "--port", str(port),
                              "--tokens", "32"],
                             work / f"upstream-{port}.log")
            measure.wait_first_200(port, up, 10, {})
        port = measure.free_port()
        config = work / f"{mode}.yaml"
        config.write_text(bench.config_yaml(fast, slow, mode, work).replace("PORT", str(port)))
        out = work / "callgrind.out"
        exe = shutil.which("aiproxy", path=str(Path(sys.executable).parent)) or "aiproxy"
        proc = procs.start(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                            f"--callgrind-out-file={out}", sys.executable, exe, "serve", "--config",
                            str(config)], work / "gateway.log", {**os.environ, "PYTHONPATH": str(src)})
        staged = mode != "bare"
        auth = bench.VIRTUAL_KEY if staged else None
        measure.wait_first_200(port, proc, 300, {"authorization": f"Bearer {auth}"} if auth else {})
        measure.wrk(port, conns, 10, None, auth, unique=staged)  # warm-up, not counted
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True, check=True)
        load = measure.wrk(port, conns, seconds, None, auth, unique=staged)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], capture_output=True, check=True)
        procs.stop(proc)
        total = 0
        for dump in work.glob("callgrind.out*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        if load.errors or not load.requests or not total:
            raise RuntimeError(f"no clean count: {load}, {total} instructions (see {work})")
        return total, load.requests
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=bench.MODES[:2])
    parser.add_argument("--src", type=Path, default=measure.HERE.parent / "src",
                        help="the aiproxy source to run (another checkout's src, to compare)")
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            print(f"instructions: {tool} is not installed", file=sys.stderr)
            return 2
    started = time.monotonic()
    total, requests = count(args.mode, args.src.resolve(), args.conns, args.seconds)
    print(f"{args.mode}: {total / requests:,.0f} instructions per request "
          f"({requests} requests, {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
