"""Exact max over integer rectangles of a feature map, and its gradient.

This is the engine of ``roi_pool``: given, per box, the row ranges
``[hs, he)`` of its ``oh`` bin rows and the column ranges ``[ws, we)`` of its
``ow`` bin columns, it returns the channel-wise maximum over each
``[hs, he) x [ws, we)`` rectangle, and sends each output cotangent to the
first maximal cell of its bin in row-major order (torchvision's tie rule).

How the work is bounded
-----------------------
The unit of work is a *bin*, not a box. The cells of a bin are numbered in
row-major order. The ``K * oh * ow`` bins are sorted by their cell count and
processed in small sequential chunks (``lax.map``). Within a chunk, a loop with
a data-dependent trip count makes passes; pass ``p`` gathers cells
``[p * S, p * S + S)`` of every bin at once (``S = SLOTS``; each cell is one
contiguous ``C`` vector of the NHWC map, a fast gather), masks the slots past
the bin's cell count and reduces them. A chunk makes ``ceil(largest bin in the
chunk / S)`` passes, so the total work is about ``C`` times the number of
cells the bins hold, after clipping to the map: bins (and parts of bins)
outside the map cost nothing, and a box far larger than the map costs about
what the map's cells cost. Only bin geometry (``[K, oh, ow]`` integers) is
materialized besides the output.

Gradient
--------
Under differentiation the forward pass also returns each bin's arg-max per
channel (``[K, oh, ow, C]`` int32, the residual torchvision keeps too),
found by a second sweep over the same cells that visits them last to first,
so that the first maximal cell in row-major order is the one that stays.
(Tracking the arg-max inside the max sweep was measured 1.2-2x slower on
XLA:CPU, per cell or per pass of ``SLOTS`` cells: XLA splits such a loop
body into one fusion per carried array, which stores the gathered rows and
recomputes the running maxima in the arg-max's fusion.) It is recorded as
the flat element index ``cell * C + channel``, with ``N * H * W * C +
channel`` (past the end) for bins without one. The backward pass then adds
each cotangent there, in one scatter-add of single elements into a flat
``[N * H * W * C]`` buffer in the compute dtype that drops the indices past the
end. On XLA:CPU such a scatter moves an element 3x faster than one indexed
by ``(cell, channel)`` pairs into ``[N * H * W, C]``, and is faster per bin
than adding whole ``C`` rows of mostly zeros for every cell of small bins
(both measured); its cost does not depend on the bins' size. Maps too large
for an int32 element index (``(N * H * W + 1) * C > 2**31``) record cells
and scatter ``(cell, channel)`` pairs.

The additions happen in the order of the bins ``(k, i, j)`` and channels;
XLA:CPU executes a scatter sequentially, so the gradient is bitwise
reproducible. (XLA:GPU adds colliding updates atomically, in no fixed
order; the ``"einsum"`` implementation is deterministic everywhere.)

Every gather is indexed by a ``[B]`` vector (one slot of every bin of a
chunk at a time): on XLA:CPU these move whole ``C`` rows several times faster
than one gather indexed by ``[B, S]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking, dtypes

# Cells gathered per bin and pass (one pass reads [chunk, SLOTS, C]).
SLOTS = 4
# Bins per chunk: about this many output elements, so a chunk's running maxima
# stay in cache; bins are sorted by size first, so each chunk loops only about
# as long as its own bins need. Both constants were picked by measurement.
_CHUNK_ELEMENTS = 1 << 16
# Arg-maxima are flat element indices when they fit below this (int32);
# larger maps record cells, and the backward scatters (cell, channel) pairs.
FLAT_INDEX_LIMIT = 2**31


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
  """How each bin's cells are enumerated, each field ``[K * oh * ow]`` int32.

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
  """Per-bin cell enumeration (:class:`CellPlan`), bins in ``(k, i, j)`` order."""
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
  flat = lambda x: jnp.broadcast_to(x, shape).reshape(-1)  # noqa: E731
  return CellPlan(cells=flat(rows * cols), cols=flat(jnp.maximum(cols, 1)), origin=flat(origin))


