"""Sums of bilinear samples on rotated grids: the kernel of ``roi_align_rotated``.

A rotated box's sampling grid is not separable along the map's rows and
columns, so every sample is interpolated from its own four neighbour cells.
For bin ``(i, j)`` of a box with centre ``(cy, cx)``, rotation ``(cos, sin)``,
bin size ``(bin_h, bin_w)`` and ``(g_h, g_w)`` samples per bin, sample
``(a, b)`` sits at, in box coordinates::

    yy = start_h + i * bin_h + ((a + 0.5) * bin_h) / g_h     start_h = -roi_h / 2
    xx = start_w + j * bin_w + ((b + 0.5) * bin_w) / g_w     start_w = -roi_w / 2

and on the map at ``y = yy * cos - xx * sin + cy``, ``x = yy * sin + xx * cos +
cx``. Each output is ``sum bilinear(F, y, x) / max(g_h * g_w, 1)``.

How the work is bounded
-----------------------
The unit of work is a bin. Only samples that can land in ``[-1, H] x [-1,
W]`` contribute (the bilinear rule gives the others 0), and they lie in the
preimage of that rectangle, a parallelogram in sample-index space: each bin
visits the index window that bounds it (plus one index of slack on each
side), in blocks of ``SLOTS x SLOTS`` samples. One fused pass visits the
first block of every bin and writes the output directly (a zero-filled
output updated chunk by chunk cost about as much as the work); the bins with
more blocks are then sorted by cost and revisited in chunks
(:func:`chunking.refine_chunks`), continuing from their float32/float64
partial sums (16-bit outputs too, up to 16 MB of sums; larger ones, rounded
in the first pass, are recomputed: :func:`chunking.refine_sums`). A
bin off the map costs one masked block; a box much larger than the map costs
about one sample per map cell per bin it overlaps, never ``g_h * g_w``
samples.

Gradients (a ``custom_vjp``)
----------------------------
* Features: a scatter-add of ``weight * cotangent`` into the ``[M, C]``
  table, chunk after chunk in a fixed order (bitwise reproducible on CPU).
* Geometry: per block, the derivative of each corner weight times
  ``<F[cell], cotangent>``, pulled back through the sample positions by
  ``jax.vjp`` of the block's weight function (the windows and grids, being
  integers, are held constant).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import chunking, dtypes, sampling

# Samples per axis in one pass of a bin (SLOTS**2 samples, 4 corners each).
SLOTS = 2
# Bins per chunk, as elements of the [chunk, C] accumulator.
_CHUNK_ELEMENTS = 1 << 16


class Geometry(NamedTuple):
  """Rotated sampling geometry of K boxes, in feature cells.

  Attributes:
    floats: ``[K, 8]`` in the compute dtype: ``cy, cx, cos, sin, start_h,
      start_w, bin_h, bin_w`` (differentiable).
    grid: ``[K, 2]`` int32 samples per bin ``(g_h, g_w)``; 0 for boxes that
      produce zeros.
    origin: ``[K]`` int32 table row of the box's map at ``(0, 0)``.
  """

  floats: jax.Array
  grid: jax.Array
  origin: jax.Array


class _Units(NamedTuple):
  """Bins as units of work (``U = K * oh * ow``), each field ``[U]`` (``window`` ``[U, 4]``)."""

  box: jax.Array  # box of the bin
  i: jax.Array  # bin row
  j: jax.Array  # bin column
  window: jax.Array  # first sample row, first sample column, rows, columns visited


def _steps(f, grid):
  """Sample spacing along each axis, ``bin / g`` (0 for boxes without samples)."""
  g = jnp.maximum(grid, 1).astype(f.dtype)
  return f[..., 6] / g[..., 0], f[..., 7] / g[..., 1]


def _windows(geometry: Geometry, output_size, map_size) -> _Units:
  """Each bin's window of sample indices that can land in ``[-1, H] x [-1, W]``."""
  (oh, ow), (height, width) = output_size, map_size
  f, grid = geometry.floats, geometry.grid
  k = f.shape[0]
  box = jnp.repeat(jnp.arange(k, dtype=jnp.int32), oh * ow)
  i = jnp.tile(jnp.repeat(jnp.arange(oh, dtype=jnp.int32), ow), k)
  j = jnp.tile(jnp.arange(ow, dtype=jnp.int32), k * oh)
  fu, gu = f[box], grid[box]
  cy, cx, cos, sin, start_h, start_w, bin_h, bin_w = (fu[:, n] for n in range(8))
  step_h, step_w = _steps(fu, gu)
  dtype = f.dtype
  first_h = start_h + i.astype(dtype) * bin_h + 0.5 * step_h
  first_w = start_w + j.astype(dtype) * bin_w + 0.5 * step_w
  corners = jnp.array([[-1.0, -1.0], [-1.0, width], [height, -1.0], [height, width]], dtype)
  dy = corners[None, :, 0] - cy[:, None]
  dx = corners[None, :, 1] - cx[:, None]
  yy = dy * cos[:, None] + dx * sin[:, None]  # the map's corners in box coordinates
  xx = dx * cos[:, None] - dy * sin[:, None]

  def axis(coord, first, step, g):
    safe = jnp.where(step > 0, step, 1.0)[:, None]
    index = (coord - first[:, None]) / safe
    lo = boxes_lib.to_int(jnp.floor(jnp.min(index, axis=1))) - 1
    hi = boxes_lib.to_int(jnp.ceil(jnp.max(index, axis=1))) + 1
    lo = jnp.where(step > 0, jnp.maximum(lo, 0), 0)
    hi = jnp.where(step > 0, jnp.minimum(hi, g - 1), g - 1)
    return lo, jnp.maximum(hi - lo + 1, 0)

  lo_h, n_h = axis(yy, first_h, step_h, gu[:, 0])
  lo_w, n_w = axis(xx, first_w, step_w, gu[:, 1])
  return _Units(box, i, j, jnp.stack([lo_h, lo_w, n_h, n_w], axis=1))


