"""Tap sums over the levels of a feature pyramid, each box reading its own level.

:func:`pyramid_tap_sum` is :func:`tap_sum.tap_sum` for boxes spread over
``L`` maps (``multi_scale_roi_align``). It has two forms that compute the
same sums in the same order, so the same bits:

* **stacked**: the levels concatenated into one ``[sum_l M_l, C]`` table and
  one :func:`tap_sum.tap_sum` over every box, each box's origin offset by its
  level's first row. One pass over the boxes, but a copy of the whole pyramid
  per call (82.7 MB for FPN P2-P5 of an 800 x 1216 image at 256 channels,
  23 of the 57 ms of a 1000-box forward on a 2-core AMD EPYC, page faults
  included).
* **by level**: the boxes grouped by level, in chunks of ``B`` boxes that
  never mix levels (each level's boxes, in their original order, fill whole
  chunks; the last chunk of a level is padded with empty boxes). A loop over
  the chunks runs :func:`tap_sum.tap_sum` on each chunk against its own level,
  read in place (``lax.switch`` on the chunk's level), and one gather puts
  the rows back in box order. At most ``L - 1`` chunks more than ``ceil(K /
  B)``, and no copy of the pyramid.

Their extra costs: the stacked form reads and writes the pyramid (``sum_l
M_l`` rows of ``C``), the by-level form the output (``K * oh * ow`` rows,
written chunk by chunk and then gathered into box order). Which form runs:

* the forward, plain or under ``grad``: by level on CPU for float32,
  float64 and float16 maps whose output has at most as many rows as the
  pyramid, when every bin's taps fit one block of :mod:`tap_sum` (a fixed
  ``sampling_ratio`` of at most 2).
  Measured on the plain forward, FPN
  P2-P5 (1 x 200 x 304 x 256 at P2, 80,750 rows), 7 x 7 bins, float32,
  against the stacked form (2-core AMD EPYC, fastest of 10-12 alternated
  calls of both programs compiled in one process): 50 boxes 0.12x the time
  (3.4 against 27.5 ms), 1000 boxes 0.71-0.91x (40-46 against 50-61 ms),
  1500 boxes 0.87x; float16, 1000 boxes, 0.55-0.60x. Past the rule the
  gather costs more than the copy it saves: 2000 boxes 0.99x, 4000 boxes
  1.17x, 1000 boxes of 14 x 14 bins 1.25x. Adaptive sampling
  (``sampling_ratio <= 0``) stays stacked: 0.93x the time but twice the
  compile time (3.4 against 2.0 s), each level's branch compiling the
  adaptive kernel's refinement loop. bfloat16 maps stay stacked: XLA:CPU
  gathers them as their 16-bit patterns (:func:`dtypes.gather_rows`), and
  inside the loop it re-made that view of the level on every chunk (1.6x
  the stacked time). GPUs and TPUs stay stacked: there the concatenation is
  cheap next to running the chunks one after another (not measured).
  Compiling four branches takes longer: the first call of the 1000-box
  float32 forward took 1.6 s instead of 0.8 s.
* the backward (``custom_vjp``) is always the stacked form's: it scatters
  into one ``[sum_l M_l, C]`` gradient, sliced into the levels' gradients.
  After a by-level forward its residuals are the levels themselves, and its
  copy of the pyramid is read only for the weights' gradient (the boxes'),
  so XLA drops it when only the maps need a gradient. FPN P2-P5, 1000 boxes,
  float32 forward+backward of the maps: 0.84x the time (136-138 against
  161-164 ms), temporaries 88 MB instead of 166 MB; with the boxes'
  gradient too, 0.94x. The same bits either way.
* under ``vmap`` with batched boxes: stacked (``custom_vmap``). A batched
  chunk level would turn the ``lax.switch`` into every branch and a select.

``B`` keeps a chunk's output at about ``2**19`` elements (41 boxes of 7 x 7
bins x 256 channels); 16 to 128 boxes measured alike, 256 slower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax

from roipool_jax._src import chunking, tap_sum

# Output elements ([B, oh, ow, C]) per chunk of the by-level form.
_CHUNK_ELEMENTS = 1 << 19


def _stacked(tables, wy, wx, plan: tap_sum.Plan, level):
  """The stacked form: one tap sum over the levels concatenated into one table."""
  starts = np.cumsum([0] + [t.shape[0] for t in tables[:-1]])
  origin = plan.origin + jnp.asarray(starts, jnp.int32)[level]
  return tap_sum.tap_sum(jnp.concatenate(tables), wy, wx, plan._replace(origin=origin))


def _reads_levels_in_place(tables, wy, wx) -> bool:
  """Whether the forward takes the by-level form (see the module docstring): on CPU, for maps
  other than bfloat16 and taps that fit one block, when the output has no more rows (``K * oh
  * ow``) than the pyramid."""
  output_rows = wy.shape[0] * wy.shape[1] * wx.shape[1]
  return (
    tap_sum.single_pass(wy.shape[2], wx.shape[2])
    and len(tables) > 1
    and tables[0].dtype != jnp.bfloat16
    and jax.default_backend() == "cpu"
    and output_rows <= sum(t.shape[0] for t in tables)
  )


def _by_level(tables, wy, wx, plan: tap_sum.Plan, level):
  """The by-level form: chunks of boxes of one level, each read against that level's table."""
  k, oh, _ = wy.shape
  ow, channels, levels = wx.shape[1], tables[0].shape[1], len(tables)
  chunk = chunking.chunk_size(k, oh * ow * channels, _CHUNK_ELEMENTS)
  num_chunks = -(-k // chunk) + levels - 1  # each level's last chunk may be partly empty
  # Each box's slot in the chunked layout: its level's first chunk, then its rank in its level.
  one_hot = (level[:, None] == jnp.arange(levels, dtype=jnp.int32)[None, :]).astype(jnp.int32)
  rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)
  counts = jnp.sum(one_hot, axis=0)
  chunks = -(-counts // chunk)
  first_chunk = jnp.cumsum(chunks) - chunks
  slot = first_chunk[level] * chunk + rank
  # The box in each slot (k: none), and each chunk's level (chunks past the last hold none).
  box = jnp.full(num_chunks * chunk, k, jnp.int32).at[slot].set(jnp.arange(k, dtype=jnp.int32))
  used = box < k
  box = jnp.where(used, box, 0)
  chunk_index = jnp.arange(num_chunks, dtype=jnp.int32)
  chunk_level = jnp.searchsorted(first_chunk, chunk_index, side="right").astype(jnp.int32) - 1

  def per_slot(x, empty):
    taken = x[box]
    if empty is not None:
      taken = jnp.where(used.reshape((-1,) + (1,) * (x.ndim - 1)), taken, empty)
    return taken.reshape((num_chunks, chunk) + x.shape[1:])

  slots = (
    per_slot(wy, None),
    per_slot(wx, None),
    tap_sum.Plan(
      origin=per_slot(plan.origin, 0),
      stride=per_slot(plan.stride, 1),
      row=per_slot(plan.row, -1),  # empty slots: no taps, no cost
      col=per_slot(plan.col, -1),
      row_count=per_slot(plan.row_count, 0),
      col_count=per_slot(plan.col_count, 0),
    ),
  )

  def on_level(table):
    return lambda wy, wx, plan: tap_sum.tap_sum(table, wy, wx, plan)

  branches = [on_level(table) for table in tables]

  def step(_, xs):
    lvl, (wy, wx, plan) = xs
    return None, lax.switch(lvl, branches, wy, wx, plan)

  _, out = lax.scan(step, None, (chunk_level, slots))
  return out.reshape((num_chunks * chunk,) + out.shape[2:])[slot]


@custom_batching.custom_vmap
def _by_level_unbatched(tables, wy, wx, plan, level):
  return _by_level(tables, wy, wx, plan, level)


@_by_level_unbatched.def_vmap
def _by_level_vmap(axis_size, in_batched, tables, wy, wx, plan, level):
  del axis_size
  in_axes = jax.tree.map(lambda batched: 0 if batched else None, in_batched)
  return jax.vmap(_stacked, in_axes=tuple(in_axes))(tables, wy, wx, plan, level), True


@jax.custom_vjp
def pyramid_tap_sum(tables, wy, wx, plan: tap_sum.Plan, level) -> jax.Array:
  """``[K, oh, ow, C]`` tap sums of boxes on the levels of a pyramid (the module docstring).

  Args:
    tables: ``L`` level tables ``[M_l, C]`` (maps ``[N, H_l, W_l, C]``
      reshaped), one dtype.
    wy: ``[K, oh, Ty]`` row-tap weights (:func:`tap_sum.tap_sum`).
    wx: ``[K, ow, Tx]`` column-tap weights.
    plan: :class:`tap_sum.Plan` whose ``origin`` and ``stride`` address each
      box's own level table.
    level: ``[K]`` int32 level of each box, in ``[0, L)``.

  Returns:
    ``[K, oh, ow, C]`` in the tables' dtype, the bits of :func:`tap_sum.tap_sum`
    on the concatenated levels.
  """
  if _reads_levels_in_place(tables, wy, wx):
    return _by_level_unbatched(tables, wy, wx, plan, level)
  return _stacked(tables, wy, wx, plan, level)


def _stacked_vjp(tables, wy, wx, plan, level):
  """``(out, pullback)`` of the stacked form, differentiated in the tables and the weights."""
  return jax.vjp(lambda t, wy, wx: _stacked(t, wy, wx, plan, level), tables, wy, wx)


def _pyramid_fwd(tables, wy, wx, plan, level):
  if _reads_levels_in_place(tables, wy, wx):
    return _by_level_unbatched(tables, wy, wx, plan, level), (None, (tables, wy, wx, plan, level))
  out, pullback = _stacked_vjp(tables, wy, wx, plan, level)
  return out, (pullback, None)


def _pyramid_bwd(residuals, cotangent):
  pullback, inputs = residuals
  if pullback is None:
    # The stacked form's backward, after a by-level forward. Its recomputed forward is dead
    # code (XLA drops it), and so is its copy of the pyramid unless the weights (the boxes)
    # need a gradient.
    _, pullback = _stacked_vjp(*inputs)
  return (*pullback(cotangent), None, None)


pyramid_tap_sum.defvjp(_pyramid_fwd, _pyramid_bwd)