def _cells_of_pass(p: CellPlan, t, width: int):
  """Slots ``[t * S, (t + 1) * S)`` of every bin of a chunk: flat cells and validity, ``[B, S]``."""
  s = t * SLOTS + jnp.arange(SLOTS, dtype=jnp.int32)[None]
  valid = s < p.cells[:, None]
  cols = p.cols[:, None]
  cell = jnp.where(valid, p.origin[:, None] + (s // cols) * width + s % cols, 0)
  return cell, valid


def _passes(p: CellPlan):
  return (jnp.max(p.cells, initial=0) + SLOTS - 1) // SLOTS


def _chunk(num_bins: int, channels: int) -> int:
  return chunking.chunk_size(num_bins, channels, _CHUNK_ELEMENTS)


def element_index(map_shape: tuple[int, ...]) -> bool:
  """Whether arg-maxima over a map of this shape are flat element indices (static).

  They are when ``(N * H * W + 1) * C`` (the indices and the no-cell marker)
  fits in int32; larger maps record cells instead.
  """
  n_img, height, width, channels = map_shape
  return (n_img * height * width + 1) * channels <= FLAT_INDEX_LIMIT


def bin_max(features: jax.Array, bins: Bins, *, with_argmax: bool = False):
  """Max over every bin rectangle; see the module docstring.

  Args:
    features: ``[N, H, W, C]`` map.
    bins: :class:`Bins` for K boxes with ``oh`` x ``ow`` bins.
    with_argmax: also return each bin's first maximal cell (static).

  Returns:
    ``[K, oh, ow, C]`` in the features' dtype, 0 for empty bins. With
    ``with_argmax``, also ``[K, oh, ow, C]`` int32, the first maximal cell in
    row-major order of each bin and channel ``c``: if
    ``element_index(features.shape)``, as the flat element index ``((n * H +
    h) * W + w) * C + c``, else as the flat cell ``(n * H + h) * W + w``. Empty
    bins and bins whose maximum is NaN have no such cell and get ``N * H * W *
    C + c`` (or ``N * H * W``), past the end of the map.
  """
  n_img, height, width, channels = features.shape
  table = features.reshape(-1, channels)
  neg_inf = jnp.array(-jnp.inf, dtypes.row_dtype(features.dtype))  # exact for any maximum
  unit = channels if element_index(features.shape) else 1
  nowhere = n_img * height * width * unit
  lanes = jnp.arange(channels, dtype=jnp.int32)[None] if unit > 1 else 0

  def pool_chunk(p: CellPlan):
    def max_pass(t, best):
      cell, valid = _cells_of_pass(p, t, width)
      for s in range(SLOTS):  # one [B]-indexed gather per slot: XLA:CPU's fast gather
        v = dtypes.gather_rows(table, cell[:, s])  # [B, C]
        best = jnp.maximum(best, jnp.where(valid[:, s, None], v, neg_inf))
      return best

    b = p.cells.shape[0]
    passes = _passes(p)
    best = lax.fori_loop(0, passes, max_pass, jnp.full((b, channels), neg_inf))
    full = p.cells[:, None] > 0
    values = dtypes.narrow_bits(jnp.where(full, best, 0.0), features.dtype)
    if not with_argmax:
      return values

    # A second sweep, last cell first, so the first maximal cell writes last.
    # (Tracking the arg-max during the max sweep is 2x slower on XLA:CPU.)
    def arg_pass(u, arg):
      t = passes - 1 - u
      cell, valid = _cells_of_pass(p, t, width)
      first = cell * unit  # the cell's first element
      for s in reversed(range(SLOTS)):
        v = dtypes.gather_rows(table, cell[:, s])
        arg = jnp.where((v == best) & valid[:, s, None], first[:, s, None], arg)
      return arg

    arg = lax.fori_loop(0, passes, arg_pass, jnp.full((b, channels), nowhere, jnp.int32))
    return values, arg + lanes

  k, oh = bins.row_start.shape
  ow = bins.col_start.shape[1]
  plan = _plan(bins, height, width)
  out = chunking.map_chunks(pool_chunk, plan, plan.cells, _chunk(k * oh * ow, channels))
  out = jax.tree.map(lambda x: x.reshape(k, oh, ow, channels), out)
  if with_argmax:
    return dtypes.from_bits(out[0], features.dtype), out[1]
  return dtypes.from_bits(out, features.dtype)


def bin_max_grad(map_shape: tuple[int, ...], argmax: jax.Array, cotangent: jax.Array) -> jax.Array:
  """Transpose of :func:`bin_max`: each cotangent goes to its bin's first maximal cell.

  Args:
    map_shape: ``(N, H, W, C)`` of the map the forward pass read.
    argmax: ``[K, oh, ow, C]`` arg-maxima from ``bin_max(..., with_argmax=True)``.
    cotangent: ``[K, oh, ow, C]`` output cotangent, in the compute dtype.

  Returns:
    ``[N, H, W, C]`` gradient in the cotangent's dtype.
  """
  n_img, height, width, channels = map_shape
  cells = n_img * height * width
  dtype = cotangent.dtype
  if cells == 0 or argmax.size == 0:
    return jnp.zeros(map_shape, dtype)
  if element_index(map_shape):
    # Arg-maxima past the end (no maximal cell) are dropped.
    grad = jnp.zeros((cells * channels,), dtype)
    grad = grad.at[argmax.reshape(-1)].add(cotangent.reshape(-1), mode="drop")
    return grad.reshape(map_shape)
  argmax = argmax.reshape(-1, channels)
  update = jnp.where(argmax < cells, cotangent.reshape(-1, channels), jnp.zeros((), dtype))
  lanes = jnp.arange(channels, dtype=jnp.int32)[None]
  grad = jnp.zeros((cells, channels), dtype)
  grad = grad.at[jnp.minimum(argmax, cells - 1), lanes].add(update, mode="promise_in_bounds")
  return grad.reshape(map_shape)
