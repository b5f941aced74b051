"""Bilinear sampling geometry shared by ``roi_align``, ``crop_and_resize`` and ``roi_warp``.

Everything here is one axis at a time (rows: ``L = H``, ``P = oh``; columns:
``L = W``, ``P = ow``), because RoIAlign's sampling grid is separable: the
bilinear weight of a sample on a cell is ``weight_y(row) * weight_x(col)``,
and a sample is dropped when either coordinate is out of range. A box's
geometry along an axis is three numbers (:class:`Axis`); from them this module
builds *taps*: for each bin, a short list of ``(cell index, weight)`` pairs
that the kernels gather and combine (:class:`Taps`).

All arithmetic is in the compute dtype of the boxes (float32, or float64 for
float64 features) and follows torchvision's ``roi_align`` kernel expression by
expression. The bin offset ``p * bin`` and the quotient ``((i + 0.5) * bin) /
grid`` are rounded on their own, as in C (:func:`boxes.materialize` keeps XLA
from contracting the product into an FMA, :func:`boxes.divide` from replacing
the division by a reciprocal multiply), so that samples on a cell edge or on
the map's border fall where the C kernel puts them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import boxes as boxes_lib

# Candidate samples examined per (bin, row) on each side of the nearest one when
# merging adaptive samples into row weights. Adaptive grids space samples by
# s = bin / ceil(bin) > 0.5 cell (or have one sample per bin). A sample weighs on
# row r only within one cell of it (clamped samples too: [-1, 1) for row 0,
# (H - 2, H] for row H - 1); the nearest sample is within s / 2 of r, so the others
# that count are m < 1 / s + 1 / 2 < 2.5 indices away. When r falls halfway between
# two samples and rounding picks either, the ones that count still lie within 2 of
# it, so +-2 covers every case.
_NEIGHBOURS = 2

# row_taps: when no bin of a call spans more than this many cells (proposal-sized
# boxes), only this many taps per bin are evaluated, instead of the map's length.
_SHORT_BINS = 16


class Axis(NamedTuple):
  """RoIAlign geometry of K boxes along one axis, in feature cells.

  Attributes:
    start: ``[K]`` first edge of the box (``x1 * scale - offset``).
    bin_size: ``[K]`` bin length (``roi_size / P``, correctly rounded).
    grid: ``[K]`` int32 samples per bin (``sampling_ratio``, or adaptive
      ``ceil(bin_size)``); 0 for boxes that produce zeros (invalid, or
      inverted: ``hi < lo``).
  """

  start: jax.Array
  bin_size: jax.Array
  grid: jax.Array


class Taps(NamedTuple):
  """Interpolation taps of K boxes along one axis.

  Attributes:
    index: ``[K, P, T]`` int32 cell (row or column) in ``[0, L)``, or -1 for an
      unused tap (padding, or a sample that does not count).
    weight: ``[K, P, T]`` weight in the compute dtype (0 for unused taps). A used tap may
      have weight 0 (a sample exactly on a cell): its weight still has a
      gradient, so the kernels tell used taps by ``index``, not by weight.
    count: ``[K]`` int32 number of leading taps in use by any bin of the box;
      taps at or past it have weight 0 and need not be visited.
  """

  index: jax.Array
  weight: jax.Array
  count: jax.Array


def axis_geometry(
  lo: jax.Array,
  hi: jax.Array,
  valid: jax.Array,
  num_bins: int,
  spatial_scale: float,
  sampling_ratio: int,
  aligned: bool,
  flip: bool = False,
) -> Axis:
  """torchvision's RoIAlign geometry for one axis (see ``roi_align``'s docstring).

  Args:
    lo: ``[K]`` first box coordinate (x1 or y1) in image pixels, in the compute dtype
      (or ``[K, A]``, several axes at once; see :func:`box_axes`).
    hi: ``[K]`` second box coordinate (x2 or y2).
    valid: ``[K]`` bool (``[K, 1]`` with ``[K, A]`` coordinates); invalid boxes get
      ``grid = 0`` (zero output).
    num_bins: P, the output size along the axis.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin when ``> 0``; adaptive when ``<= 0``.
    aligned: shift by -0.5 cell (pixel-centre model) instead of forcing
      ``roi_size >= 1``.
    flip: inverted boxes (``hi < lo``) keep their negative size, so their
      samples run backwards (a mirrored crop; ``aligned=False`` then forces
      ``roi_size <= -1``), instead of giving zeros. Only with a fixed grid.
  """
  offset = jnp.asarray(0.5 if aligned else 0.0, lo.dtype)
  start, end = boxes_lib.scale_coords((lo, hi), spatial_scale)
  start, end = start - offset, end - offset
  size = end - start
  inverted = size < 0
  if not aligned and flip:
    size = jnp.where(inverted, jnp.minimum(size, -1.0), jnp.maximum(size, 1.0))
  elif not aligned:
    size = jnp.maximum(size, 1.0)
  size = jnp.clip(size, -boxes_lib.COORD_LIMIT, boxes_lib.COORD_LIMIT)
  bin_size = boxes_lib.exact_div(size, num_bins)
  if sampling_ratio > 0:
    grid = jnp.full(lo.shape, sampling_ratio, jnp.int32)
  else:
    grid = boxes_lib.to_int(jnp.ceil(bin_size))
  # Inverted boxes give zeros unless flipped, as do invalid ones.
  grid = jnp.where(valid if flip else valid & ~inverted, grid, 0)
  return Axis(*boxes_lib.materialize((start, bin_size, grid)))


def box_axes(
  boxes: jax.Array,
  valid: jax.Array,
  output_size: tuple[int, int],
  spatial_scale,
  sampling_ratio: int,
  aligned: bool,
) -> tuple[Axis, Axis]:
  """``(rows, cols)``: :func:`axis_geometry` of ``[K, 4]`` boxes ``(x1, y1, x2, y2)``.

  ``spatial_scale``: a float, or ``[K]`` per box. Square outputs compute both
  axes as ``[K, 2]`` arrays: one exact division to compile instead of two, the
  same values.
  """
  (oh, ow) = output_size
  if oh != ow:
    rows = axis_geometry(
      boxes[:, 1], boxes[:, 3], valid, oh, spatial_scale, sampling_ratio, aligned
    )
    cols = axis_geometry(
      boxes[:, 0], boxes[:, 2], valid, ow, spatial_scale, sampling_ratio, aligned
    )
    return rows, cols
  if isinstance(spatial_scale, jax.Array) and spatial_scale.ndim:
    spatial_scale = spatial_scale[:, None]
  lo, hi = boxes_lib.row_col_edges(boxes)
  both = axis_geometry(lo, hi, valid[:, None], oh, spatial_scale, sampling_ratio, aligned)
  return Axis(*(x[:, 0] for x in both)), Axis(*(x[:, 1] for x in both))


def sample_position(axis: Axis, bin_index: jax.Array, sample: jax.Array) -> jax.Array:
  """``start + p * bin + ((i + 0.5) * bin) / grid``, broadcasting ``[K]`` against the indices."""
  start, bin_size = axis.start[:, None, None], axis.bin_size[:, None, None]
  dtype = start.dtype
  grid = jnp.maximum(axis.grid, 1).astype(dtype)[:, None, None]
  base = start + _product(bin_index.astype(dtype), bin_size)
  return base + boxes_lib.divide((sample.astype(dtype) + 0.5) * bin_size, grid)


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a * b`` rounded on its own, as C computes ``ph * bin_size + roi_start``: XLA:CPU
  contracts a product feeding an add into one FMA when they share a fusion."""
  return boxes_lib.materialize(a * b)


