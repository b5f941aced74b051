"""Position-sensitive RoI pooling (R-FCN): each bin reads its own group of channels.

For an ``oh x ow`` output with ``C_out`` channels the map has ``C = C_out * oh
* ow`` channels, and bin ``(i, j)`` of output channel ``c`` reads input
channel ``(c * oh + i) * ow + j`` (torchvision's layout). With ``P = oh * ow``
and ``p = i * ow + j`` that channel is ``c * P + p``, so the map, read as
``[N, H, W, C_out, P]`` and transposed to ``[N, H, W, P, C_out]``, is a
table of ``N * H * W * P`` rows of ``C_out`` values in which bin ``p`` of the
box on image ``n`` reads row ``((n * H + y) * W + x) * P + p``.

:func:`bin_plan` writes those rows into a :class:`tap_sum.Plan` (row taps
carry ``y * W * P + i * ow``, column taps ``x * P + j``, with stride 1), so
``ps_roi_align`` runs on the same gather kernel, with the same cost bound and
gradients, as ``roi_align``'s average; ``ps_roi_pool`` averages rectangles of
the same table (:mod:`roipool_jax._src.cell_mean`). Either way each bin
gathers ``C_out`` values per cell, never ``C``.

Two forms of the table, chosen by measurement on XLA:CPU:

* :func:`channel_table`, the transposed copy (one copy of the map per call,
  never one per box), for ``ps_roi_align``: its bilinear taps read many rows
  per bin, and a contiguous row is one or two cache lines.
* :func:`lane_table`, the map itself read as ``[N * H * W, C_out, P]``, for
  ``ps_roi_pool``'s forward: its bins read each of their cells once, so
  reading the ``C_out`` values ``P`` apart in place costs less than copying
  the whole map first (R-FCN's 300 boxes: 15-20% less time per call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from roipool_jax._src import tap_sum
from roipool_jax._src.sampling import Taps


def check_channels(features, output_size: tuple[int, int]) -> int:
  """``C_out = C / (oh * ow)``; raises if ``C`` is not a multiple of ``oh * ow``."""
  oh, ow = output_size
  channels = features.shape[-1]
  if channels % (oh * ow):
    raise ValueError(
      f"Position-sensitive pooling needs `features` channels C to be a multiple of "
      f"oh * ow = {oh} * {ow} = {oh * ow} (C = C_out * oh * ow); got features "
      f"{tuple(features.shape)} and output_size {output_size}."
    )
  return channels // (oh * ow)


def channel_table(features: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """The ``[N * H * W * P, C_out]`` table of the module docstring (a transposed copy)."""
  lanes = lane_table(features, output_size)
  return jnp.swapaxes(lanes, 1, 2).reshape(-1, lanes.shape[1])


def lane_table(features: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """The same table as the lane table ``[N * H * W, C_out, P]`` (:func:`dtypes.table_rows`):
  a reshape of the map, whose rows ``ps_roi_pool``'s forward reads in place,
  ``C_out`` values ``P`` apart."""
  n, h, w, c = features.shape
  bins = output_size[0] * output_size[1]
  return features.reshape(n * h * w, c // bins, bins)


def bin_plan(image_index: jax.Array, ty: Taps, tx: Taps, map_shape) -> tap_sum.Plan:
  """The :class:`tap_sum.Plan` of taps ``ty`` ``[K, oh, Ty]``, ``tx`` ``[K, ow, Tx]`` on the
  table of :func:`channel_table`: tap ``(a, b)`` of bin ``(i, j)`` reads row
  ``n * H * W * P + (ry * W * P + i * ow) + (rx * P + j)``."""
  _, height, width, _ = map_shape
  oh, ow = ty.index.shape[1], tx.index.shape[1]
  bins = oh * ow
  i = jnp.arange(oh, dtype=jnp.int32)[None, :, None]
  j = jnp.arange(ow, dtype=jnp.int32)[None, :, None]
  row = jnp.where(ty.index >= 0, ty.index * (width * bins) + i * ow, -1)
  col = jnp.where(tx.index >= 0, tx.index * bins + j, -1)
  origin = image_index * (height * width * bins)
  stride = jnp.ones_like(image_index)
  return tap_sum.Plan(origin, stride, row, col, ty.count, tx.count)


def pooled_sum(features: jax.Array, ty: Taps, tx: Taps, image_index: jax.Array):
  """``[K, oh, ow, C_out]``: ``sum_a sum_b wy * wx * F[n, ry, rx, (c * oh + i) * ow + j]``."""
  output_size = (ty.index.shape[1], tx.index.shape[1])
  table = channel_table(features, output_size)
  plan = bin_plan(image_index, ty, tx, features.shape)
  return tap_sum.tap_sum(table, ty.weight, tx.weight, plan)
