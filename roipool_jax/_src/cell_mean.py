"""Means of table rows over rectangles of whole cells: the engine of ``ps_roi_pool``.

A *bin* covers the ``height x width`` cells::

    cell(dy, dx) = origin + dy * row_stride + dx * col_stride,   0 <= dy < height, 0 <= dx < width

of an ``[M, C]`` table (the strides are static, shared by every bin), and
its value is their mean: the sum of the rows, added one at a time in
row-major order in the compute dtype, divided by ``height * width``; a bin
with no cell is 0.

How the work is bounded
-----------------------
A bin's cells are visited as one row-major list, ``SLOTS`` cells per pass,
so a bin costs ``ceil(height * width / SLOTS)`` passes: its own cells,
rounded up once (:func:`chunking.walk_grid`). (Separable ``S x S`` tap blocks, as in
:mod:`roipool_jax._src.tap_sum`, would round each axis up to ``S``: R-FCN's
bins are mostly 1 to 3 cells a side, and such blocks gathered 5.5x more rows
than the bins hold.)

* One fused pass visits the first ``SLOTS`` cells of every bin, in box
  order, with no sort: most of R-FCN's bins have no more (63% of them with
  300 proposals on a 38 x 63 map).
* The bins with more cells are sorted by cost and revisited in chunks
  (:func:`chunking.refine_chunks`), each looping as long as its costliest
  bin and continuing its bins' sums in place; chunks of first-pass bins
  only are skipped. Each sum thus adds its cells in row-major order from 0,
  however many passes it takes, and every bin is divided once at the end.
* With 21 channels a chunk holds 1560 bins, and sorted by cost the few
  costliest bins share one chunk that loops as long as they do: 26520
  bin-passes where 10193 are needed (300 R-FCN proposals). So chunks of
  that many bins are 4x smaller here (:func:`chunking.costly_chunk`),
  forward and backward: 13650 bin-passes. Measured (2-core Intel Xeon,
  float32, alternated processes, new/old time): bin-major 0.92-0.95x
  forward and 0.92-0.97x forward+backward, channel-major 0.99x and
  0.97-0.98x. Smaller chunks for only the bins of more than 3 passes were no
  faster and compiled each loop body twice.

Visiting every bin in sorted chunks instead took 1.10-1.18x the forward's
time (R-FCN's 300 boxes, float32, Intel Xeon): the chunks of one-pass bins
cost more in per-chunk work than their one pass.

Gradient (a ``custom_vjp``)
---------------------------
Each bin's cotangent divided by its cell count is scatter-added to every one
of its cells: the first pass of every bin, slot after slot, then chunk after
chunk of the costlier bins, pass after pass, slot after slot. A fixed order,
so bitwise reproducible on CPU (XLA:GPU scatters with atomics). For a
lane table (:func:`dtypes.table_rows`) the rows are scattered into a
contiguous ``[M * P, C]`` buffer, transposed once at the end: measured faster
than scattering ``C`` values ``P`` apart. The
rectangles are integers and get no gradient.

Unused slots contribute exactly 0 even when the table holds inf or NaN.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking, dtypes

# Cells each bin gathers per pass.
SLOTS = 4
# Bins per chunk, as elements ([chunk, C]) of a chunk's accumulator or scatter
# updates. Smaller chunks end closer to their own bins' costs; picked by
# measurement on R-FCN's bins.
_CHUNK_ELEMENTS = 1 << 15
# Chunks of many bins (few channels) are this many times smaller for the bins revisited
# after the first pass (chunking.costly_chunk); picked by measurement on R-FCN's bins.
_COSTLY_DIVISOR = 4


class Rects(NamedTuple):
  """Each bin's rectangle of table rows, every field ``[U]`` int32 (see the module docstring)."""

  origin: jax.Array
  height: jax.Array
  width: jax.Array


def _count(r: Rects) -> jax.Array:
  return r.height * r.width


def _passes(r: Rects) -> jax.Array:
  return chunking.grid_passes(_count(r), SLOTS)


def _chunk(bins: int, channels: int) -> int:
  """Bins per chunk of the bins revisited after the first pass."""
  chunk = chunking.chunk_size(bins, channels, _CHUNK_ELEMENTS)
  return chunking.costly_chunk(chunk, _COSTLY_DIVISOR)


def _per_cell(x: jax.Array, r: Rects) -> jax.Array:
  """``x [B, C] / max(count, 1)``, a true division (as torchvision's kernel divides).

  XLA rewrites ``x / broadcast(d)`` as ``x * broadcast(1 / d)``, which rounds
  differently, unless the divisor is opaque to it: it reaches the division
  through an optimization barrier, built at ``x``'s shape by a select from
  ``x`` that always picks the count. Under ``vmap`` over the map alone (the
  counts unbatched), the select makes the divisor batched with ``x`` before
  the barrier; a plain broadcast would be batched after it, in reach of the
  rewrite.
  """
  count = jnp.maximum(_count(r), 1)[:, None].astype(x.dtype)
  divisor = jnp.where(jnp.zeros(x.shape, bool), x, count)
  return x / lax.optimization_barrier(divisor)