def sample_index_at(axis: Axis, bin_index: jax.Array, y) -> jax.Array:
  """The fractional sample index at which bin ``p``'s samples reach position ``y``.

  The inverse of :func:`sample_position` up to rounding (callers keep a
  margin); 0 for bins of size 0 or with no samples.
  """
  dtype = axis.start.dtype
  base = axis.start[:, None, None] + bin_index.astype(dtype) * axis.bin_size[:, None, None]
  step = axis.bin_size[:, None, None] / jnp.maximum(axis.grid, 1).astype(dtype)[:, None, None]
  safe_step = jnp.where(step > 0, step, 1.0)
  return jnp.where(step > 0, (y - base) / safe_step - 0.5, 0.0)


def corners(y: jax.Array, length: int, extrapolate: bool = False):
  """The bilinear rule along one axis for positions ``y``.

  Returns ``(low, high, w_low, w_high, inside)``: the two cells, their weights
  and whether the sample counts at all (weights are 0 where it does not).

  * torchvision's rule (default): positions outside ``[-1, length]`` do not
    count; positions in ``[-1, 0]`` are clamped to 0; from ``length - 1`` on
    both cells are ``length - 1``, with all the weight on ``low``.
  * ``extrapolate`` (TensorFlow's ``crop_and_resize``): positions outside
    ``[0, length - 1]`` do not count (the op gives them its extrapolation
    value); inside, the cells are ``floor(y)`` and ``ceil(y)``, as in
    TensorFlow's kernel: the same weights, but at a whole-number ``y`` both
    are one cell, so the derivative along ``y`` there is 0, not the
    one-sided ``F[y + 1] - F[y]``.
  """
  if extrapolate:
    inside = (y >= 0.0) & (y <= length - 1)
  else:
    inside = (y >= -1.0) & (y <= length)
  y = jnp.maximum(y, 0.0)
  low = boxes_lib.to_int(jnp.floor(y))
  edge = low >= length - 1
  low = jnp.minimum(low, length - 1)
  if extrapolate:
    high = jnp.minimum(boxes_lib.to_int(jnp.ceil(y)), length - 1)
  else:
    high = jnp.where(edge, low, low + 1)
  frac = jnp.where(edge, 0.0, y - low.astype(y.dtype))
  w_high = jnp.where(inside, frac, 0.0)
  w_low = jnp.where(inside, 1.0 - frac, 0.0)
  return low, high, w_low, w_high, inside


