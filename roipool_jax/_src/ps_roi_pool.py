"""``ps_roi_pool``: position-sensitive RoI average pooling (R-FCN)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import cell_mean, position_sensitive, scaffold, validation
from roipool_jax._src import roi_pool as roi_pool_lib


def ps_roi_pool(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  box_indices: jax.typing.ArrayLike | None = None,
  channel_order: Literal["channel_major", "bin_major"] = "channel_major",
) -> jax.Array:
  r"""Position-sensitive RoI pooling (R-FCN): bin ``(i, j)`` averages its own channels.

  The map has ``C = C_out * oh * ow`` channels; output channel ``c`` of bin
  ``(i, j)`` is the mean over the bin's cells of input channel ``(c * oh + i)
  * ow + j`` (``channel_order="channel_major"``, torchvision's layout) or
  ``(i * ow + j) * C_out + c`` (``"bin_major"``, faster; see Cost). The bins
  are whole cells, as in ``torchvision.ops.ps_roi_pool`` (bit for bit in the
  edges). Per axis (x
  shown; y is the same with rows, ``H`` and ``oh``), with ``s =
  spatial_scale``, in the compute dtype and then int32::

      x1' = round(x1 * s)        x2' = round(x2 * s)   # C round: halves away from 0
      roi_w = max(x2' - x1', 1)                        # no +1, unlike roi_pool
      bin_w = roi_w / ow                               # correctly rounded
      bin j: columns [floor(j * bin_w) + x1', ceil((j + 1) * bin_w) + x1')
             with both edges clipped to [0, W - 1]

  The bin's value is the sum of its cells, added one at a time in row-major
  order in the compute dtype, divided by their number (a true division); a
  bin with no cell outputs 0. In float32 this is torchvision's arithmetic
  step for step, so the outputs equal its CPU kernel's bit for bit.
  Clipping both edges to ``W - 1`` (torchvision's forward) means the last
  column and row of the map are never read. Boxes with non-finite
  coordinates, or (under ``jit``) an out-of-range ``box_indices`` entry,
  output 0; no box affects another.

  Gradient (hand-written ``custom_vjp`` of the averaging kernel): each output
  cotangent is divided by the bin's cell count and added to every cell of
  the bin, in its channel; accumulated in the compute dtype in a fixed
  order, so bitwise reproducible on CPU. This is the exact gradient of the
  forward above. It differs from torchvision's backward only for bins that
  the ``W - 1`` clip shortens: torchvision's backward clips to ``W`` and so
  spreads the cotangent over cells its forward did not read (a known
  inconsistency of its kernel). The gradient with respect to ``boxes`` is zero
  (the bins are quantized).

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Cost: each bin gathers its own cells, ``C_out`` values each, four per
  pass; bins outside the map cost nothing
  (:mod:`roipool_jax._src.cell_mean`). A bin-major map is read in place and
  takes its gradient's scatter directly. In a channel-major map a cell's
  ``C_out`` values lie ``oh * ow`` apart: the map is copied transposed once
  per call (read in place on AMD CPUs, where that measured faster;
  :mod:`roipool_jax._src.position_sensitive`), and the backward scatters into
  one ``[N * H * W * oh * ow, C_out]`` buffer and transposes it once. So
  bin-major saves the transposed copies of the map and of its gradient.
  Permuting the output channels of the layer that makes the map is free, so
  a model trained in JAX can pick ``"bin_major"``; ``"channel_major"`` reads
  maps made for torchvision, mmcv or the original R-FCN.

  Args:
    features: ``[N, H, W, C_out * oh * ow]`` floating feature map.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    box_indices: ``[K]`` integer image index of each box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 4]`` boxes.
    channel_order: ``"channel_major"`` or ``"bin_major"``, which input channel
      each output channel of each bin reads (see above); static.

  Returns:
    ``[K, oh, ow, C_out]`` (flat boxes) or ``[N, R, oh, ow, C_out]`` (per-image
    boxes) in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes``, ``C`` not a
      multiple of ``oh * ow``, a non-positive ``output_size`` or
      ``spatial_scale``, an unknown ``channel_order``, or ``box_indices`` of the
      wrong length or (when concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import ps_roi_pool
    >>> x = jnp.arange(3 * 3 * 4.0).reshape(1, 3, 3, 4)  # C = 4 = 1 channel * 2 * 2 bins
    >>> ps_roi_pool(x, jnp.array([[0.0, 0.0, 2.0, 2.0]]), 2)[0, :, :, 0]
    Array([[ 0.,  5.],
           [14., 19.]], dtype=float32)

  References:
    Dai, Li, He, Sun, "R-FCN: Object Detection via Region-based Fully
    Convolutional Networks", NeurIPS 2016. https://arxiv.org/abs/1605.06409
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  features = jnp.asarray(features)
  c_out = position_sensitive.check_channels(features, size)
  order = position_sensitive.check_channel_order(channel_order)
  lanes = order == "channel_major" and position_sensitive.reads_lanes_in_place()
  options = dict(size=size, scale=scale, order=order, lanes=lanes)
  return scaffold.run(_ps_roi_pool, features, boxes, box_indices, size, c_out, **options)


def ps_pool_edges(flat: boxes_lib.FlatBoxes, output_size, spatial_scale: float, map_size):
  """``(row_first, row_last, col_first, col_last)`` ``[K, P]`` bin edges (see ``ps_roi_pool``)."""
  height, width = map_size
  scaled = boxes_lib.scale_coords(flat.boxes, spatial_scale)
  rs, re, cs, ce = roi_pool_lib.quantized_box_edges(scaled, output_size, 0, (height - 1, width - 1))
  re = jnp.where(flat.valid[:, None], re, rs)  # invalid boxes: empty bins
  return rs, re, cs, ce


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "order", "lanes"))
def _ps_roi_pool(features, flat, *, size, scale, order, lanes):
  _, height, width, _ = features.shape
  (oh, ow), bins = size, size[0] * size[1]
  rs, re, cs, ce = ps_pool_edges(flat, size, scale, (height, width))
  # Bin (i, j) reads rows ((n * H + y) * W + x) * P + (i * ow + j) of the channel table.
  i = jnp.arange(oh, dtype=jnp.int32)[None, :, None]
  j = jnp.arange(ow, dtype=jnp.int32)[None, None, :]
  origin = (
    (flat.image_index[:, None, None] * height + rs[:, :, None]) * width + cs[:, None, :]
  ) * bins + (i * ow + j)
  shape = origin.shape
  rects = cell_mean.Rects(
    origin=origin.reshape(-1),
    height=jnp.broadcast_to((re - rs)[:, :, None], shape).reshape(-1),
    width=jnp.broadcast_to((ce - cs)[:, None, :], shape).reshape(-1),
  )
  if lanes:  # the channel-major map read in place
    table = position_sensitive.lane_table(features, size)
  else:
    table = position_sensitive.channel_table(features, size, order)
  return cell_mean.cell_mean(table, rects, (width * bins, bins)).reshape(shape + (table.shape[1],))
