"""Straightforward JAX formulations, timed where torchvision has no such op.

Written as a JAX user would first write them, gradients by autodiff. The
sampling ops compute every sample's position at once and gather its four
neighbour cells with advanced indexing: they materialize ``[K, oh, ow, g, g,
C]`` samples, so they need a fixed ``sampling_ratio``. Precise RoI pooling
applies dense per-axis integral weights with einsums.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def _bilinear(features, box_indices, y, x):
  """torchvision's bilinear samples ``[K, ..., C]`` at positions ``y``, ``x`` ``[K, ...]`` (5-D),
  zero outside ``[-1, H] x [-1, W]``, four neighbour cells gathered by advanced indexing."""
  _, height, width, _ = features.shape
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
  return value


def _rotated_samples(boxes, output_size, spatial_scale, sampling_ratio, aligned):
  """Sample positions ``(y, x)``, ``[K, oh, ow, g, g]``, of the rotated RoIAlign kernels."""
  oh, ow, g = output_size, output_size, sampling_ratio
  offset = 0.5 if aligned else 0.0
  cx, cy = boxes[:, 0] * spatial_scale - offset, boxes[:, 1] * spatial_scale - offset
  w, h = boxes[:, 2] * spatial_scale, boxes[:, 3] * spatial_scale
  if not aligned:
    w, h = jnp.maximum(w, 1.0), jnp.maximum(h, 1.0)
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
  return y, x


def roi_align_rotated(features, boxes, box_indices, output_size, spatial_scale, sampling_ratio):
  """detectron2's ``ROIAlignRotated`` (aligned, counter-clockwise degrees), sample by sample."""
  y, x = _rotated_samples(boxes, output_size, spatial_scale, sampling_ratio, True)
  return jnp.mean(_bilinear(features, box_indices, y, x), axis=(3, 4))


def riroi_align_rotated(
  features, boxes, box_indices, output_size, spatial_scale, sampling_ratio, orientations
):
  """mmcv's ``RiRoIAlignRotated`` (degrees): rotated samples, then each box's orientation
  channels turned with ``take_along_axis``."""
  y, x = _rotated_samples(boxes, output_size, spatial_scale, sampling_ratio, False)
  pooled = jnp.mean(_bilinear(features, box_indices, y, x), axis=(3, 4))
  k, oh, ow, c = pooled.shape
  groups = pooled.reshape(k, oh, ow, c // orientations, orientations)
  u = boxes[:, 4] * (orientations / 360)
  m = jnp.floor(u)
  f = (u - m)[:, None, None, None, None]
  source = (jnp.arange(orientations)[None] - m[:, None]).astype(jnp.int32) % orientations
  low = jnp.take_along_axis(groups, source[:, None, None, None, :], axis=-1)
  high = jnp.take_along_axis(groups, ((source + 1) % orientations)[:, None, None, None, :], -1)
  return ((1 - f) * low + f * high).reshape(k, oh, ow, c)


def bezier_align(features, boxes, box_indices, output_size, spatial_scale, sampling_ratio):
  """mmcv's ``BezierAlign`` (aligned): each bin's sample grid around its point between the
  curves, sample by sample."""
  p, g = output_size, sampling_ratio
  points = boxes.reshape(-1, 8, 2) * spatial_scale
  top, bottom = points[:, :4], points[:, jnp.array([7, 6, 5, 4])]
  t = jnp.arange(p) / p
  bernstein = jnp.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], -1)
  top_at = jnp.einsum("uj,kjd->kud", bernstein, top)[:, None]  # [K, 1, ow, 2]
  bottom_at = jnp.einsum("uj,kjd->kud", bernstein, bottom)[:, None]
  v = t.reshape(1, p, 1, 1)
  centre = bottom_at * v + top_at * (1 - v) - 0.5  # [K, oh, ow, 2]
  extent = jnp.maximum(jnp.abs(top[:, 0] - top[:, 3]), jnp.abs(bottom[:, 0] - bottom[:, 3]))
  bins = (extent / p)[:, None, None, None, :]  # [K, 1, 1, 1, 2]: (bin_w, bin_h)
  frac = (jnp.arange(g) + 0.5) / g - 0.5
  y = centre[..., 1, None, None] + frac.reshape(1, 1, 1, g, 1) * bins[..., 1, None]
  x = centre[..., 0, None, None] + frac.reshape(1, 1, 1, 1, g) * bins[..., 0, None]
  return jnp.mean(_bilinear(features, box_indices, y, x), axis=(3, 4))


def _hat_integral(t):
  """Integral of ``max(0, 1 - |u|)`` from -inf to ``t``."""
  t = jnp.clip(t, -1.0, 1.0)
  return jnp.where(t <= 0, 0.5 * (t + 1) ** 2, 1 - 0.5 * (1 - t) ** 2)


def precise_roi_pool(features, boxes, box_indices, output_size, spatial_scale):
  """PrRoI pooling of a one-image map as dense per-axis integral weights and two einsums.

  The weight of row ``h`` in bin ``[a, b]`` is ``(G(b - h) - G(a - h)) / (b - a)``
  for every row of the map; the intermediate is ``[K, oh, W, C]``.
  """
  del box_indices  # one image
  _, height, width, _ = features.shape

  def weights(lo, hi, length):
    start, size = lo * spatial_scale, jnp.maximum((hi - lo) * spatial_scale, 0.0)
    bin_size = size[:, None, None] / output_size
    a = start[:, None, None] + jnp.arange(output_size)[None, :, None] * bin_size
    r = jnp.arange(length)[None, None]
    safe = jnp.where(bin_size > 0, bin_size, 1.0)
    return jnp.where(
      bin_size > 0, (_hat_integral(a + bin_size - r) - _hat_integral(a - r)) / safe, 0.0
    )

  wy = weights(boxes[:, 1], boxes[:, 3], height)
  wx = weights(boxes[:, 0], boxes[:, 2], width)
  rows = jnp.einsum("kih,hwc->kiwc", wy, features[0])
  return jnp.einsum("kjw,kiwc->kijc", wx, rows)


def deform_roi_pool(
  features, boxes, offsets, box_indices, output_size, spatial_scale, ratio, gamma
):
  """mmcv's ``deform_roi_pool`` (``offsets [K, oh, ow, 2]``), sample by sample."""
  p, g = output_size, ratio
  x0, y0 = boxes[:, 0] * spatial_scale - 0.5, boxes[:, 1] * spatial_scale - 0.5
  roi_w, roi_h = (
    (boxes[:, 2] - boxes[:, 0]) * spatial_scale,
    (boxes[:, 3] - boxes[:, 1]) * spatial_scale,
  )
  frac = (jnp.arange(g) + 0.5) / g
  cells = (jnp.arange(p)[:, None] + frac[None])[None]  # [1, P, g], in bins
  shift_x = gamma * roi_w[:, None, None] * offsets[..., 0]  # [K, oh, ow]
  shift_y = gamma * roi_h[:, None, None] * offsets[..., 1]
  y = (y0[:, None, None] + cells * (roi_h / p)[:, None, None])[:, :, None, :, None]
  x = (x0[:, None, None] + cells * (roi_w / p)[:, None, None])[:, None, :, None, :]
  y = y + shift_y[..., None, None]  # [K, oh, ow, g, 1]
  x = x + shift_x[..., None, None]  # [K, oh, ow, 1, g]
  return jnp.mean(_bilinear(features, box_indices, y, x), axis=(3, 4))
