"""``aiproxy serve`` as an operator runs it: several workers, clean shutdown, clear failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def _serve(config: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPROXY_") and not k.endswith("_API_KEY")}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "aiproxy", "serve", "--config", str(config), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=config.parent)


def test_several_workers_serve_and_stop_cleanly_on_sigterm(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "config.yaml").read_text())
    port = free_port()
    log = tmp_path / "serve.log"
    process = _serve(config, "--port", str(port), "--workers", "2", log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, log)
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as http:
            answers = [http.post("/v1/chat/completions", json={
                "model": "mock-gpt", "messages": [{"role": "user", "content": "same question"}]})
                for _ in range(20)]
        assert all(r.status_code == 200 for r in answers)
        assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1  # deterministic
        deadline = time.monotonic() + 20  # workers start in parallel; on a busy machine the
        while log.read_text().count("Started server process") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # second can finish importing well after the first answers
        text = log.read_text()
        assert text.count("Started server process") == 2  # two workers
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_a_bad_config_stops_serve_before_it_listens(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  - {name: x, provider: nowhere}\n")
    log = tmp_path / "serve.log"
    process = _serve(config, "--port", str(free_port()), log=log)
    assert process.wait(30) == 2
    assert "models[0].provider: no provider named 'nowhere'" in log.read_text()


def test_a_broken_plugin_stops_serve_naming_the_file(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "oops.py").write_text("raise RuntimeError('half-written plugin')\n")
    config = tmp_path / "config.yaml"
    config.write_text("providers: {mock: {plugin: mock}}\nmodels: [{name: m, provider: mock}]\n")
    log = tmp_path / "serve.log"
    process = _serve(config, "--port", str(free_port()), log=log)
    assert process.wait(30) == 2
    text = log.read_text()
    assert "oops.py: failed to import: RuntimeError: half-written plugin" in text
    assert "Traceback" not in text
