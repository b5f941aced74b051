"""Shared pieces of the benchmark scripts: boxes, timing, compiled memory, tables."""

from __future__ import annotations

import platform
import statistics
import time

import jax
import numpy as np


def proposals(rng, k, n, image_h, image_w, min_size=16.0, max_factor=1.0):
  """Region-proposal-like boxes: centers uniform over the image, sides log-uniform
  between ``min_size`` px and the image size, clipped to the image.

  With ``max_factor > 1`` sides reach ``max_factor`` times the image and boxes
  are not clipped (boxes larger than the map)."""
  centers = rng.uniform(0, 1, (k, 2)) * [image_w, image_h]
  top = np.log(np.array([image_w, image_h]) * max_factor)
  sizes = np.exp(rng.uniform(np.log(min_size), top, (k, 2)))
  lo, hi = centers - sizes / 2, centers + sizes / 2
  if max_factor <= 1:
    lo, hi = np.clip(lo, 0, [image_w, image_h]), np.clip(hi, 0, [image_w, image_h])
  boxes = np.concatenate([lo, hi], 1).astype(np.float32)
  return boxes, rng.integers(0, n, k).astype(np.int32)


def median_ms(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def temp_bytes(jitted, *args):
  """Scratch memory XLA allocates for a compiled function (its memory analysis)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return getattr(analysis, "temp_size_in_bytes", None) if analysis else None


def machine():
  device = jax.devices()[0].platform.upper()
  cpu = platform.processor() or platform.machine()
  return f"{device} ({cpu}, jax {jax.__version__})"


def ratio(ours, theirs):
  return f"{theirs / ours:.1f}x" if theirs else "n/a"


def ms(value):
  return f"{value:.1f}" if value else "n/a"


def torch_timings(op, features, boxes, indices, repeats):
  """Median ms of ``op(x_nchw, rois)`` forward and forward+backward (feature
  gradient), or None when torch is not installed."""
  try:
    import torch
  except ImportError:
    return None
  x = torch.tensor(np.asarray(features)).permute(0, 3, 1, 2).contiguous()
  rois = torch.cat([torch.tensor(indices, dtype=torch.float32)[:, None], torch.tensor(boxes)], 1)

  def fwd():
    with torch.no_grad():
      op(x, rois)

  def fwd_bwd():
    xg = x.detach().requires_grad_(True)
    y = op(xg, rois)
    y.backward(torch.ones_like(y))

  fwd()
  fwd_bwd()
  return median_ms(fwd, repeats), median_ms(fwd_bwd, repeats)
