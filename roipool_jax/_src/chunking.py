"""Visiting boxes in small sequential chunks, ordered by their cost.

The RoI kernels do per-box work that varies with the box (cells per bin,
interpolation taps per bin). XLA needs static shapes, so a kernel processes a
*chunk* of boxes at a time and loops, inside the chunk, as long as its most
expensive box needs (a data-dependent trip count). Sorting the boxes by cost
first makes the chunks homogeneous: no small box waits for a much larger
neighbour. Chunks are visited sequentially, so the temporaries of one chunk
are all that is alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import dtypes


def split(per_box: Any, chunk: int) -> Any:
  """Pads ``per_box`` leaves with zero boxes to whole chunks: ``[chunks, chunk, ...]``."""
  k = jax.tree.leaves(per_box)[0].shape[0]
  num_chunks = -(-k // chunk)

  def split_leaf(x):
    x = jnp.pad(x, [(0, num_chunks * chunk - k)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((num_chunks, chunk) + x.shape[1:])

  return jax.tree.map(split_leaf, per_box)


def _merge(per_chunk: Any, k: int) -> Any:
  """Inverse of :func:`split`: ``[chunks, chunk, ...]`` leaves back to the first ``k`` boxes."""
  return jax.tree.map(lambda y: y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])[:k], per_chunk)


def sort_order(cost: jax.Array) -> jax.Array:
  """``argsort(cost)`` for ``[K]`` int costs, ties in box order, as one key-only sort.

  The key ``cost * K + box`` packs both into one int32 (costs are clipped so
  it fits; the order only groups boxes of similar cost, so clipping very
  large costs changes nothing but their grouping). XLA:CPU sorts plain keys
  3x faster than (key, index) pairs.
  """
  k = cost.shape[0]
  top = max((2**31 - 1) // max(k, 1) - 1, 0)
  key = jnp.clip(cost, 0, top).astype(jnp.int32) * k + jnp.arange(k, dtype=jnp.int32)
  return lax.sort(key) % k if k else key


def _sorted_chunks(per_box: Any, cost: jax.Array, chunk: int):
  """Sorts ``per_box`` leaves by ``cost`` and splits them into ``[chunks, chunk, ...]``.

  Each box also carries ``left = K - (its original index)``, so that the zero
  padding of the last chunk (``left == 0``) points past the end. Callers must
  make a zero cost/count mean "nothing to do" for the padding boxes.

  Returns:
    ``(per_box, left)`` chunks and their number.
  """
  k = cost.shape[0]
  order = sort_order(cost)
  left = (k - order).astype(jnp.int32)
  return split((jax.tree.map(lambda x: x[order], per_box), left), chunk), -(-k // chunk)


# Chunks of at least this many boxes are made smaller for the costly boxes (costly_chunk).
COSTLY_MIN_CHUNK = 1024


def costly_chunk(chunk: int, divisor: int) -> int:
  """Boxes per chunk for the costly boxes that :func:`refine_chunks` (or :func:`fold_chunks`
  with ``done``) visits: ``chunk // divisor`` when ``chunk >= COSTLY_MIN_CHUNK``, else
  ``chunk``.

  Sorted by cost, the few costliest boxes share the last chunk, which loops
  as long as the costliest of them for all of its boxes. In chunks of
  thousands of bins (bins of few channels, as R-FCN's 21) that chunk can
  cost more than all the others: with 300 R-FCN proposals, ``ps_roi_pool``'s
  chunks of 1560 bins made 26520 bin-passes for 10193 needed (13650 in
  chunks of 390), ``ps_roi_align``'s chunks of 3120 bins 12480 for 4268
  (5070 in chunks of 390). Maps of hundreds of channels get chunks of
  128-256 bins, whose costs spread less: on the other benchmark configs,
  smaller chunks for the costliest bins would save at most 17% of the passes
  for 1.1-8x the loop iterations, and made ``roi_pool``'s forward 1.01-1.05x
  slower on the article and VGG16 configs.
  """
  return max(chunk // divisor, 1) if chunk >= COSTLY_MIN_CHUNK else chunk


def chunk_size(num_boxes: int, per_box_elements: int, budget: int) -> int:
  """Boxes per chunk so that a chunk holds about ``budget`` elements (at least 1 box)."""
  return max(1, min(num_boxes, budget // max(1, per_box_elements)))


def _with_rows(rows: Any, k: int) -> Callable:
  """``(data, left) -> data``, or ``(data, rows chunk)`` when ``rows`` is given.

  Each leaf of ``rows`` is ``[K, C]``; the chunk's rows (box ``k - left``)
  come back widened to :func:`dtypes.row_dtype`, zeros for padding boxes
  (``left == 0``).
  """

  def gather_leaf(r, row):
    got = dtypes.gather_rows(r, jnp.minimum(row, k - 1))
    return jnp.where((row < k)[:, None], got, 0)

  if rows is None:
    return lambda data, left: data
  return lambda data, left: (data, jax.tree.map(lambda r: gather_leaf(r, k - left), rows))


def map_chunks(fn: Callable, per_box: Any, cost: jax.Array, chunk: int, rows: Any = None) -> Any:
  """Applies ``fn`` to chunks of boxes in order of ``cost``; returns per-box outputs.

  Each chunk's outputs are written straight to their boxes' rows of the
  result (a scatter of whole rows to distinct positions), so the result is
  never permuted afterwards.

  Args:
    fn: maps a pytree of ``[chunk, ...]`` arrays to a pytree of ``[chunk, ...]``.
    per_box: pytree of arrays with leading dim K.
    cost: ``[K]`` sort key (boxes of similar cost share a chunk).
    chunk: static boxes per chunk.
    rows: optional pytree of ``[K, C]`` arrays (e.g. an output cotangent)
      whose rows are gathered chunk by chunk, inside the loop, and widened to
      :func:`dtypes.row_dtype` there (zeros for the padding boxes of the last
      chunk); ``fn`` then takes ``(per_box chunk, rows chunk)``. Sorting them
      up front with ``per_box`` would cost a permuted copy, a padded copy and,
      for 16-bit rows, an element-wise conversion: passes over ``K * C``
      elements each.

  Returns:
    ``fn``'s outputs with leading dim K, in the original box order.
  """
  k = cost.shape[0]
  chunks, num_chunks = _sorted_chunks(per_box, cost, chunk)
  arguments = _with_rows(rows, k)
  one_chunk = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), chunks)
  shapes = jax.eval_shape(lambda c: fn(arguments(*c)), one_chunk)
  out = jax.tree.map(lambda s: jnp.zeros((k,) + s.shape[1:], s.dtype), shapes)

  def body(i, out):
    data, left = jax.tree.map(lambda x: x[i], chunks)
    put = lambda o, y: o.at[k - left].set(y, mode="drop", unique_indices=True)  # noqa: E731
    return jax.tree.map(put, out, fn(arguments(data, left)))

  return lax.fori_loop(0, num_chunks, body, out)


def refine_chunks(
  fn: Callable, out: Any, per_box: Any, cost: jax.Array, chunk: int, done: int
) -> Any:
  """Updates the rows of boxes costing more than ``done``, chunk by chunk, in place.

  ``out`` holds a first result for every box (leaves ``[K, ...]``, box
  order). Boxes are visited in order of ``cost`` as in :func:`map_chunks`,
  but the loop starts at the first chunk that holds a box costing more than
  ``done``: the cheaper boxes are never visited. ``fn`` maps ``(per_box
  chunk, rows of out)`` to the chunk's new rows, which are written back
  (padding boxes are dropped).

  Returns:
    ``out`` with the rows of the costly boxes (and of their chunks) replaced.
  """
  k = cost.shape[0]
  if k == 0:
    return out
  chunks, num_chunks = _sorted_chunks(per_box, cost, chunk)
  first = jnp.sum(cost <= done, dtype=jnp.int32) // chunk

  def body(i, out):
    data, left = jax.tree.map(lambda x: x[i], chunks)
    box = k - left
    rows = jax.tree.map(lambda o: o.at[jnp.minimum(box, k - 1)].get(mode="promise_in_bounds"), out)
    put = lambda o, y: o.at[box].set(y, mode="drop", unique_indices=True)  # noqa: E731
    return jax.tree.map(put, out, fn(data, rows))

  return lax.fori_loop(first, num_chunks, body, out)


# Largest [U, C] accumulation-dtype sums refine_sums keeps for 16-bit outputs (bytes).
WIDE_SUM_BYTES = 1 << 24


def recomputes_sums(size: int, wide, dtype) -> bool:
  """Whether :func:`refine_sums` recomputes its costlier units from pass 0 (static).

  True for 16-bit outputs (``dtype``) whose ``size`` sums in the
  accumulation dtype ``wide`` take more than ``WIDE_SUM_BYTES``: their first
  pass is rounded where it is written. A first-pass kernel may then skip
  those units, whose first-pass values are overwritten.
  """
  wide = jnp.dtype(wide)
  return jnp.dtype(dtype) != wide and size * wide.itemsize > WIDE_SUM_BYTES


def refine_sums(
  first: jax.Array,
  add_pass: Callable,
  passes: Callable,
  units: Any,
  cost: jax.Array,
  chunk: int,
  dtype,
) -> jax.Array:
  """Sums over passes whose pass 0 is already done for every unit; ``[U, C]`` in ``dtype``.

  ``first`` ``[U, C]`` holds every unit's pass-0 sum in the accumulation
  dtype. Units costing more than one pass are revisited with
  :func:`refine_chunks`: ``add_pass(chunk units)`` is a ``fori_loop`` body
  ``(t, acc) -> acc`` and ``passes(chunk units)`` its trip count. Where
  ``dtype`` is the accumulation dtype, the sums continue from pass 1.

  16-bit outputs are rounded once, from the whole sum, in one of two ways:

  * while ``first`` takes at most ``WIDE_SUM_BYTES``, the sums stay in the
    accumulation dtype, continue from pass 1 and are rounded at the end;
  * larger outputs are rounded where the first pass writes them, and the
    costlier units are recomputed from pass 0 (chunks carry bfloat16 as
    bits, :func:`dtypes.narrow_bits`). Each chunk makes its pass 0 outside
    its loop, so that no zero-filled buffer starts the sums: the bfloat16
    forward of adaptive ``roi_align`` took about 0.95x the time on 512 large
    boxes and 0.85-0.95x on 1000 RPN proposals (2-core AMD EPYC, alternated
    processes), and its first call 0.3-0.5 s longer (the pass compiles
    twice).

  Both round one sum of the same terms in the same order, but its first
  pass comes from the first-pass kernel in the first way and from the
  refine kernel in the second, and two kernels may contract multiplies and
  adds differently: a few outputs in a million differ by one bfloat16 ulp
  between the two ways (float32 outputs always continue from the first-pass
  kernel). Measured on a 2-core Intel Xeon (bfloat16
  forward, new/old time): keeping the sums took 0.86-0.89x on R-FCN's
  ``ps_roi_align`` (1.2 MB of sums) and 0.83-0.89x on adaptive ``roi_align``
  of map-sized boxes (12.8 MB), where every bin needs several passes, but
  1.09-1.13x on outputs of 25-100 MB (proposal-sized boxes, the
  rotated-boxes config), whose rounding pass over a fresh buffer costs more
  than the few recomputed units; boxes 10x the map (12.8 MB) took 0.99-1.08x.
  """
  wide = first.dtype
  if dtype != wide and not recomputes_sums(first.size, wide, dtype):
    return dtypes.narrow(refine_sums(first, add_pass, passes, units, cost, chunk, wide), dtype)
  out = dtypes.narrow_bits(first, dtype)
  exact = out.dtype == wide  # the written sums were not rounded: continue from them

  def refine(u, rows):
    if exact:
      return lax.fori_loop(1, passes(u), add_pass(u), rows)
    # Pass 0 outside the loop (no zero fill per chunk). Every chunk visited makes at least
    # one pass: it holds a unit costing more than one.
    acc = add_pass(u)(0, jnp.zeros((), wide))
    acc = lax.fori_loop(1, passes(u), add_pass(u), jnp.broadcast_to(acc, rows.shape))
    return dtypes.narrow_bits(acc, dtype)

  return dtypes.from_bits(refine_chunks(refine, out, units, cost, chunk, done=1), dtype)


def fold_chunks(
  fn: Callable,
  init: Any,
  per_box: Any,
  cost: jax.Array,
  chunk: int,
  rows: Any = None,
  done: int | None = None,
  cheap_chunk: int | None = None,
  cheap_fn: Callable | None = None,
) -> Any:
  """Folds ``carry = fn(carry, chunk)`` over chunks of boxes in order of ``cost``.

  ``rows`` is as in :func:`map_chunks`: with it, ``fn`` takes ``(carry,
  (per_box chunk, rows chunk))``. With ``done``, the boxes costing at most
  ``done`` (sorted first) are either skipped, as in :func:`refine_chunks`
  (the loop starts at the first chunk that holds a costlier box), or, with
  ``cheap_chunk``, folded in chunks of ``cheap_chunk`` boxes of their own,
  and the costlier ones in chunks of ``chunk`` from the first of them on: a
  chunk loops as long as its costliest box, so cheap boxes can go in larger
  chunks (less work per box outside the loop) without making any chunk of
  costly boxes longer. ``cheap_fn`` (default ``fn``) folds those cheap
  chunks: it may rely on every box of its chunk costing at most ``done``.
  Boxes outside a chunk's share look like the padding of the last chunk
  (zero leaves, zero rows).

  The boxes are folded in sorted order however they are chunked, so any
  accumulation into ``carry`` happens in an order that is a function of the
  inputs only: the result is bitwise reproducible.
  """
  k = cost.shape[0]
  if k == 0:
    return init
  if cheap_chunk is not None:
    if done is None:
      raise ValueError("fold_chunks: `cheap_chunk` needs `done`, the cost of a cheap box.")
    fns = (cheap_fn or fn, fn)
    return _fold_two_sizes(fns, init, per_box, cost, (cheap_chunk, chunk), rows, done)
  if cheap_fn is not None:
    raise ValueError("fold_chunks: `cheap_fn` needs `cheap_chunk`, the chunks it folds.")
  chunks, num_chunks = _sorted_chunks(per_box, cost, chunk)
  arguments = _with_rows(rows, k)
  first = 0 if done is None else jnp.sum(cost <= done, dtype=jnp.int32) // chunk

  def body(i, carry):
    return fn(carry, arguments(*jax.tree.map(lambda x: x[i], chunks)))

  return lax.fori_loop(first, num_chunks, body, init)


def _fold_two_sizes(fns, init, per_box, cost, sizes, rows, done):
  """:func:`fold_chunks` with the boxes costing at most ``done`` folded by ``fns[0]`` in
  chunks of ``sizes[0]``, and the rest by ``fns[1]`` in chunks of ``sizes[1]``."""
  k = cost.shape[0]
  order = sort_order(cost)
  pad = max(sizes)
  # Sorted boxes, then `pad` padding boxes: every window of at most `pad` boxes that
  # starts at or before K lies inside, so dynamic_slice never shifts it.
  data = jax.tree.map(lambda x: jnp.pad(x[order], [(0, pad)] + [(0, 0)] * (x.ndim - 1)), per_box)
  left = jnp.pad((k - order).astype(jnp.int32), (0, pad))
  arguments = _with_rows(rows, k)
  cheap = jnp.sum(cost <= done, dtype=jnp.int32)

  def window(start, size, end):
    """Sorted boxes ``[start, start + size)``; those at or past ``end`` as padding."""
    keep = start + jnp.arange(size, dtype=jnp.int32) < end

    def take(x):
      x = lax.dynamic_slice_in_dim(x, start, size)
      return jnp.where(keep.reshape((size,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

    return arguments(jax.tree.map(take, data), take(left))

  def fold(fn, carry, first, end, size):
    def body(i, carry):
      return fn(carry, window(first + i * size, size, end))

    return lax.fori_loop(0, (end - first + size - 1) // size, body, carry)

  carry = fold(fns[0], init, 0, cheap, sizes[0])
  return fold(fns[1], carry, cheap, k, sizes[1])


def own_block(t, passes_y: jax.Array, passes_x: jax.Array):
  """The block of work ``(by, bx)`` that pass ``t`` visits in each of ``[B]`` bins.

  Each bin enumerates its own ``passes_y x passes_x`` blocks (of taps or of
  sample points) row-major: pass ``t`` visits block ``(t // passes_x, t %
  passes_x)`` of every bin that has more than ``t`` blocks. A chunk of bins
  thus loops as long as its costliest bin (:func:`own_block_passes`), even
  when it mixes tall (``16 x 1`` blocks) and wide (``1 x 16``) bins, which a
  shared ``max(passes_y) x max(passes_x)`` grid would visit 256 times.

  Returns:
    ``(by, bx, in_use)``, each ``[B]``; bins past their blocks get block
    ``(0, 0)`` and ``in_use`` False.
  """
  in_use = t < passes_y * passes_x
  step = jnp.maximum(passes_x, 1)
  return jnp.where(in_use, t // step, 0), jnp.where(in_use, t % step, 0), in_use


def own_block_passes(passes_y: jax.Array, passes_x: jax.Array) -> jax.Array:
  """Passes a chunk of bins makes with :func:`own_block`: its costliest bin's blocks."""
  return jnp.max(passes_y * passes_x, initial=0)


def walk_grid(
  height: jax.Array, width: jax.Array, slots: int, visit: Callable, state: Any, start: int = 0
) -> Any:
  """Visits every point ``(a, b)`` of each of ``[B]`` bins' ``height x width`` grids.

  Each bin's points (the cells of its rectangle, for ``cell_mean``) are one
  row-major list, visited ``slots`` per pass: a bin costs
  ``ceil(height * width / slots)`` passes, its own points rounded up once,
  and the chunk loops as long as its costliest bin. ``(a, b)`` is carried
  from slot to slot (a step along the row, or a wrap to the next one), so no
  pass divides. For each slot, ``state = visit(state, a, b, used)`` with
  ``[B]`` int32 ``a``, ``b`` and bool ``used``; where ``used`` is False,
  ``a`` and ``b`` may lie past the bin's grid and must not be read.

  With ``start > 0`` (static) the walk begins at pass ``start``: the points
  before it were visited by :func:`grid_pass` already.

  Returns:
    The final ``state``.
  """
  count = height * width
  point = start * slots
  safe_width = jnp.maximum(width, 1)
  zero = jnp.zeros_like(count)
  first = (point // safe_width, point % safe_width) if start else (zero, zero)

  def one_pass(t, carry):
    return grid_pass(t, count, width, slots, visit, *carry)

  passes = jnp.max(grid_passes(count, slots), initial=0)
  return lax.fori_loop(start, jnp.maximum(passes, start), one_pass, (state, *first))[0]


def grid_pass(t, count, width, slots: int, visit: Callable, state: Any, a, b):
  """Pass ``t`` of :func:`walk_grid` (its slots unrolled) from point ``(a, b)`` of each bin;
  returns ``(state, a, b)`` for the next pass."""
  for s in range(slots):
    state = visit(state, a, b, t * slots + s < count)
    b = b + 1
    next_row = b >= width
    a = jnp.where(next_row, a + 1, a)
    b = jnp.where(next_row, 0, b)
  return state, a, b


def grid_passes(count: jax.Array, slots: int) -> jax.Array:
  """Passes :func:`walk_grid` makes for a bin of ``count`` points."""
  return -(-count // slots)


def map_in_order(fn: Callable, per_box: Any, chunk: int) -> Any:
  """Applies ``fn`` to consecutive chunks of boxes (no sorting, no gathers).

  The boxes are padded with zeros to a whole number of chunks, reshaped and
  visited with ``lax.map``, which slices with ``dynamic-slice`` only. This is
  the chunking of the gather-free backend (:mod:`roipool_jax._src.dense`).
  """
  k = jax.tree.leaves(per_box)[0].shape[0]
  return _merge(lax.map(fn, split(per_box, chunk)), k)