def point_taps(y: jax.Array, valid: jax.Array, length: int, nearest: bool, extrapolate: bool):
  """Taps of one sample per output cell, at positions ``y`` ``[K, P]``.

  Bilinear: the two cells of :func:`corners`. Nearest: one cell,
  ``round(y)`` with halves away from zero (C ``roundf``, as TensorFlow), after
  clamping ``y`` to ``[0, length - 1]``; its weight is 1 and has no
  derivative. The edge rule is :func:`corners`'s; boxes that are not
  ``valid`` ``[K]`` have no sample that counts.

  Returns:
    ``(taps, inside)``: :class:`Taps` with ``T = 2`` (tap 1 unused for
    nearest), and ``inside [K, P]`` bool, whether the sample counts.
  """
  low, high, w_low, w_high, inside = corners(y, length, extrapolate)
  if nearest:
    cell = boxes_lib.round_half_away(jnp.clip(y, 0.0, length - 1))
    low, high = boxes_lib.to_int(cell), jnp.full_like(low, -1)
    w_low, w_high = jnp.ones_like(w_low), jnp.zeros_like(w_high)
  inside = inside & valid[:, None]
  index = jnp.stack([jnp.where(inside, low, -1), jnp.where(inside, high, -1)], axis=-1)
  weight = jnp.stack([jnp.where(inside, w_low, 0.0), jnp.where(inside, w_high, 0.0)], axis=-1)
  count = jnp.full(y.shape[:1], 1 if nearest else 2, jnp.int32)
  return Taps(index, weight, count), inside


def sample_taps(axis: Axis, num_bins: int, length, max_samples: int, average: bool):
  """Two taps (``low``, ``high``) per sample: tap ``2 j + c`` is corner ``c`` of sample ``j``.

  ``length`` is the map's extent along the axis: an int, or ``[K, 1, 1]`` per box
  (boxes on the levels of a pyramid).

  With ``average``, weights include the ``1 / grid`` of the average. When the grid may be larger
  than ``max_samples`` (adaptive grids), only a window of the bin's samples is
  kept: the ones that can land in ``[-1, length]`` plus at least one before
  and after (value 0), which is all the max and the average need. Sample ``j``
  of the window is sample ``first + j`` of the bin.

  Returns:
    :class:`Taps` with ``T = 2 * max_samples``, and ``limit [K, P]`` int32: window
    sample ``j`` of bin ``p`` exists (is one of the bin's ``grid`` samples) iff
    ``j < limit[:, p]``. Window order is the bins' sample order.
  """
  p = jnp.arange(num_bins, dtype=jnp.int32)[None, :, None]
  grid = axis.grid[:, None, None]
  last_sample = jnp.maximum(grid - 1, 0)
  # First sample that can reach y >= -1, less a margin (the window has slack).
  first_guess = sample_index_at(axis, p, -1.0)
  first = jnp.clip(boxes_lib.to_int(jnp.ceil(first_guess)) - 2, 0, last_sample)
  sample = first + jnp.arange(max_samples, dtype=jnp.int32)[None, None]
  in_use = sample < grid
  y = sample_position(axis, p, sample)
  low, high, w_low, w_high, inside = corners(y, length)
  low, high = jnp.where(in_use & inside, low, -1), jnp.where(in_use & inside, high, -1)
  scale = in_use.astype(y.dtype)
  if average:
    scale = scale / jnp.maximum(grid, 1).astype(y.dtype)
  index = jnp.stack([low, high], axis=-1).reshape(low.shape[:2] + (2 * low.shape[2],))
  weight = jnp.stack([w_low * scale, w_high * scale], axis=-1).reshape(index.shape)
  # Samples past y = length contribute nothing: stop the window there (+1).
  last_guess = sample_index_at(axis, p, jnp.asarray(length, axis.start.dtype))
  last = jnp.clip(boxes_lib.to_int(jnp.floor(last_guess)) + 2, first - 1, last_sample)
  samples_used = jnp.minimum(jnp.where(grid > 0, last - first + 1, 0), max_samples)
  count = 2 * jnp.max(samples_used, axis=(1, 2))
  return Taps(index, weight, count), (grid - first)[:, :, 0]


