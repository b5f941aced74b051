"""Separable weighted sums of gathered cells: the engine of RoIAlign's average.

Given, per box, row taps ``(ry, wy)`` ``[K, oh, Ty]`` and column taps
``(rx, wx)`` ``[K, ow, Tx]`` (see :mod:`roipool_jax._src.sampling`), it
computes::

    out[k, i, j, :] = sum_a sum_b wy[k, i, a] * wx[k, j, b] * F[n_k, ry[k, i, a], rx[k, j, b], :]

How the work is bounded
-----------------------
Each term gathers one contiguous ``C`` vector of the NHWC map (a fast
gather, indexed by a flat vector). Taps are visited in blocks of ``S x S``
(``S = SLOTS``). When all taps fit one block (fixed ``sampling_ratio <= 2``),
every box is done in one fused pass. Otherwise the unit of work is a *bin*
(:class:`Units`): bin ``(i, j)`` uses ``ceil(count_y[i] / S) *
ceil(count_x[j] / S)`` blocks, counting only the taps it uses, which lie on
the map.

* One fused pass visits the first block of every bin and writes the output
  directly. Most bins of proposal-sized boxes need no more. (A zero-filled
  output updated chunk by chunk was measured a third slower: on XLA:CPU,
  filling a fresh buffer of ``K * oh * ow * C`` elements costs as much as the
  first pass itself.)
* The bins with more blocks are sorted by cost and revisited in small chunks
  (:func:`chunking.refine_chunks`), in which each bin walks its remaining
  blocks, so a chunk makes as many passes as its costliest bin. float32 and
  float64 partial sums continue from the first pass; so do 16-bit outputs
  of up to 16 MB of float32 sums, rounded at the end, while larger ones,
  rounded in the first pass, are recomputed from zero
  (:func:`chunking.refine_sums`). Those bins' taps are then skipped in the
  first pass (they read the box's first cell, cached): the bfloat16 forward
  took 0.95-0.96x the time on the benchmark's 512 large boxes and 0.98x on
  its 1000 RPN proposals (2-core Intel Xeon, alternated processes), with
  the same output bits.
* A bfloat16 map that the bins read many times over (large boxes on a small
  map) is widened to float32 once before the forward (not under ``grad``)
  when the sums continue in place (:func:`_widens_table`): the same values,
  so the same output bits.
* Chunks of thousands of bins (maps of few channels: R-FCN's 21 per bin)
  are 8x smaller for those revisits (:func:`chunking.costly_chunk`), so the
  few costliest bins no longer make a whole chunk loop as long as they do.
  On 300 R-FCN proposals (2-core Intel Xeon, float32, alternated processes,
  new/old time), ``ps_roi_align`` took 0.91-0.92x forward and 0.97-0.98x
  forward+backward bin-major, 0.98-1.01x and 0.94-0.98x channel-major; its
  first forward+backward call about 0.2 s longer (2.0 -> 2.2 s). The
  backward keeps its chunks: sending its costliest bins to chunks 8x
  smaller saved another 5-7% forward+backward but compiled the scatter loop
  twice (first call 2.9 s), and chunks 8x smaller throughout were 2-10%
  slower.

A bin outside the map costs one block of masked taps, all reading the
first cell of the box's map (cached), in the fused pass and nothing more,
so a box much larger than the map costs about what the map's cells cost.
Nothing of size ``K * H * W * C`` is ever built.

Gradients (a ``custom_vjp``)
----------------------------
* Features: the transpose, a scatter-add of ``wy * wx * cotangent`` into a
  ``[N * H * W, C]`` buffer in the compute dtype (float32; float64 for
  float64 features), chunk after chunk in a fixed order.
  XLA:CPU executes it sequentially, so the result is bitwise reproducible
  there; XLA:GPU uses atomics (order-dependent last bits).
* Weights: ``d wy[k, i, a] = sum_j sum_b wx * <F[cell], cotangent[k, i, j]>``
  (and the same for ``wx``), a second gather sweep. The ops differentiate the
  weights with respect to the box coordinates by ordinary autodiff; when the
  boxes need no gradient, XLA drops this sweep.

Unused taps (index -1) contribute exactly 0 even when their cell holds inf or NaN.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import chunking, dtypes

# Taps per axis gathered per pass: a pass reads [chunk, oh, ow] x SLOTS**2 cells
# (one fused pass), or [chunk] x SLOTS**2 cells (chunks of bins).
SLOTS = 4
# Bins per chunk, as elements ([chunk, C]) of: the forward's accumulators (kept
# small so they stay in cache), the backward's scatter updates, and one pass of
# the weight gradient. Picked by measurement.
_CHUNK_ELEMENTS = 1 << 16
_SCATTER_ELEMENTS = 1 << 16
_WEIGHT_GRAD_ELEMENTS = 1 << 16
# Chunks of many bins (few channels) are this many times smaller for the bins the forward
# revisits after its first pass (chunking.costly_chunk); picked by measurement on R-FCN's bins.
_COSTLY_DIVISOR = 8
# The forward (not under `grad`) widens a bfloat16 table to the compute dtype once, up front,
# when its first blocks alone read the table's rows at least this many times over and its
# sums continue in place (:func:`_widens_table`). Picked by measurement.
_WIDEN_READS = 8


class Plan(NamedTuple):
  """Integer part of the taps (no gradient): where every tap reads.

  Tap ``(a, b)`` of box ``k`` reads row ``origin[k] + row[..., a] * stride[k]
  + col[..., b]`` of the ``[M, C]`` table: ``origin`` is the table row of the
  box's map at ``(0, 0)`` and ``stride`` that map's width, so one table can
  hold several images (``origin = n * H * W``) or pyramid levels.
  """

  origin: jax.Array  # [K]
  stride: jax.Array  # [K]
  row: jax.Array  # [K, oh, Ty]
  col: jax.Array  # [K, ow, Tx]
  row_count: jax.Array  # [K]
  col_count: jax.Array  # [K]


class Blocking(NamedTuple):
  """How the taps of both axes are cut into blocks (static).

  Attributes:
    slots: ``(sy, sx)`` taps per block along y and x; a pass visits one
      ``sy x sx`` block of every bin.
    padded: ``(Ty', Tx')`` tap counts padded to whole blocks.
  """

  slots: tuple[int, int]
  padded: tuple[int, int]

  @property
  def single(self) -> bool:
    """Whether every bin's taps fit one block, so that one fused pass covers every box."""
    return self.slots == self.padded


