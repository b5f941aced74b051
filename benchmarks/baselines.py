"""Straightforward JAX formulations, timed where torchvision has no such op.

Written as a JAX user would first write them: every sample's position
computed at once, its four neighbour cells gathered from the map with
advanced indexing, gradients by autodiff. They materialize ``[K, oh, ow, g,
g, C]`` samples, so they need a fixed ``sampling_ratio``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def roi_align_rotated(features, boxes, box_indices, output_size, spatial_scale, sampling_ratio):
  """detectron2's ``ROIAlignRotated`` (aligned, counter-clockwise degrees), sample by sample."""
  _, height, width, _ = features.shape
  oh, ow, g = output_size, output_size, sampling_ratio
  cx, cy = boxes[:, 0] * spatial_scale - 0.5, boxes[:, 1] * spatial_scale - 0.5
  w, h = boxes[:, 2] * spatial_scale, boxes[:, 3] * spatial_scale
  theta = boxes[:, 4] * (math.pi / 180)
  frac = (jnp.arange(g) + 0.5) / g
  grid_h = (jnp.arange(oh)[:, None] + frac[None])[None]  # [1, oh, g], in bins
  grid_w = (jnp.arange(ow)[:, None] + frac[None])[None]
  yy = -h[:, None, None] / 2 + grid_h * (h / oh)[:, None, None]
  xx = -w[:, None, None] / 2 + grid_w * (w / ow)[:, None, None]
  yy, xx = yy[:, :, None, :, None], xx[:, None, :, None, :]  # [K, oh, 1, g, 1], [K, 1, ow, 1, g]
  cos, sin = (v[:, None, None, None, None] for v in (jnp.cos(theta), jnp.sin(theta)))
  y = yy * cos - xx * sin + cy[:, None, None, None, None]
  x = yy * sin + xx * cos + cx[:, None, None, None, None]
  inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
  y, x = jnp.clip(y, 0, height - 1), jnp.clip(x, 0, width - 1)
  y0, x0 = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
  y1, x1 = jnp.minimum(y0 + 1, height - 1), jnp.minimum(x0 + 1, width - 1)
  ly, lx = y - y0, x - x0
  n = box_indices[:, None, None, None, None]
  value = 0.0
  for row, wy in ((y0, 1 - ly), (y1, ly)):
    for col, wx in ((x0, 1 - lx), (x1, lx)):
      value = value + (wy * wx * inside)[..., None] * features[n, row, col]
  return jnp.mean(value, axis=(3, 4))
