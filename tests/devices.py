"""Running a test script in a fresh process that sees several (simulated) CPU devices."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_cpu_devices(script: str, count: int = 8, timeout: int = 600) -> str:
  """Runs ``script`` with ``count`` XLA:CPU devices from the repo root; returns its stdout.

  XLA fixes the device count when the backend starts, so this needs its own process.
  """
  flags = f"--xla_force_host_platform_device_count={count}"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-c", script]
  result = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout
