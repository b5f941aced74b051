"""Exact max over integer rectangles of a feature map, and its gradient.

This is the engine of ``roi_pool``: given, per box, the row ranges
``[hs, he)`` of its ``oh`` bin rows and the column ranges ``[ws, we)`` of its
``ow`` bin columns, it returns the channel-wise maximum over each
``[hs, he) x [ws, we)`` rectangle, and sends each output cotangent to the
first maximal cell of its bin in row-major order (torchvision's tie rule).

How the work is bounded
-----------------------
The unit of work is a *bin*, not a box. The cells of a bin are numbered in
row-major order, and a *pass* gathers cells ``[p * S, p * S + S)`` of a bin
(``S = SLOTS``; each cell is one contiguous ``C`` vector of the NHWC map, a
fast gather), masks the slots past the bin's cell count and reduces them.

* One fused pass over all ``K * oh * ow`` bins makes pass 0 and writes the
  output directly. Bins of at most ``S`` cells are then done. (A zero-filled
  output updated chunk by chunk was measured slower: on XLA:CPU, filling a
  fresh buffer of ``K * oh * ow * C`` elements costs about what the pass
  costs.)
* The larger bins are sorted by the passes they need, ``ceil(cells / S)``,
  and revisited in small sequential chunks (:func:`chunking.refine_chunks`),
  continuing from their partial maxima (a maximum rounds nothing, so 16-bit
  ones are exact too). Within a chunk, a loop with a data-dependent trip
  count makes passes 1, 2, ...; a chunk makes as many passes as its largest
  bin needs. (Sorting by passes rather than by cell count makes the same
  chunks loop as long, but keeps bins of one pass count in their original
  order, so a chunk's rows lie closer together in memory: forward 0.8-0.96x
  the time on the VGG16 config in paired runs, the other configs within
  run-to-run noise.)

So the total work is about ``C`` times the number of cells the bins hold,
after clipping to the map, plus one pass per bin: bins (and parts of bins)
outside the map read at most one cached cell, and a box far larger than the
map costs about what the map's cells cost. Only bin geometry (``[K, oh,
ow]`` integers) is materialized besides the output (and, for 16-bit maps,
the map's order keys: below).

Gradient
--------
The forward pass keeps no arg-max: its residuals are the map, the bins and
its own output. The backward pass visits the bins in the same sorted order,
the bins of one pass in chunks 8x larger than the others (one pass whatever
the chunk, and less work per bin outside the loop: forward+backward 0.83-0.84x
the time on the article config and 0.84-1.09x, about 0.9x, on VGG16; chunks
that large for every bin took 2.5x on boxes 10x the map, where a chunk of
cheap bins then loops as long as its costliest; the chunks of one-pass bins
make their single pass with no loop, so that its initial indices, gathers and
selects fuse into one kernel: forward+backward 0.93-0.95x the time on the
article config, 0.95-0.99x on VGG16). Per chunk it gathers the
bins' maxima and cotangents, finds each bin's first maximal cell per channel
by a sweep over the same cells that visits them last to first (so that the
first maximal cell in row-major order is the one that stays), and adds the
cotangents there. (Tracking the arg-max inside the max
sweep was measured 1.2-2x slower on XLA:CPU, per cell or per pass of
``SLOTS`` cells: XLA splits such a loop body into one fusion per carried
array, which stores the gathered rows and recomputes the running maxima in
the arg-max's fusion. Carrying one array instead, each cell's value and rank
packed into an order-preserving int64 key, was measured to double the sweep's
time (twice the bytes per cell). Keeping a ``[K, oh, ow, C]`` int32 arg-max as a
residual, as torchvision does, costs a pass to initialize it, a pass to write
it in box order and one to read it back, and was measured slower.)

Each chunk's additions are one scatter-add of single elements, at flat
element indices ``cell * C + channel``, into a flat ``[N * H * W * C]``
buffer in the compute dtype; bins without a maximal cell (empty, or a NaN
maximum) point past the end and are dropped. On XLA:CPU such a scatter moves
an element 3x faster than one indexed by ``(cell, channel)`` pairs into
``[N * H * W, C]``, and is faster per bin than adding whole ``C`` rows of
mostly zeros for every cell of small bins (both measured); its cost does not
depend on the bins' size. Maps too large for an int32 element index
(``(N * H * W + 1) * C > 2**31``) record cells and scatter ``(cell,
channel)`` pairs.

The additions happen in a fixed order: chunk by chunk (bins sorted by pass
count, ties in ``(k, i, j)`` order), then bin by bin and channel by channel.
XLA:CPU executes a scatter sequentially, so the gradient is bitwise
reproducible. (XLA:GPU adds colliding updates atomically, in no fixed
order, unless ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` makes XLA sort
them first; the ``"einsum"`` implementation is deterministic everywhere.)

16-bit maps
-----------
bfloat16 and float16 maps are searched as :func:`dtypes.order_keys`: uint16
keys whose unsigned order is the values' order (``-0`` and ``+0`` share one,
NaN has the largest), made in one pass over the map (:func:`search_table`).
Both sweeps gather the keys (half the bytes of float32 rows) and compare
them as integers; the output is the maxima's bit patterns, and the backward
compares against the keys of the forward's maxima as written. A maximum
rounds nothing, so these are the maxima and arg-maxima of float32.

Every gather is indexed by a ``[B]`` vector (one slot of every bin of a
chunk at a time): on XLA:CPU these move whole ``C`` rows several times faster
than one gather indexed by ``[B, S]``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking, dtypes

# Cells gathered per bin and pass (one pass reads [chunk, SLOTS, C]). 8 against 4, alternated
# compiled programs on a 2-core Intel Xeon: float32 forward 0.68-0.98x and forward+backward
# 0.87-0.97x the time on the VGG16, article and map-sized configs; bfloat16 forward
# 0.70-1.03x, forward+backward 0.96-1.03x (on an AMD EPYC: no clear difference).
SLOTS = 8
# Bins per chunk: about this many output elements, so a chunk's running maxima
# stay in cache; bins are sorted by passes first, so each chunk loops only about
# as long as its own bins need. Both constants were picked by measurement.
_CHUNK_ELEMENTS = 1 << 16
# The backward folds the bins of one pass in larger chunks of their own (about this many
# elements): they cost one pass whatever the chunk, and each chunk costs work outside its
# loop. Bins of more passes keep _CHUNK_ELEMENTS chunks.
_ONE_PASS_CHUNK_ELEMENTS = 1 << 19
# Arg-maxima are flat element indices when they fit below this (int32);
# larger maps record cells, and the backward scatters (cell, channel) pairs.
FLAT_INDEX_LIMIT = 2**31
# Maps of at most this many cells per image split a cell's rank in its bin into
# (row, column) in float32 (:func:`_row_col`); larger ones divide integers.
FLOAT_RANK_LIMIT = 2**20


# Scatter of single elements of a flat buffer: indices [M, 1], updates [M, 1] (windows of
# one element). This is the form XLA canonicalizes every scatter to; written so, the
# updates reach it as a bitcast of the chunk's [B, C] rows. From [M] updates, layout
# assignment gave the reshape a transposed layout and copied it element by element.
_ELEMENTS = lax.ScatterDimensionNumbers(
  update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,)
)


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
  """How each bin's cells are enumerated, each field ``[K * oh * ow]``.

  Attributes:
    cells: int32 number of cells in the bin (0: empty).
    cols: int32 width of the bin in cells (at least 1), to turn a cell's rank
      into its row and column.
    origin: int32 flat cell ``(n * H + h) * W + w`` of the bin's first cell.
    inv_cols: float32 ``1 / cols`` (see :func:`_row_col`), or None for maps of
      more than ``FLOAT_RANK_LIMIT`` cells per image.
  """

  cells: jax.Array
  cols: jax.Array
  origin: jax.Array
  inv_cols: jax.Array | None


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
  cells, cols = flat(rows * cols), flat(jnp.maximum(cols, 1))
  inv_cols = 1.0 / cols.astype(jnp.float32) if height * width <= FLOAT_RANK_LIMIT else None
  return CellPlan(cells=cells, cols=cols, origin=flat(origin), inv_cols=inv_cols)


def _row_col(rank: jax.Array, cols: jax.Array, inv_cols: jax.Array | None):
  """``(rank // cols, rank % cols)`` for int32 ``0 <= rank < FLOAT_RANK_LIMIT``, ``cols >= 1``.

  With ``inv_cols`` (float32 ``1 / cols``) the row is ``floor((rank + 0.5) *
  inv_cols)``: ``(rank + 0.5) / cols`` lies at least ``0.5 / cols`` from an
  integer, and the two roundings move it by less than ``rank * 2**-22 / cols
  < 0.5 / cols``, so the floor is exact. A pass's cells are then cheap
  element-wise arithmetic that XLA fuses into each of their consumers;
  integer division is not, and costs the arg-max sweep three extra kernels
  per pass (measured: 10-20% of the backward on large bins). Ranks past a
  bin's cells may come out wrong; their slots are masked.
  """
  if inv_cols is None:
    return rank // cols, rank % cols
  row = jnp.floor((rank.astype(jnp.float32) + 0.5) * inv_cols).astype(jnp.int32)
  return row, rank - row * cols


def _cells_of_pass(p: CellPlan, t, width: int):
  """Slots ``[t * S, (t + 1) * S)`` of every bin of a chunk: flat cells and validity, ``[B, S]``."""
  s = t * SLOTS + jnp.arange(SLOTS, dtype=jnp.int32)[None]
  valid = s < p.cells[:, None]
  inv_cols = None if p.inv_cols is None else p.inv_cols[:, None]
  row, col = _row_col(s, p.cols[:, None], inv_cols)
  cell = jnp.where(valid, p.origin[:, None] + row * width + col, 0)
  return cell, valid


def _bin_passes(p: CellPlan):
  """Passes each bin needs, ``ceil(cells / SLOTS)``: the key the chunks are sorted by."""
  return chunking.grid_passes(p.cells, SLOTS)


def _passes(p: CellPlan):
  """Passes a chunk of bins makes: its largest bin's."""
  return jnp.max(_bin_passes(p), initial=0)


def _chunk(num_bins: int, channels: int, budget: int | None = None) -> int:
  """Bins per chunk: about ``budget`` (default ``_CHUNK_ELEMENTS``, read when called)
  elements of ``channels`` each."""
  return chunking.chunk_size(num_bins, channels, budget or _CHUNK_ELEMENTS)


def element_index(map_shape: tuple[int, ...]) -> bool:
  """Whether arg-maxima over a map of this shape are flat element indices (static).

  They are when ``(N * H * W + 1) * C`` (the indices and the no-cell marker)
  fits in int32; larger maps record cells instead.
  """
  n_img, height, width, channels = map_shape
  return (n_img * height * width + 1) * channels <= FLAT_INDEX_LIMIT


def _arg_sweep(table, p: CellPlan, best, width: int, unit: int, nowhere: int, one_pass: bool):
  """First maximal cell of each bin of a chunk and channel, ``[B, C]`` int32.

  The sweep visits the cells last to first, so the first maximal cell in
  row-major order writes last. With ``unit == C`` the result is the flat
  element index ``cell * C + c``, with ``unit == 1`` the cell; bins without
  a cell equal to ``best`` (empty, or a NaN maximum) keep ``nowhere + c``
  (or ``nowhere``), past the end of the map. With ``one_pass`` (static) every
  bin has at most ``SLOTS`` cells, and the sweep is one pass with no loop.
  """
  passes = 1 if one_pass else _passes(p)
  lanes = jnp.arange(best.shape[1], dtype=jnp.int32)[None] if unit > 1 else 0

  def arg_pass(u, arg):
    t = passes - 1 - u
    cell, valid = _cells_of_pass(p, t, width)
    first = cell * unit
    for s in reversed(range(SLOTS)):
      # 16-bit keys are compared as int32, the width of the select they feed (a uint16
      # compare that fed an int32 select was measured 5-9% slower).
      v = dtypes.gather_rows(table, cell[:, s]).astype(best.dtype)
      arg = jnp.where((v == best) & valid[:, s, None], first[:, s, None] + lanes, arg)
    return arg

  init = jnp.broadcast_to(nowhere + lanes, best.shape).astype(jnp.int32)
  if one_pass:
    # The initial indices, the gathers and the selects in one fusion, written to a buffer
    # of its own: fused into the scatter's index operand instead, they took 2.5x the time.
    return _own_buffer(arg_pass(0, init), jnp.minimum(_passes(p), 1))
  return lax.fori_loop(0, passes, arg_pass, init)


def _own_buffer(rows: jax.Array, trips: jax.Array) -> jax.Array:
  """``rows``, written to a buffer of their own before a scatter reads them.

  ``trips`` is a traced 0 or 1 (XLA cannot see that it is at most 1). The
  rows pass through a loop of that many trips, whose select is never taken:
  as a loop operand they are computed into a ``[B, C]`` buffer, a copy of
  whole rows. Otherwise XLA:CPU fuses their gather into the element-wise
  loop that produces the scatter's ``[B * C, 1]`` update operand, which
  takes about twice as long (measured: 66 against 30 us per chunk of 128
  bins of 512 channels; forward+backward 0.87-0.96x the time on the
  ``roi_pool`` benchmark configs, float32 and bfloat16). XLA forwards a
  plain pass-through out of the loop; carrying the rows through the arg-max
  sweep instead costs a select per pass (1.12x on map-sized boxes).
  """
  keep = lambda u, r: jnp.where(u < 0, jnp.zeros((), r.dtype), r)  # noqa: E731
  return lax.fori_loop(0, trips, keep, rows)


def search_table(features: jax.Array) -> jax.Array:
  """``[N * H * W, C]`` rows that the max and arg-max sweeps gather.

  The map itself, except for 16-bit maps (bfloat16, float16): their
  :func:`dtypes.order_keys`, one elementwise pass over the map. A maximum
  rounds nothing, so it can be found among 16-bit values as well as among
  float32 ones, and among keys a sweep gathers half the bytes of float32 rows
  and compares 16 lanes to a vector instruction. (Widening each gathered
  bfloat16 row to float32, as the summing ops do, made the max sweep 1.7x as
  slow as float32's on bins of thousands of cells, in a profile.)
  """
  table = features.reshape(-1, features.shape[-1])
  if dtypes.is_half(features.dtype):
    return dtypes.order_keys(dtypes.to_bits(table), features.dtype)
  return table


def bin_max(features: jax.Array, bins: Bins) -> tuple[jax.Array, jax.Array]:
  """Max over every bin rectangle; see the module docstring.

  Args:
    features: ``[N, H, W, C]`` map.
    bins: :class:`Bins` for K boxes with ``oh`` x ``ow`` bins.

  Returns:
    ``(values, written)``: ``values`` ``[K, oh, ow, C]`` in the features'
    dtype, 0 for empty bins (for 16-bit maps a maximal zero is +0, and a NaN
    keeps no payload); ``written`` the same maxima ``[K * oh * ow, C]`` as the
    kernel wrote them (bfloat16 as bit patterns, :func:`dtypes.narrow_bits`),
    which :func:`bin_max_grad` reads without a conversion pass of its own.
  """
  height, width, channels = features.shape[1:]
  table = search_table(features)
  keyed = table.dtype == jnp.uint16
  # Below every value: the identity of the maximum (exact for any maximum).
  low = jnp.zeros((), jnp.uint16) if keyed else jnp.array(-jnp.inf, table.dtype)

  def max_pass(p: CellPlan):
    def update(t, best):
      cell, valid = _cells_of_pass(p, t, width)
      for s in range(SLOTS):  # one [B]-indexed gather per slot: XLA:CPU's fast gather
        v = dtypes.gather_rows(table, cell[:, s])  # [B, C]
        best = jnp.maximum(best, jnp.where(valid[:, s, None], v, low))
      return best

    return update

  def finish(p: CellPlan, best):  # empty bins: 0; 16-bit maps: the maxima's bit patterns
    if keyed:
      bits = jnp.where(p.cells[:, None] > 0, dtypes.key_bits(best), jnp.uint16(0))
      return dtypes.carry_bits(bits, features.dtype)
    return jnp.where(p.cells[:, None] > 0, best, 0.0)

  k, oh = bins.row_start.shape
  ow = bins.col_start.shape[1]
  plan = _plan(bins, height, width)
  # The first SLOTS cells of every bin in one fused pass that writes the output; then only
  # the larger bins are visited again, continuing from their partial maxima.
  first = finish(plan, max_pass(plan)(0, jnp.full((plan.cells.shape[0], channels), low)))

  def refine(p: CellPlan, partial):
    best = dtypes.order_keys(dtypes.to_bits(partial), features.dtype) if keyed else partial
    return finish(p, lax.fori_loop(1, _passes(p), max_pass(p), best))

  chunk = _chunk(k * oh * ow, channels)
  out = chunking.refine_chunks(refine, first, plan, _bin_passes(plan), chunk, done=1)
  return dtypes.from_bits(out.reshape(k, oh, ow, channels), features.dtype), out


def bin_max_grad(
  features: jax.Array, bins: Bins, written: jax.Array, cotangent: jax.Array
) -> jax.Array:
  """Transpose of :func:`bin_max`: each cotangent goes to its bin's first maximal cell.

  Visits the bins in the forward pass's chunks. Per chunk it finds each bin's
  first maximal cell per channel (:func:`_arg_sweep`, against the forward's
  maxima) and adds the chunk's cotangents there, in one scatter-add of
  single elements into the flat gradient (see the module docstring).

  Args:
    features: ``[N, H, W, C]`` map the forward pass read.
    bins: the forward pass's :class:`Bins`.
    written: the forward pass's maxima as :func:`bin_max` wrote them.
    cotangent: ``[K, oh, ow, C]`` output cotangent, in the features' dtype (each
      chunk's rows are widened as they are gathered).

  Returns:
    ``[N, H, W, C]`` gradient in the compute dtype.
  """
  map_shape = features.shape
  n_img, height, width, channels = map_shape
  cells = n_img * height * width
  dtype = dtypes.compute_dtype(features.dtype)
  if cells == 0 or written.size == 0:
    return jnp.zeros(map_shape, dtype)
  table = search_table(features)
  keyed = table.dtype == jnp.uint16
  unit = channels if element_index(map_shape) else 1
  nowhere = cells * unit

  def add_chunk(grad, chunk, one_pass=False):
    p, (best, cot) = chunk
    if keyed:  # the maxima's keys, as int32; a NaN maximum gets key 0, which no cell has
      best = dtypes.order_keys(dtypes.as_bits(best, features.dtype), features.dtype)
      best = jnp.where(best == 0xFFFF, 0, best.astype(jnp.int32))
    arg = _arg_sweep(table, p, best, width, unit, nowhere, one_pass)
    cot = _own_buffer(cot, jnp.minimum(_passes(p), 1))
    if unit > 1:  # flat element indices; those past the end (no maximal cell) are dropped
      # lax, not `.at[]`: jnp would add a pass over the indices to wrap negative ones.
      return lax.scatter_add(
        grad,
        arg.reshape(-1, 1),
        cot.reshape(-1, 1),
        _ELEMENTS,
        mode=lax.GatherScatterMode.FILL_OR_DROP,
      )
    update = jnp.where(arg < cells, cot, jnp.zeros((), dtype))
    lanes = jnp.arange(channels, dtype=jnp.int32)[None]
    return grad.at[jnp.minimum(arg, cells - 1), lanes].add(update, mode="promise_in_bounds")

  k, oh = bins.row_start.shape
  ow = bins.col_start.shape[1]
  plan = _plan(bins, height, width)
  zeros = jnp.zeros((cells * channels,) if unit > 1 else (cells, channels), dtype)
  chunk = _chunk(k * oh * ow, channels)
  one_pass_chunk = _chunk(k * oh * ow, channels, _ONE_PASS_CHUNK_ELEMENTS)
  rows = (written, cotangent.reshape(-1, channels))
  grad = chunking.fold_chunks(
    add_chunk,
    zeros,
    plan,
    _bin_passes(plan),
    chunk,
    rows,
    done=1,
    cheap_chunk=one_pass_chunk,
    cheap_fn=functools.partial(add_chunk, one_pass=True),
  )
  return grad.reshape(map_shape)