def blocking(num_row_taps: int, num_col_taps: int, group: int = 1) -> Blocking:
  """Blocks of about ``SLOTS`` taps per axis that never split a group of ``group`` taps.

  ``group`` consecutive taps belong together (``sample_max`` reads a sample's
  two corner taps in the same pass, so it asks for ``group=2``): the slots are
  rounded up to a multiple of ``group``. This holds for any ``SLOTS >= 1``.
  """

  def axis(length: int) -> tuple[int, int]:
    if length % group:
      raise ValueError(f"{length} taps do not form whole groups of {group}.")
    slots = max(group, -(-min(length, SLOTS) // group) * group)
    return slots, -(-length // slots) * slots

  (sy, ty), (sx, tx) = axis(num_row_taps), axis(num_col_taps)
  assert sy % group == 0 and sx % group == 0 and ty % sy == 0 and tx % sx == 0
  return Blocking((sy, sx), (ty, tx))


def single_pass(num_row_taps: int, num_col_taps: int) -> bool:
  """Whether every bin's taps fit one block (:attr:`Blocking.single`)."""
  return blocking(num_row_taps, num_col_taps).single


def map_plan(image_index: jax.Array, ty, tx, map_shape) -> Plan:
  """The :class:`Plan` of taps ``ty``, ``tx`` (:class:`sampling.Taps`) on one ``[N, H, W, C]``
  map read as an ``[N * H * W, C]`` table."""
  _, height, width, _ = map_shape
  origin = image_index * (height * width)
  stride = jnp.full_like(image_index, width)
  return Plan(origin, stride, ty.index, tx.index, ty.count, tx.count)


def pad_taps(x: jax.Array, padded: int, value=0) -> jax.Array:
  return jnp.pad(x, [(0, 0), (0, 0), (0, padded - x.shape[2])], constant_values=value)


class TapTable(NamedTuple):
  """Per-box taps padded to whole blocks: what the kernels visit, chunk by chunk.

  Attributes:
    origin: ``[K]`` int32 table row of the box's map at ``(0, 0)``.
    stride: ``[K]`` int32 width of the box's map.
    row: ``[K, oh, Ty']`` int32 row of each row tap, -1 if unused.
    col: ``[K, ow, Tx']`` int32 column of each column tap, -1 if unused.
    wy: ``[K, oh, Ty']`` row-tap weights in the compute dtype.
    wx: ``[K, ow, Tx']`` column-tap weights.
    row_count: ``[K]`` int32 leading row taps in use (passes needed along y).
    col_count: ``[K]`` int32 leading column taps in use.
  """

  origin: jax.Array
  stride: jax.Array
  row: jax.Array
  col: jax.Array
  wy: jax.Array
  wx: jax.Array
  row_count: jax.Array
  col_count: jax.Array


class Block(NamedTuple):
  """One pass: ``cells[a][b]`` ``[B, oh, ow]`` flat cell (valid even for unused
  taps), ``used[a][b]`` ``[B, oh, ow]`` bool, ``wy [B, oh, S]``, ``wx [B, ow, S]``."""

  cells: list
  used: list
  wy: jax.Array
  wx: jax.Array


def block(c: TapTable, by, bx, slots: tuple[int, int], in_use=None):
  """Cells and weights of tap block ``(by, bx)`` of every box of ``c``.

  ``by`` and ``bx`` are scalars (the same block of every box) or ``[B]`` int32
  (each box its own block, see :func:`chunking.own_block`; boxes where
  ``in_use`` is False get no cell).
  """
  sy, sx = slots
  if jnp.ndim(by) == 0:
    iy = lax.dynamic_slice_in_dim(c.row, by * sy, sy, axis=2)
    ix = lax.dynamic_slice_in_dim(c.col, bx * sx, sx, axis=2)
    wy = lax.dynamic_slice_in_dim(c.wy, by * sy, sy, axis=2)
    wx = lax.dynamic_slice_in_dim(c.wx, bx * sx, sx, axis=2)
  else:

    def take(taps, first, size):  # [B, P, T] -> [B, P, size] from each box's own first tap
      if taps.shape[2] == size:  # a single block: every box's block is 0
        return taps
      index = first[:, None, None] + jnp.arange(size, dtype=jnp.int32)[None, None]
      index = jnp.broadcast_to(index, taps.shape[:2] + (size,))
      return jnp.take_along_axis(taps, index, axis=2, mode="promise_in_bounds")

    iy = jnp.where(in_use[:, None, None], take(c.row, by * sy, sy), -1)
    ix = take(c.col, bx * sx, sx)
    wy, wx = take(c.wy, by * sy, sy), take(c.wx, bx * sx, sx)
  row_base = c.origin[:, None, None] + jnp.maximum(iy, 0) * c.stride[:, None, None]
  col = jnp.maximum(ix, 0)
  cells = [[row_base[:, :, None, a] + col[:, None, :, b] for b in range(sx)] for a in range(sy)]
  used = [
    [(iy[:, :, None, a] >= 0) & (ix[:, None, :, b] >= 0) for b in range(sx)] for a in range(sy)
  ]
  return Block(cells, used, wy, wx)


def box_passes(c: TapTable, slots: tuple[int, int]):
  """``[B]`` tap blocks each box of ``c`` uses along y and along x."""
  return -(-c.row_count // slots[0]), -(-c.col_count // slots[1])


def prepare(wy, wx, plan: Plan, group: int = 1):
  """Pads the taps to whole blocks; returns the :class:`TapTable`, its blocking, whether one
  pass covers every box, and the cost (passes) of each box."""
  blk = blocking(plan.row.shape[2], plan.col.shape[2], group)
  (sy, sx), (ty, tx) = blk
  table = TapTable(
    origin=plan.origin,
    stride=plan.stride,
    row=pad_taps(plan.row, ty, -1),
    col=pad_taps(plan.col, tx, -1),
    wy=pad_taps(wy, ty),
    wx=pad_taps(wx, tx),
    row_count=plan.row_count,
    col_count=plan.col_count,
  )
  single = blk.single  # every box in one pass: no chunks, no loop
  cost = -(-plan.row_count // sy) * -(-plan.col_count // sx)
  return table, blk, single, cost


def term(table, cell, used, weight):
  """``weight * table[cell]`` ``[B, oh, ow, C]`` in the weights' dtype; exactly 0 if unused."""
  value = dtypes.gather_rows(table, cell).astype(weight.dtype)
  return jnp.where(used[..., None], weight * value, 0.0)


class Units(NamedTuple):
  """The bins of every box as units of work (``U = K * oh * ow``), each field ``[U]``.

  Attributes:
    row_block: first row of the bin's row-tap blocks in the ``[K * oh * By, sy]``
      block table (``By`` blocks per bin row).
    col_block: first row of its column-tap blocks in ``[K * ow * Bx, sx]``.
    origin: table row of the box's map at ``(0, 0)``.
    stride: width of the box's map.
    passes_y: row-tap blocks the bin uses (0: the bin has no sample).
    passes_x: column-tap blocks it uses.
  """

  row_block: jax.Array
  col_block: jax.Array
  origin: jax.Array
  stride: jax.Array
  passes_y: jax.Array
  passes_x: jax.Array


def _used_blocks(index: jax.Array, slots: int) -> jax.Array:
  """``[K, P]`` blocks of ``slots`` taps up to the last used tap of each bin."""
  t = jnp.arange(1, index.shape[2] + 1, dtype=jnp.int32)[None, None]
  count = jnp.max(jnp.where(index >= 0, t, 0), axis=2)
  return (count + slots - 1) // slots


def _units(taps: TapTable, slots: tuple[int, int]) -> Units:
  k, oh, ty = taps.row.shape
  ow, tx = taps.col.shape[1:]
  by, bx = ty // slots[0], tx // slots[1]
  shape = (k, oh, ow)
  box = jnp.arange(k, dtype=jnp.int32)[:, None, None]
  i = jnp.arange(oh, dtype=jnp.int32)[None, :, None]
  j = jnp.arange(ow, dtype=jnp.int32)[None, None, :]
  flat = lambda x: jnp.broadcast_to(x, shape).reshape(-1)  # noqa: E731
  return Units(
    row_block=flat((box * oh + i) * by),
    col_block=flat((box * ow + j) * bx),
    origin=flat(taps.origin[:, None, None]),
    stride=flat(taps.stride[:, None, None]),
    passes_y=flat(_used_blocks(taps.row, slots[0])[:, :, None]),
    passes_x=flat(_used_blocks(taps.col, slots[1])[:, None, :]),
  )


def _block_taps(taps: TapTable, slots):
  """The taps as block tables: ``[K * oh * By, sy]`` rows and weights, ``[K * ow * Bx, sx]``."""
  sy, sx = slots
  return (
    taps.row.reshape(-1, sy),
    taps.wy.reshape(-1, sy),
    taps.col.reshape(-1, sx),
    taps.wx.reshape(-1, sx),
  )


def _unit_pass(u: Units, blocks, t):
  """Cells ``[sy][sx]`` of ``[B]``, their use, and the ``[B, s]`` weights of pass ``t``.

  Each bin visits its own tap blocks (:func:`chunking.own_block`), so a chunk
  loops as long as its costliest bin.
  """
  rows, wys, cols, wxs = blocks
  by, bx, in_use = chunking.own_block(t, u.passes_y, u.passes_x)
  iy = rows.at[u.row_block + by].get(mode="promise_in_bounds")  # [B, sy]
  wy = wys.at[u.row_block + by].get(mode="promise_in_bounds")
  ix = cols.at[u.col_block + bx].get(mode="promise_in_bounds")  # [B, sx]
  wx = wxs.at[u.col_block + bx].get(mode="promise_in_bounds")
  base = u.origin[:, None] + jnp.maximum(iy, 0) * u.stride[:, None]
  cells = [
    [base[:, a] + jnp.maximum(ix[:, b], 0) for b in range(ix.shape[1])] for a in range(iy.shape[1])
  ]
  used = [
    [in_use & (iy[:, a] >= 0) & (ix[:, b] >= 0) for b in range(ix.shape[1])]
    for a in range(iy.shape[1])
  ]
  return cells, used, wy, wx, (by, bx)


def _unit_passes(u: Units):
  """Passes a chunk of bins makes: as many as its costliest bin has blocks."""
  return chunking.own_block_passes(u.passes_y, u.passes_x)


def _unit_cost(u: Units):
  return u.passes_y * u.passes_x


def _first_block(table, c: TapTable, slots, skip=None):
  """``[K, oh, ow, C]`` sums of every bin's first tap block, in the weights' dtype.

  ``skip``: ``[K, oh, ow]`` bins whose taps all read the box's first cell, unused.
  """
  blk = block(c, 0, 0, slots)
  cells, used = blk.cells, blk.used
  if skip is not None:
    first_cell = jnp.broadcast_to(c.origin[:, None, None], skip.shape)
    cells = [[jnp.where(skip, first_cell, x) for x in row] for row in cells]
    used = [[x & ~skip for x in row] for row in used]
  acc = jnp.zeros((), c.wy.dtype)
  for a in range(slots[0]):
    wya = blk.wy[:, :, None, a, None]
    row_sum = sum(
      term(table, cells[a][b], used[a][b], blk.wx[:, None, :, b, None]) for b in range(slots[1])
    )
    acc = acc + wya * row_sum
  return acc


def max_of_sums(table: jax.Array, terms) -> jax.Array:
  """Per element, the max over ``terms`` of their tap sums; forward only.

  Args:
    table: ``[M, C]`` rows of the map(s), as for :func:`tap_sum`.
    terms: ``(wy, wx, plan)`` triples of the same ``[K, oh, ow]`` bins whose
      taps fit one block each (at most ``SLOTS`` taps per axis).

  Returns:
    ``[K, oh, ow, C]`` in the table's dtype: each sum is the one :func:`tap_sum`
    makes (rounded to the table's dtype), then they are maxed in order
    (``jnp.maximum``). One fused kernel writes only the result; taps of more
    than one block (a smaller ``SLOTS``) fall back to a max of :func:`tap_sum`.
  """
  prepared = [prepare(wy, wx, plan) for wy, wx, plan in terms]
  if not all(single for _, _, single, _ in prepared):
    return functools.reduce(jnp.maximum, [_forward(table, *term) for term in terms])

  def compute():
    sums = [_first_block(table, taps, slots) for taps, (slots, _), _, _ in prepared]
    return functools.reduce(jnp.maximum, [dtypes.narrow(v, table.dtype) for v in sums])

  return boxes_lib.computed_once(compute, terms[0][2].row_count)


def _widens_table(table: jax.Array, bins: int, slots, sums_continue: bool) -> bool:
  """Whether the forward reads a bfloat16 table widened to the compute dtype (static).

  Bins of several tap blocks gather their rows in a loop, where widening
  bfloat16 bit patterns costs more than in the fused first pass. When the
  table is small next to what the first blocks alone read (``_WIDEN_READS``
  times its rows: large boxes on a small map, adaptive sampling) and the sums
  continue in place, one widened copy of the table is cheaper: the bfloat16
  forward of adaptive ``roi_align`` took 0.84-0.85x the time on 256 boxes 10x
  a 64 x 64 map and 0.95x on map-sized ones (2-core AMD EPYC, alternated in
  one process). Where the sums are recomputed it was slower (1.05-1.46x: 1000
  RPN proposals, ``precise_roi_pool`` on 512 boxes), as it was on R-FCN's
  bin-major ``ps_roi_align``, whose first blocks read its table twice over
  (1.11x). The values are the same, so the output has the same bits either
  way. float16 rows are converted by a vector instruction and cost no more
  than float32 ones: widening a float16 table took 1.04-1.11x the time on the
  same boxes.
  """
  reads = bins * slots[0] * slots[1]
  bfloat16 = table.dtype == jnp.bfloat16
  return bfloat16 and sums_continue and reads >= _WIDEN_READS * table.shape[0]


def _forward(table: jax.Array, wy, wx, plan: Plan, widen: bool = False) -> jax.Array:
  """The tap sums; ``widen``: the primal forward may widen a bfloat16 table
  (:func:`_widens_table`). The forward of the vjp does not: under ``grad`` that
  measured slower (1.07x forward+backward on the same boxes)."""
  channels = table.shape[1]
  dtype = table.dtype
  taps, (slots, _), single, _ = prepare(wy, wx, plan)
  oh, ow = wy.shape[1], wx.shape[1]

  if single:  # one fused pass over all boxes
    # One buffer: consumers that compare values (a later max) see one rounding.
    # Narrowed to 16 bits in the same place: a separate pass over the result was measured
    # 3x slower than the whole sum on XLA:CPU.
    return boxes_lib.computed_once(
      lambda: dtypes.narrow(_first_block(table, taps, slots), table.dtype), plan.row_count
    )

  k = plan.origin.shape[0]
  recomputes = chunking.recomputes_sums(k * oh * ow * channels, wy.dtype, dtype)
  if widen and _widens_table(table, k * oh * ow, slots, not recomputes):
    table = table.astype(wy.dtype)  # exact; the sums are rounded to `dtype` as before
  blocks = _block_taps(taps, slots)

  def unit_pass(u):
    def add_pass(t, acc):
      cells, used, cwy, cwx, _ = _unit_pass(u, blocks, t)
      for a in range(slots[0]):
        row_sum = sum(
          term(table, cells[a][b], used[a][b], cwx[:, b, None]) for b in range(slots[1])
        )
        acc = acc + cwy[:, a, None] * row_sum
      return acc

    return add_pass

  units = _units(taps, slots)
  chunk = chunking.chunk_size(k * oh * ow, channels, _CHUNK_ELEMENTS)
  chunk = chunking.costly_chunk(chunk, _COSTLY_DIVISOR)
  # Every bin's first block in one fused pass that writes the output (no zero-filled buffer
  # to update); then only the bins with more blocks are visited again, in place. Where those
  # are recomputed from their first block (large 16-bit outputs), the first pass skips them.
  skip = (_unit_cost(units) > 1).reshape(k, oh, ow) if recomputes else None
  first = _first_block(table, taps, slots, skip).reshape(-1, channels)
  out = chunking.refine_sums(first, unit_pass, _unit_passes, units, _unit_cost(units), chunk, dtype)
  return out.reshape(k, oh, ow, channels)


def _features_grad(cotangent, wy, wx, plan: Plan, table_shape) -> jax.Array:
  """Scatter-add transpose in the weights' dtype, in a fixed (chunk, pass, tap) order."""
  channels = table_shape[1]
  taps, (slots, _), _, _ = prepare(wy, wx, plan)
  k, oh, ow = cotangent.shape[:3]
  blocks = _block_taps(taps, slots)
  units = _units(taps, slots)

  def unit_chunk(grad, chunk):
    u, cot = chunk

    def scatter_pass(t, grad):
      cells, used, cwy, cwx, _ = _unit_pass(u, blocks, t)
      for a in range(slots[0]):
        for b in range(slots[1]):
          w = jnp.where(used[a][b], cwy[:, a] * cwx[:, b], 0.0)
          grad = grad.at[cells[a][b]].add(w[:, None] * cot, mode="promise_in_bounds")
      return grad

    return lax.fori_loop(0, _unit_passes(u), scatter_pass, grad)

  grad = jnp.zeros(table_shape, wy.dtype)
  cot = cotangent.reshape(-1, channels)
  chunk = chunking.chunk_size(k * oh * ow, channels, _SCATTER_ELEMENTS)
  return chunking.fold_chunks(unit_chunk, grad, units, _unit_cost(units), chunk, cot)


def _weights_grad(table, cotangent, wy, wx, plan: Plan):
  """Gradients of the tap weights: one gather sweep reduced over channels."""
  channels = table.shape[1]
  taps, (slots, _), _, _ = prepare(wy, wx, plan)
  k, oh, ow = cotangent.shape[:3]
  blocks = _block_taps(taps, slots)
  units = _units(taps, slots)

  def unit_chunk(grads, chunk):
    u, cot = chunk

    def grad_pass(t, grads):
      gy, gx = grads
      cells, used, cwy, cwx, (by, bx) = _unit_pass(u, blocks, t)
      gy_blk = [0.0] * slots[0]
      gx_blk = [0.0] * slots[1]
      for a in range(slots[0]):
        for b in range(slots[1]):
          value = dtypes.gather_rows(table, cells[a][b]).astype(cot.dtype)
          dot = jnp.where(used[a][b], jnp.sum(value * cot, axis=-1), 0.0)  # [B]
          gy_blk[a] = gy_blk[a] + dot * cwx[:, b]
          gx_blk[b] = gx_blk[b] + dot * cwy[:, a]
      gy = gy.at[u.row_block + by].add(jnp.stack(gy_blk, -1), mode="promise_in_bounds")
      gx = gx.at[u.col_block + bx].add(jnp.stack(gx_blk, -1), mode="promise_in_bounds")
      return gy, gx

    return lax.fori_loop(0, _unit_passes(u), grad_pass, grads)

  init = (jnp.zeros_like(blocks[1]), jnp.zeros_like(blocks[3]))
  cot = cotangent.reshape(-1, channels)
  chunk = chunking.chunk_size(k * oh * ow, channels, _WEIGHT_GRAD_ELEMENTS)
  gy, gx = chunking.fold_chunks(unit_chunk, init, units, _unit_cost(units), chunk, cot)
  gy, gx = gy.reshape(taps.wy.shape), gx.reshape(taps.wx.shape)
  return gy[:, :, : wy.shape[2]], gx[:, :, : wx.shape[2]]


@jax.custom_vjp
def tap_sum(table: jax.Array, wy: jax.Array, wx: jax.Array, plan: Plan) -> jax.Array:
  """``[K, oh, ow, C]`` separable tap sums; see the module docstring.

  Args:
    table: ``[M, C]`` rows of the map(s) (an ``[N, H, W, C]`` map reshaped;
      see :class:`Plan`).
    wy: ``[K, oh, Ty]`` row-tap weights in the compute dtype (float32 or
      float64), which is also the accumulation dtype.
    wx: ``[K, ow, Tx]`` column-tap weights, same dtype.
    plan: the integer cells and counts (:class:`Plan`).

  Returns:
    ``[K, oh, ow, C]`` in the table's dtype (accumulated in the weights' dtype).
  """
  return _forward(table, wy, wx, plan, widen=True)


def _tap_sum_fwd(table, wy, wx, plan):
  return _forward(table, wy, wx, plan), (table, wy, wx, plan)


def _tap_sum_bwd(residuals, cotangent):
  table, wy, wx, plan = residuals
  grad = dtypes.narrow(_features_grad(cotangent, wy, wx, plan, table.shape), table.dtype)
  gy, gx = _weights_grad(table, cotangent, wy, wx, plan)
  return grad, gy, gx, None


tap_sum.defvjp(_tap_sum_fwd, _tap_sum_bwd)
