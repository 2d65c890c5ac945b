"""``--compare litellm``: the LiteLLM proxy in its own virtual environment, on the same fake upstream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGE = os.environ.get("BENCH_LITELLM", "litellm[proxy]")


def ensure_venv(venv: Path, log: Path) -> Path:
    """``bench/.venvs/litellm`` with the LiteLLM proxy installed (once; gitignored)."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return venv
    with log.open("ab") as out:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", PACKAGE],
                              stdout=out, stderr=out, timeout=1200)
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"could not install {PACKAGE} into {venv}: see {log}")
    return venv


def version(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"


def command(venv: Path, work: Path, port: int, fast: int, slow: int) -> tuple[list[str], dict[str, str]]:
    config = work / "litellm.yaml"
    config.write_text(f"""model_list:
  - model_name: bench-model
    litellm_params:
      {{model: openai/bench-model, api_base: "http://127.0.0.1:{fast}/v1", api_key: sk-bench-upstream}}
  - model_name: bench-stream
    litellm_params:
      {{model: openai/bench-model, api_base: "http://127.0.0.1:{slow}/v1", api_key: sk-bench-upstream}}
general_settings:
  master_key: sk-bench-master-key
litellm_settings:
  telemetry: false
""")
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", "1"]
    return cmd, env
