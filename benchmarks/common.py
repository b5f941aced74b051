"""Shared pieces of the benchmark suite: boxes, timing, memory, bandwidth."""

from __future__ import annotations

import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def proposals(rng, k, n, image_h, image_w, min_size=16.0, max_factor=1.0, max_size=None):
  """Region-proposal-like boxes: centers uniform over the image, sides log-uniform
  between ``min_size`` px and the image size (or ``max_size`` px), clipped to the image.

  With ``max_factor > 1`` sides reach ``max_factor`` times the image and boxes
  are not clipped (boxes larger than the map)."""
  centers = rng.uniform(0, 1, (k, 2)) * [image_w, image_h]
  top = np.log(np.array([image_w, image_h]) * max_factor)
  if max_size is not None:
    top = np.log(np.array([max_size, max_size]))
  sizes = np.exp(rng.uniform(np.log(min_size), top, (k, 2)))
  lo, hi = centers - sizes / 2, centers + sizes / 2
  if max_factor <= 1:
    lo, hi = np.clip(lo, 0, [image_w, image_h]), np.clip(hi, 0, [image_w, image_h])
  boxes = np.concatenate([lo, hi], 1).astype(np.float32)
  return boxes, rng.integers(0, n, k).astype(np.int32)


def scaled_boxes(rng, k, n, image_h, image_w, factor):
  """Boxes ``factor`` times the image in each side, centred at a random point within
  10% of the image centre (``factor = 10``: mostly outside the map)."""
  centers = (0.5 + rng.uniform(-0.1, 0.1, (k, 2))) * [image_w, image_h]
  half = np.array([image_w, image_h]) * factor / 2
  boxes = np.concatenate([centers - half, centers + half], 1).astype(np.float32)
  return boxes, rng.integers(0, n, k).astype(np.int32)


# Untimed calls before timing: at least this many, and for at least this long.
WARM_UP_CALLS = 2
WARM_UP_S = 0.3


def median_ms(fn, repeats):
  """Median wall time of ``fn()`` in ms over ``repeats`` runs, after a warm-up.

  The warm-up calls ``fn`` at least ``WARM_UP_CALLS`` times and for at least
  ``WARM_UP_S`` seconds. A single warm-up call was measured too short: both
  libraries' first calls of a program run slower while the allocator
  settles (glibc maps each new large buffer afresh until its dynamic mmap
  threshold has grown past it, and each such buffer then costs its page
  faults). On a 2-core Intel Xeon, R-FCN ``ps_roi_align``'s forward took
  31, 11, 5, 8, 4, 8 ms in its first calls and then 4 ms; torchvision's
  VGG16 ``roi_pool`` forward+backward 118, 61, 43, 41 ms and then 38 ms.
  A median of 5 calls after one warm-up call then times that settling, not
  the steady state a training loop runs in.

  Each implementation is timed in a block of its own calls, in its steady
  state. Alternating the calls of two implementations, round after round, was
  tried to share the machine's load between them, and measured a call that
  follows the other's large one slower: in three trials, roi_align_rotated's
  forward on the rotated-boxes config took 20-23 ms alternated with the
  reference's calls (even after an untimed call of its own) and mostly 10-13
  ms in blocks. The fastest of the runs instead of the median was also tried:
  the load comes in spells of seconds, so it did not steady the results either.
  """
  start, calls = time.perf_counter(), 0
  while calls < WARM_UP_CALLS or time.perf_counter() - start < WARM_UP_S:
    fn()
    calls += 1
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def peak_bytes(jitted, *args):
  """Peak memory of a compiled function by XLA's memory analysis: its
  arguments, outputs and temporaries, less what outputs alias."""
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    return None
  return (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def copy_bandwidth(megabytes=256, repeats=10):
  """Memory bandwidth in bytes/s measured by ``y = x + 1`` over a large array
  (every byte read once and written once), on the default device."""
  x = jnp.zeros(megabytes * 2**20 // 4, jnp.float32)
  add = jax.jit(lambda x: x + 1)
  ms = median_ms(lambda: jax.block_until_ready(add(x)), repeats)
  return 2 * x.nbytes / (ms / 1e3)


def machine():
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = f"{names[0]}, {len(names)} cores" if names else cpu
  except OSError:
    pass
  kind = device.device_kind if device.platform != "cpu" else cpu
  return f"{device.platform.upper()}: {kind}; jax {jax.__version__}"