def _passes(window):
  return -(-window[:, 2] // SLOTS), -(-window[:, 3] // SLOTS)


def _chunk_passes(u: _Units):
  """Passes a chunk of bins makes: as many as its costliest bin has blocks."""
  return chunking.own_block_passes(*_passes(u.window))


def _block(floats, grid, origin, u: _Units, t, map_size):
  """Pass ``t`` of a chunk of bins: ``cells``, ``used`` and ``weight``, each ``[B, 4 * S * S]``.

  Each bin visits its own blocks of its window (:func:`chunking.own_block`),
  so a chunk loops as long as its costliest bin, whatever the shapes of its
  bins' windows.

  ``floats`` ``[B, 8]``, ``grid`` ``[B, 2]`` and ``origin`` ``[B]`` are the
  bins' boxes' geometry; the weights include ``1 / max(g_h * g_w, 1)``.

  The sample positions ``(y, x)`` ``[B, S, S]`` are computed once, into
  buffers of their own (:func:`boxes.materialize`). Otherwise XLA recomputes
  them, divisions included, in each of the kernels that make ``cells``,
  ``used`` and ``weight`` at ``[B, 4 * S * S]``: these took 3.2 of the 8.4 ms
  of the benchmark's bfloat16 rotated forward in a profile. Computed once, the
  forward took 0.82-0.92x the time and forward+backward 0.95-0.98x (the
  rotated and ReDet configs, float32 and bfloat16, fastest of 15 alternated
  calls, 2-core AMD EPYC), with the same output bits.
  """
  height, width = map_size
  cy, cx, cos, sin, start_h, start_w, bin_h, bin_w = (floats[:, n, None] for n in range(8))
  dtype = floats.dtype
  by, bx, in_use = chunking.own_block(t, *_passes(u.window))
  slot = jnp.arange(SLOTS, dtype=jnp.int32)[None]
  a = by[:, None] * SLOTS + slot  # [B, S] offset in the window
  b = bx[:, None] * SLOTS + slot
  use_a = (a < u.window[:, 2:3]) & in_use[:, None]
  use_b = b < u.window[:, 3:4]
  g_h, g_w = grid[:, 0:1], grid[:, 1:2]
  iy = (u.window[:, 0:1] + a).astype(dtype)
  ix = (u.window[:, 1:2] + b).astype(dtype)
  yy = (
    start_h
    + u.i[:, None].astype(dtype) * bin_h
    + boxes_lib.divide((iy + 0.5) * bin_h, jnp.maximum(g_h, 1).astype(dtype))
  )
  xx = (
    start_w
    + u.j[:, None].astype(dtype) * bin_w
    + boxes_lib.divide((ix + 0.5) * bin_w, jnp.maximum(g_w, 1).astype(dtype))
  )
  yy, xx = yy[:, :, None], xx[:, None, :]  # [B, S, 1], [B, 1, S]
  y = yy * cos[:, :, None] - xx * sin[:, :, None] + cy[:, :, None]
  x = yy * sin[:, :, None] + xx * cos[:, :, None] + cx[:, :, None]
  y, x = boxes_lib.materialize((y, x), key=floats)
  y_lo, y_hi, wy_lo, wy_hi, in_y = sampling.corners(y, height)
  x_lo, x_hi, wx_lo, wx_hi, in_x = sampling.corners(x, width)
  used = use_a[:, :, None] & use_b[:, None, :] & in_y & in_x  # [B, S, S]
  scale = 1.0 / jnp.maximum(g_h * g_w, 1).astype(dtype)[:, :, None]
  base = origin[:, None, None]
  cells, weights = [], []
  for row, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
    for col, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
      cells.append(base + row * width + col)
      weights.append(jnp.where(used, wy * wx * scale, 0.0))
  flat = lambda xs: jnp.stack(xs, axis=1).reshape(xs[0].shape[0], -1)  # noqa: E731
  used4 = jnp.broadcast_to(used[:, None], (used.shape[0], 4) + used.shape[1:])
  return flat(cells), used4.reshape(used.shape[0], -1), flat(weights)


def _per_unit(geometry: Geometry, u: _Units):
  return geometry.floats[u.box], geometry.grid[u.box], geometry.origin[u.box]


def _prepare(geometry, output_size, map_size, channels):
  units = _windows(geometry, output_size, map_size)
  py, px = _passes(units.window)
  chunk = chunking.chunk_size(units.box.shape[0], channels, _CHUNK_ELEMENTS)
  return units, py * px, chunk


def _forward(table, geometry: Geometry, output_size, map_size):
  channels = table.shape[1]
  units, cost, chunk = _prepare(geometry, output_size, map_size, channels)
  dtype = geometry.floats.dtype

  def add_pass(u):
    floats, grid, origin = _per_unit(geometry, u)

    def one_pass(t, acc):
      # One [B]-indexed gather per sample corner, summed in order: XLA fuses the whole pass
      # into one kernel. (Over all bins at once, a reduction over a gathered [U, 4 S S, C]
      # instead took 130 ms against 7 on the benchmark's rotated config.)
      cells, used, weight = _block(floats, grid, origin, u, t, map_size)
      for n in range(cells.shape[1]):
        value = dtypes.gather_rows(table, cells[:, n])
        acc = acc + jnp.where(used[:, n, None], weight[:, n, None] * value, 0.0)
      return acc

    return one_pass

  # Pass 0 of every bin in one fused pass that writes the output; then only the bins with
  # more blocks again (as in tap_sum: a zero-filled output costs about what the pass does).
  first = add_pass(units)(0, jnp.zeros((units.box.shape[0], channels), dtype))
  out = chunking.refine_sums(first, add_pass, _chunk_passes, units, cost, chunk, table.dtype)
  k = geometry.floats.shape[0]
  return out.reshape((k,) + tuple(output_size) + (channels,))


def _table_grad(cotangent, geometry: Geometry, output_size, map_size, table_shape):
  """Scatter-add transpose in the compute dtype, in a fixed (chunk, pass, sample) order."""
  channels = table_shape[1]
  units, cost, chunk = _prepare(geometry, output_size, map_size, channels)
  dtype = geometry.floats.dtype

  def unit_chunk(grad, data):
    u, cot = data
    floats, grid, origin = _per_unit(geometry, u)

    def one_pass(t, grad):
      cells, used, weight = _block(floats, grid, origin, u, t, map_size)
      update = jnp.where(used[..., None], weight[..., None] * cot[:, None, :], 0.0)
      flat_cells = jnp.where(used, cells, 0).reshape(-1)
      return grad.at[flat_cells].add(update.reshape(-1, channels), mode="promise_in_bounds")

    return lax.fori_loop(0, _chunk_passes(u), one_pass, grad)

  grad = jnp.zeros(table_shape, dtype)
  cot = cotangent.reshape(-1, channels)
  return chunking.fold_chunks(unit_chunk, grad, units, cost, chunk, cot)


def _geometry_grad(table, cotangent, geometry: Geometry, output_size, map_size):
  """``[K, 8]`` gradient of the float geometry: weight derivatives through ``jax.vjp``."""
  channels = table.shape[1]
  units, cost, chunk = _prepare(geometry, output_size, map_size, channels)

  def unit_chunk(data):
    u, cot = data
    floats, grid, origin = _per_unit(geometry, u)

    def one_pass(t, grad):
      def weights(f):  # differentiable weights; the integer cells ride along
        cells, used, w = _block(f, grid, origin, u, t, map_size)
        return w, (cells, used)

      w, pull, (cells, used) = jax.vjp(weights, floats, has_aux=True)
      value = dtypes.gather_rows(table, cells)
      dot = jnp.where(used, jnp.sum(value * cot[:, None, :], axis=-1), 0.0)  # [B, 4 S S]
      (g,) = pull(dot.astype(w.dtype))
      return grad + g

    return lax.fori_loop(0, _chunk_passes(u), one_pass, jnp.zeros_like(floats))

  cot = cotangent.reshape(-1, channels)
  grads = chunking.map_chunks(unit_chunk, units, cost, chunk, cot)  # [U, 8]
  k = geometry.floats.shape[0]
  return jnp.sum(grads.reshape(k, -1, 8), axis=1)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def rotated_sum(table, floats, grid, origin, output_size, map_size):
  """``[K, oh, ow, C]`` averages of bilinear samples on rotated grids (module docstring).

  Args:
    table: ``[M, C]`` rows of the map(s) (an ``[N, H, W, C]`` map reshaped).
    floats: ``[K, 8]`` :attr:`Geometry.floats` in the compute dtype (float32
      or float64), which is also the accumulation dtype.
    grid: ``[K, 2]`` int32 samples per bin; 0 gives zeros.
    origin: ``[K]`` int32 table row of each box's map at ``(0, 0)``.
    output_size: static ``(oh, ow)``.
    map_size: static ``(H, W)``.

  Returns:
    ``[K, oh, ow, C]`` in the table's dtype.
  """
  return _forward(table, Geometry(floats, grid, origin), output_size, map_size)


def _rotated_sum_fwd(table, floats, grid, origin, output_size, map_size):
  out = _forward(table, Geometry(floats, grid, origin), output_size, map_size)
  return out, (table, floats, grid, origin)


def _rotated_sum_bwd(output_size, map_size, residuals, cotangent):
  table, floats, grid, origin = residuals
  geometry = Geometry(floats, grid, origin)
  grad = _table_grad(cotangent, geometry, output_size, map_size, table.shape)
  geometry_grad = _geometry_grad(table, cotangent, geometry, output_size, map_size)
  return dtypes.narrow(grad, table.dtype), geometry_grad, None, None


rotated_sum.defvjp(_rotated_sum_fwd, _rotated_sum_bwd)
