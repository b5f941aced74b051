"""Exact max (and first arg-max) over integer rectangles of a feature map.

This is the engine of the max-pooling RoI ops: given, per box, the row ranges
``[hs, he)`` of its ``oh`` bin rows and the column ranges ``[ws, we)`` of its
``ow`` bin columns, it returns the channel-wise maximum over each
``[hs, he) x [ws, we)`` rectangle and, for the backward pass, the flat cell
``(n * H + h) * W + w`` of the first maximal cell in row-major order.

How the work is bounded
-----------------------
The cells of a bin are numbered in row-major order. Boxes are sorted by
their largest bin and processed in small sequential chunks (``lax.map``).
Within a chunk, a loop with a data-dependent trip count makes passes; pass
``p`` gathers cells ``[p * S, p * S + S)`` of every bin at once
(``S = SLOTS``; each cell is one contiguous ``C`` vector of the NHWC map, a
fast gather), masks the slots past the bin's cell count and reduces them. A
chunk makes ``ceil(largest bin in the chunk / S)`` passes, so the total work
is about ``sum over boxes of oh * ow * C * (largest bin of the box)``: the
cells a direct loop reads, with no per-box copy of the map. Only bin geometry
(``[K, oh, ow]`` integers) is materialized besides the output.

The arg-max (forward pass of the gradient only) is a second sweep over the
same cells: the smallest flat cell whose value equals the bin's max, which is
the first maximal cell in row-major order. The backward pass sends each output
cotangent to that cell: a scatter-add into ``[N * H * W * C]`` accumulated in
the compute dtype, float32 or float64 (sequential, hence deterministic, on CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking, dtypes

# Cells gathered per bin and pass (one pass reads [chunk, oh, ow, SLOTS, C]).
SLOTS = 8
# Boxes per chunk: about this many output elements, so a chunk's running maxima
# stay in cache; boxes are sorted by size first, so each chunk loops only about
# as long as its own boxes need. Both constants were picked by measurement.
_CHUNK_ELEMENTS = 1 << 16
_NO_CELL = 2**30  # larger than any flat cell (n * H + h) * W + w


class Bins(NamedTuple):
  """Integer bin rectangles of K boxes, already clipped to the map.

  Attributes:
    image_index: ``[K]`` int32 image of each box.
    row_start: ``[K, oh]`` int32, first row of each bin row, in ``[0, H]``.
    row_end: ``[K, oh]`` int32, one past the last row (``<= row_start``: empty).
    col_start: ``[K, ow]`` int32, first column of each bin column, in ``[0, W]``.
    col_end: ``[K, ow]`` int32, one past the last column.
  """

  image_index: jax.Array
  row_start: jax.Array
  row_end: jax.Array
  col_start: jax.Array
  col_end: jax.Array


class CellPlan(NamedTuple):
  """How each bin's cells are enumerated, each field ``[K, oh, ow]`` int32.

  Attributes:
    cells: number of cells in the bin (0: empty).
    cols: width of the bin in cells (at least 1), to turn a cell's rank into
      its row and column.
    origin: flat cell ``(n * H + h) * W + w`` of the bin's first cell.
  """

  cells: jax.Array
  cols: jax.Array
  origin: jax.Array


def _plan(bins: Bins, height: int, width: int) -> CellPlan:
  """Per-bin cell enumeration (:class:`CellPlan`)."""
  k, oh = bins.row_start.shape
  ow = bins.col_start.shape[1]
  shape = (k, oh, ow)
  rows = jnp.maximum(bins.row_end - bins.row_start, 0)[:, :, None]
  cols = jnp.maximum(bins.col_end - bins.col_start, 0)[:, None, :]
  origin = (
    bins.image_index[:, None, None] * (height * width)
    + bins.row_start[:, :, None] * width
    + bins.col_start[:, None, :]
  )
  return CellPlan(
    cells=jnp.broadcast_to(rows * cols, shape),
    cols=jnp.broadcast_to(jnp.maximum(cols, 1), shape),
    origin=jnp.broadcast_to(origin, shape),
  )


def bin_max(features: jax.Array, bins: Bins, with_argmax: bool):
  """Max over every bin rectangle; see the module docstring.

  Args:
    features: ``[N, H, W, C]`` map.
    bins: :class:`Bins` for K boxes with ``oh`` x ``ow`` bins.
    with_argmax: also return the arg-max positions (for the backward pass).

  Returns:
    ``values [K, oh, ow, C]`` in the features' dtype, 0 for empty bins; and when
    ``with_argmax``, ``argmax [K, oh, ow, C]`` int32 flat cell
    ``(n * H + h) * W + w`` (n: the box's image) of the first maximal cell in
    row-major order, -1 for empty bins.
  """
  _, height, width, channels = features.shape
  rows_of_cells = features.reshape(-1, channels)
  slot = jnp.arange(SLOTS, dtype=jnp.int32)[None, None, None]

  def pool_chunk(p):
    p = jax.tree.map(lambda x: x[..., None], p)  # [chunk, oh, ow, 1]
    acc_shape = p.cells.shape[:3] + (channels,)
    passes = (jnp.max(p.cells, initial=0) + SLOTS - 1) // SLOTS

    def cells_of_pass(t):
      """Cells ``[t * S, (t + 1) * S)`` of every bin: values [..., S, C], flat cells, mask."""
      s = t * SLOTS + slot  # [1, 1, 1, S]
      valid = s < p.cells
      cell = jnp.where(valid, p.origin + (s // p.cols) * width + s % p.cols, 0)
      v = rows_of_cells.at[cell].get(mode="promise_in_bounds")  # [chunk, oh, ow, S, C]
      return v, cell, valid

    def max_pass(t, best):
      v, _, valid = cells_of_pass(t)
      return jnp.maximum(best, jnp.where(valid[..., None], v, -jnp.inf).max(axis=3))

    best = lax.fori_loop(0, passes, max_pass, jnp.full(acc_shape, -jnp.inf, features.dtype))
    nonempty = p.cells > 0
    values = jnp.where(nonempty, best, jnp.zeros((), features.dtype))
    if not with_argmax:
      return values, None

    # Cells are visited in row-major order, so the first maximal cell is the
    # smallest flat cell holding the max.
    def first_pass(t, first):
      v, cell, valid = cells_of_pass(t)
      hit = (v == best[:, :, :, None]) & valid[..., None]
      return jnp.minimum(first, jnp.where(hit, cell[..., None], _NO_CELL).min(axis=3))

    first = lax.fori_loop(0, passes, first_pass, jnp.full(acc_shape, _NO_CELL, jnp.int32))
    return values, jnp.where(first < _NO_CELL, first, -1)  # -1: empty bin

  oh, ow = bins.row_start.shape[1], bins.col_start.shape[1]
  plan = _plan(bins, height, width)
  chunk = chunking.chunk_size(plan.cells.shape[0], oh * ow * channels, _CHUNK_ELEMENTS)
  cost = jnp.max(plan.cells, axis=(1, 2))
  values, argmax = chunking.map_chunks(pool_chunk, plan, cost, chunk)
  return (values, argmax) if with_argmax else values


def scatter_to_argmax(cotangent: jax.Array, argmax: jax.Array, features_shape) -> jax.Array:
  """Transpose of :func:`bin_max`: adds each cotangent at its arg-max cell.

  Args:
    cotangent: ``[K, oh, ow, C]`` output cotangent.
    argmax: ``[K, oh, ow, C]`` flat cells from :func:`bin_max` (-1 for empty
      bins: dropped).
    features_shape: ``(N, H, W, C)``.

  Returns:
    ``[N, H, W, C]`` gradient in the compute dtype of ``cotangent``.
  """
  n_img, height, width, channels = features_shape
  channel = jnp.arange(channels, dtype=jnp.int32)[None, None, None]
  flat = jnp.where(argmax >= 0, argmax * channels + channel, n_img * height * width * channels)
  acc = dtypes.compute_dtype(cotangent.dtype)
  grad = jnp.zeros((n_img * height * width * channels,), acc)
  grad = grad.at[flat.reshape(-1)].add(cotangent.astype(acc).reshape(-1), mode="drop")
  return grad.reshape(features_shape)
