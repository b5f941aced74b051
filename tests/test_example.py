"""The Fast R-CNN example trains (loss falls) and its data-parallel step equals one device."""

import importlib.util
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fast_rcnn.py"


def _load_example():
  spec = importlib.util.spec_from_file_location("fast_rcnn_example", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("pool", ["align", "pool"])
def test_loss_falls_on_a_tiny_run(pool):
  example = _load_example()
  _, history = example.train(steps=40, pool=pool, batch=4, log_every=1, out=io.StringIO())
  losses = [loss for _, loss, _ in history]
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


SHARDED = """
import importlib.util, io, sys
import jax, numpy as np
from jax.sharding import Mesh
assert len(jax.devices()) == 8, jax.devices()
spec = importlib.util.spec_from_file_location("ex", {path!r})
ex = importlib.util.module_from_spec(spec)
sys.modules["ex"] = ex
spec.loader.exec_module(ex)
mesh = Mesh(np.array(jax.devices()), ("data",))
single, h1 = ex.train(steps=3, batch=8, log_every=1, out=io.StringIO())
sharded, h2 = ex.train(steps=3, batch=8, log_every=1, mesh=mesh, out=io.StringIO())
for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
np.testing.assert_allclose([l for _, l, _ in h1], [l for _, l, _ in h2], rtol=1e-4)
print("sharded == single")
"""


def test_data_parallel_step_on_8_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = SHARDED.format(path=str(EXAMPLE))
  result = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded == single" in result.stdout