def _visitor(r: Rects, strides: tuple[int, int], visit):
  """``visit(state, cell [B], used [B])`` as a :func:`chunking.walk_grid` visitor of ``r``'s
  cells (unused slots read cell 0)."""
  row_stride, col_stride = strides

  def visit_cell(state, dy, dx, used):
    cell = r.origin + dy * row_stride + dx * col_stride
    return visit(state, jnp.where(used, cell, 0), used)

  return visit_cell


def _walk(r: Rects, strides: tuple[int, int], visit, state, start: int = 0):
  """Calls ``state = visit(state, cell [B], used [B])`` on the cells of every bin of ``r``,
  from pass ``start`` on."""
  return chunking.walk_grid(r.height, r.width, SLOTS, _visitor(r, strides, visit), state, start)


def _first_pass(r: Rects, strides: tuple[int, int], visit, state):
  """The first pass of :func:`_walk` (each bin's first ``SLOTS`` cells) over all of ``r``'s
  bins at once, unrolled: no loop, so it fuses with what surrounds it."""
  zero = jnp.zeros_like(r.height)
  visit_cell = _visitor(r, strides, visit)
  return chunking.grid_pass(0, _count(r), r.width, SLOTS, visit_cell, state, zero, zero)[0]


def _forward(table: jax.Array, rects: Rects, strides: tuple[int, int], dtype) -> jax.Array:
  def add(acc, cell, used):
    row = dtypes.gather_rows(table, cell).astype(dtype)
    return acc + jnp.where(used[:, None], row, 0.0)

  # Every bin's first SLOTS cells in one fused pass over all bins (most R-FCN bins have no
  # more); then only the bins with more cells, sorted by cost, chunk by chunk, each sum
  # continuing where the first pass left it.
  count = _count(rects)
  first = _first_pass(rects, strides, add, jnp.zeros((count.shape[0], table.shape[1]), dtype))
  refine = lambda r, rows: _walk(r, strides, add, rows, start=1)  # noqa: E731
  chunk = _chunk(count.shape[0], table.shape[1])
  total = chunking.refine_chunks(refine, first, rects, _passes(rects), chunk, done=1)
  mean = jnp.where(count[:, None] > 0, _per_cell(total, rects), 0.0)
  return dtypes.narrow(mean, table.dtype)


def _table_grad(cotangent: jax.Array, rects: Rects, strides: tuple[int, int], table_shape, dtype):
  """The scatter-add transpose in ``dtype``, in a fixed order: the first pass of every
  bin, slot by slot; then, chunk after chunk, pass after pass, slot after slot, the rest."""

  def scatter(share):
    def add(grad, cell, used):
      return grad.at[jnp.where(used, cell, table_shape[0])].add(share, mode="drop")

    return add

  share = _per_cell(cotangent.astype(dtype), rects)  # empty bins have no cell to add it to
  grad = _first_pass(rects, strides, scatter(share), jnp.zeros(table_shape, dtype))

  def chunk_scatter(grad, chunk):
    r, cot = chunk
    return _walk(r, strides, scatter(_per_cell(cot, r)), grad, start=1)

  chunk = _chunk(rects.origin.shape[0], table_shape[1])
  return chunking.fold_chunks(chunk_scatter, grad, rects, _passes(rects), chunk, cotangent, done=1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def cell_mean(table: jax.Array, rects: Rects, strides: tuple[int, int]) -> jax.Array:
  """``[U, C]`` mean of the table rows in each bin's rectangle; see the module docstring.

  Args:
    table: ``[M, C]`` rows (at least one row), or a lane table ``[M, C, P]``
      read as ``M * P`` rows in place (:func:`dtypes.table_rows`).
    rects: :class:`Rects` of ``U`` bins, inside the table.
    strides: static ``(row_stride, col_stride)``, table rows from one cell to the
      next down a column and along a row, the same for every bin.

  Returns:
    ``[U, C]`` in the table's dtype, computed in :func:`dtypes.compute_dtype`.
  """
  return _forward(table, rects, strides, dtypes.compute_dtype(table.dtype))


def _cell_mean_fwd(table, rects, strides):
  # The table itself is not needed: an empty [M, 0(, P)] stand-in carries its shape and dtype.
  return cell_mean(table, rects, strides), (rects, table[:, :0])


def _cell_mean_bwd(strides, residuals, cotangent):
  rects, like = residuals
  shape = (dtypes.table_rows(like), cotangent.shape[1])
  grad = _table_grad(cotangent, rects, strides, shape, dtypes.compute_dtype(like.dtype))
  if like.ndim == 3:  # scattered into contiguous rows (faster than in place), then transposed
    grad = jnp.swapaxes(grad.reshape(like.shape[0], like.shape[2], -1), 1, 2)
  return dtypes.narrow(grad, like.dtype), jax.tree.map(lambda _: None, rects)


cell_mean.defvjp(_cell_mean_fwd, _cell_mean_bwd)
