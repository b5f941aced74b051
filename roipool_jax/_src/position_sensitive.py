"""Position-sensitive RoI pooling (R-FCN): each bin reads its own group of channels.

For an ``oh x ow`` output with ``C_out`` channels the map has ``C = C_out * oh
* ow`` channels. With ``P = oh * ow`` and ``p = i * ow + j``, bin ``(i, j)``
of output channel ``c`` reads input channel

* ``c * P + p = (c * oh + i) * ow + j`` with ``channel_order="channel_major"``
  (torchvision's, mmcv's and the R-FCN paper's layout), or
* ``p * C_out + c`` with ``channel_order="bin_major"``: each bin's ``C_out``
  channels are contiguous in an NHWC map.

Either way the map is a table of ``N * H * W * P`` rows of ``C_out`` values
in which bin ``p`` of the box on image ``n`` reads row ``((n * H + y) * W +
x) * P + p``. A bin-major map *is* that table (a reshape, read in place). A
channel-major map is the table transposed: read as ``[N, H, W, C_out, P]``,
its rows are ``C_out`` values ``P`` apart.

:func:`bin_plan` writes those rows into a :class:`tap_sum.Plan` (row taps
carry ``y * W * P + i * ow``, column taps ``x * P + j``, with stride 1), so
``ps_roi_align`` runs on the same gather kernel, with the same cost bound and
gradients, as ``roi_align``'s average; ``ps_roi_pool`` averages rectangles of
the same table (:mod:`roipool_jax._src.cell_mean`). Either way each bin
gathers ``C_out`` values per cell, never ``C``.

For a channel-major map, two forms of the table, chosen by measurement on
XLA:CPU (both give the same sums in the same order, so the same bits):

* :func:`channel_table`, a transposed copy (one copy of the map per call,
  never one per box, and one transposed copy of its gradient). A row is
  then one or two cache lines. ``ps_roi_align`` always reads it (its
  bilinear taps read many rows per bin), and ``ps_roi_pool`` does except
  on AMD CPUs. R-FCN's 300 boxes on an Intel Xeon: ``ps_roi_pool`` takes
  0.67-0.70x the time of reading in place forward and 0.79-0.92x
  forward+backward in float32 (0.65x and 0.78-0.81x in bfloat16).
* :func:`lane_table`, the map itself read as ``[N * H * W, C_out, P]``, whose
  rows are ``C_out`` values ``P`` apart, each in a cache line of its own.
  ``ps_roi_pool`` reads it on AMD CPUs (:func:`reads_lanes_in_place`): its
  bins read each of their cells once, and there reading in place cost
  15-20% less time per call than copying the map first (R-FCN's 300 boxes
  on an AMD EPYC).

A bin-major map needs neither: both ops read it in place and scatter their
gradients into it directly, so they skip the copies (R-FCN's 300 boxes on an
Intel Xeon, float32: ``ps_roi_pool`` 35-38% less time forward and
forward+backward, ``ps_roi_align`` 7-33%). The score-map convolution can
emit either order (permuting a layer's output channels costs nothing), so a
model trained in JAX can pick the faster one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from roipool_jax._src import backends, tap_sum, validation
from roipool_jax._src.sampling import Taps

CHANNEL_ORDERS = ("channel_major", "bin_major")


def check_channel_order(channel_order: object) -> str:
  """``channel_order`` if it is one of :data:`CHANNEL_ORDERS`; raises otherwise."""
  return validation.check_choice("channel_order", channel_order, CHANNEL_ORDERS)


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


def channel_table(features: jax.Array, output_size: tuple[int, int], channel_order: str):
  """The ``[N * H * W * P, C_out]`` table of the module docstring: the map itself
  (a reshape) when bin-major, a transposed copy when channel-major."""
  n, h, w, c = features.shape
  bins = output_size[0] * output_size[1]
  if channel_order == "bin_major":
    return features.reshape(n * h * w * bins, c // bins)
  lanes = lane_table(features, output_size)
  return jnp.swapaxes(lanes, 1, 2).reshape(-1, lanes.shape[1])


def lane_table(features: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """A channel-major map's table as the lane table ``[N * H * W, C_out, P]``
  (:func:`dtypes.table_rows`): a reshape of the map, whose rows ``ps_roi_pool``
  reads in place on AMD CPUs (:func:`reads_lanes_in_place`), ``C_out`` values
  ``P`` apart."""
  n, h, w, c = features.shape
  bins = output_size[0] * output_size[1]
  return features.reshape(n * h * w, c // bins, bins)


def reads_lanes_in_place() -> bool:
  """Whether ``ps_roi_pool`` reads a channel-major map in place (:func:`lane_table`): on
  AMD CPUs, where that measured faster than the transposed copy (the module docstring).
  Decided at trace time; either table gives the same bits."""
  return jax.default_backend() == "cpu" and backends.cpu_vendor() == "AuthenticAMD"


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


def pooled_sum(
  features: jax.Array, ty: Taps, tx: Taps, image_index: jax.Array, channel_order: str
) -> jax.Array:
  """``[K, oh, ow, C_out]``: ``sum_a sum_b wy * wx * F[n, ry, rx, channel(c, i, j)]``."""
  output_size = (ty.index.shape[1], tx.index.shape[1])
  table = channel_table(features, output_size, channel_order)
  plan = bin_plan(image_index, ty, tx, features.shape)
  return tap_sum.tap_sum(table, ty.weight, tx.weight, plan)