def row_taps(
  axis: Axis, num_bins: int, length: int, dense: bool = False, limit: jax.Array | None = None
) -> Taps:
  """One tap per cell: the summed weight of all of a bin's samples on that cell.

  For adaptive grids, whose sample count grows with the box, this replaces
  ``2 * grid`` sample taps by at most ``min(bin_size + 2, length)`` cell taps:
  bin ``p`` visits the contiguous cells from the one under its first sample
  to the one past its last, clipped to the map. The weight of cell ``r`` is
  ``(1 / grid) * sum_i w_i(r)`` over the bin's samples ``i``, where ``w_i(r)``
  is sample ``i``'s bilinear weight on ``r`` (:func:`corners`); only the
  ``2 * _NEIGHBOURS + 1`` samples nearest to ``r`` can be non-zero, and only
  those are evaluated.

  With ``dense``, tap ``t`` is cell ``t`` itself (unused outside the bin's
  cells), so ``weight`` is the dense ``[K, P, length]`` interpolation matrix
  of the gather-free backend.

  ``limit`` ``[K]``: each box's own map extent (at most ``length``; boxes on
  the levels of a pyramid), by default ``length``.

  The weights are evaluated for the first ``_SHORT_BINS`` taps only when no bin
  uses more (a data-dependent ``lax.cond``; the rest are unused), so that the
  geometry of proposal-sized boxes does not cost ``O(length)`` per bin.

  Returns:
    :class:`Taps` with ``T = length``.
  """
  extent = length if limit is None else limit[:, None, None]
  p = jnp.arange(num_bins, dtype=jnp.int32)[None, :, None]
  grid = axis.grid[:, None, None]
  last_sample = jnp.maximum(grid - 1, 0)
  zero = jnp.zeros((1, 1, 1), jnp.int32)
  y_first = sample_position(axis, p, zero)
  y_last = sample_position(axis, p, last_sample)
  lo = jnp.clip(boxes_lib.to_int(jnp.floor(jnp.maximum(y_first, 0.0))), 0, extent - 1)
  hi = jnp.clip(boxes_lib.to_int(jnp.floor(jnp.maximum(y_last, 0.0))) + 1, 0, extent - 1)
  rows_used = jnp.where(grid > 0, hi - lo + 1, 0)  # [K, P, 1]
  count = jnp.max(rows_used, axis=(1, 2))

  def taps(width: int):
    """Taps ``0 .. width - 1`` of every bin."""
    tap = jnp.arange(width, dtype=jnp.int32)[None, None]
    if dense:
      row = jnp.broadcast_to(tap, lo.shape[:2] + (width,))
      in_bin = (tap >= lo) & (tap <= hi) & (grid > 0)
    else:
      row = jnp.minimum(lo + tap, extent - 1)  # [K, P, width]
      in_bin = tap < rows_used
    # Nearest sample to each row, then its neighbours.
    nearest = sample_index_at(axis, p, row.astype(axis.start.dtype))
    nearest = jnp.clip(boxes_lib.to_int(jnp.round(nearest)), 0, last_sample)
    sample = (
      nearest[..., None]
      + jnp.arange(-_NEIGHBOURS, _NEIGHBOURS + 1, dtype=jnp.int32)[None, None, None]
    )
    y = sample_position(
      axis, p, sample.reshape(sample.shape[:2] + (sample.shape[2] * sample.shape[3],))
    )
    extent_4d = extent if limit is None else limit[:, None, None, None]
    low, high, w_low, w_high, _ = corners(y.reshape(sample.shape), extent_4d)
    use = (sample >= 0) & (sample < grid[..., None])
    on_row = row[..., None]
    weight = jnp.where(use & (low == on_row), w_low, 0.0) + jnp.where(
      use & (high == on_row), w_high, 0.0
    )
    weight = jnp.sum(weight, axis=-1)
    weight = jnp.where(in_bin, weight, 0.0) / jnp.maximum(grid, 1).astype(weight.dtype)
    return jnp.where(in_bin, row, -1), weight

  if dense or length <= _SHORT_BINS:
    row, weight = taps(length)
  else:  # taps past every bin's count are unused: skip their weights when all bins are short
    pad = [(0, 0), (0, 0), (0, length - _SHORT_BINS)]

    def short():
      row, weight = taps(_SHORT_BINS)
      return jnp.pad(row, pad, constant_values=-1), jnp.pad(weight, pad)

    row, weight = lax.cond(jnp.max(count, initial=0) <= _SHORT_BINS, short, lambda: taps(length))
  return Taps(row, weight, count)
