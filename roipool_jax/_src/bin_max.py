"""Exact max (and first arg-max) over integer rectangles of a feature map.

This is the engine of every max-pooling RoI op: given, per box, the row ranges
``[hs, he)`` of its ``oh`` bin rows and the column ranges ``[ws, we)`` of its
``ow`` bin columns, it returns the channel-wise maximum over each
``[hs, he) x [ws, we)`` rectangle, and the flat position ``h * W + w`` of the
first maximal element in row-major order (the element the gradient goes to).

How the work is bounded
-----------------------
A sparse table along W holds, for levels ``l = 0..L``, the max over the
``2**l`` cells ``[w, w + 2**l)`` of every row (level 0 is the map itself). A
bin of width ``b`` reads level ``l = min(floor(log2 b), L)`` at
``ceil(b / 2**l)`` window starts (the last one aligned to the bin's right
edge, so windows may overlap: harmless for a max). A ``lax.while_loop`` then
visits, for every bin at once, its ``rows x windows`` lookups, each a gather of
one contiguous ``C`` vector (fast in NHWC). The loop runs for the largest
``rows x windows`` over all bins, so the cost is
``O(L * |features| + K * oh * ow * C * max_bin_lookups)`` and never
materializes a per-box copy of the map. ``L`` is picked from the static shapes
so that a bin of a box lying inside the map needs at most two windows per row.

The backward pass sends each output cotangent to its arg-max cell; it is a
scatter-add over ``[N * H * W * C]`` accumulated in float32 (sequential, hence
deterministic, on CPU).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


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


def table_levels(width: int, out_width: int) -> int:
  """Top sparse-table level L: windows of up to ``2**L`` cells, L <= floor(log2 W).

  Chosen so that a bin of a box inside the map (at most ``ceil(W / ow) + 1``
  cells wide) needs at most two windows per row, without building levels that
  only huge boxes would use (those take more windows instead).
  """
  typical = -(-width // out_width) + 1
  return max(0, min(int(math.log2(width)), int(math.log2(typical))))


def _floor_log2(x: jax.Array) -> jax.Array:
  """floor(log2(x)) for int32 x >= 1, exactly (no float rounding)."""
  return 31 - lax.clz(x.astype(jnp.int32))


def _sparse_table(values: jax.Array, levels: int) -> jax.Array:
  """Stacks ``values`` and its windowed maxima: ``[L + 1, N, H, W, C]``.

  Level ``l`` at column ``w`` is the max (for indices: the first arg-max) of
  columns ``[w, w + 2**l)``. Columns past ``W - 2**l`` hold padding that is
  never read.
  """
  out = [values]
  for level in range(1, levels + 1):
    shift = 1 << (level - 1)
    prev = out[-1]
    right = jnp.concatenate([prev[:, :, shift:], prev[:, :, -shift:]], axis=2)
    out.append(jnp.maximum(prev, right))
  return jnp.stack(out)


def _sparse_table_with_argmax(values: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
  """Like :func:`_sparse_table`, plus the first arg-max (flat ``h * W + w``) of each window."""
  _, height, width, _ = values.shape
  flat = (jnp.arange(height)[:, None] * width + jnp.arange(width)[None, :]).astype(jnp.int32)
  index = jnp.broadcast_to(flat[None, :, :, None], values.shape)
  vals, idxs = [values], [index]
  for level in range(1, levels + 1):
    shift = 1 << (level - 1)
    v, i = vals[-1], idxs[-1]
    v_right = jnp.concatenate([v[:, :, shift:], v[:, :, -shift:]], axis=2)
    i_right = jnp.concatenate([i[:, :, shift:], i[:, :, -shift:]], axis=2)
    take_right = v_right > v  # ties keep the left (earlier) element
    vals.append(jnp.where(take_right, v_right, v))
    idxs.append(jnp.where(take_right, i_right, i))
  return jnp.stack(vals), jnp.stack(idxs)


# Boxes are processed in sequential chunks of about this many output elements,
# so each chunk's running maxima stay in cache while its lookups stream through,
# and each chunk loops only as long as its own largest bin needs.
_CHUNK_ELEMENTS = 1 << 15


def bin_max(features: jax.Array, bins: Bins, with_argmax: bool):
  """Max over every bin rectangle; see the module docstring.

  Args:
    features: ``[N, H, W, C]`` map.
    bins: :class:`Bins` for K boxes with ``oh`` x ``ow`` bins.
    with_argmax: also return the arg-max positions (for the backward pass).

  Returns:
    ``values [K, oh, ow, C]`` in the features' dtype, 0 for empty bins; and when
    ``with_argmax``, ``argmax [K, oh, ow, C]`` int32 flat ``h * W + w`` of the
    first maximal cell in row-major order, -1 for empty bins.
  """
  n_img, height, width, channels = features.shape
  k, oh = bins.row_start.shape
  ow = bins.col_start.shape[1]
  levels = table_levels(width, ow)
  if with_argmax:
    table, index_table = _sparse_table_with_argmax(features, levels)
    index_table = index_table.reshape(-1, channels)
  else:
    table, index_table = _sparse_table(features, levels), None
  table = table.reshape(-1, channels)

  # Per-bin lookup plan, [K, oh, ow]: `rows` x `windows` lookups of 2**level cells.
  rows = jnp.maximum(bins.row_end - bins.row_start, 0)[:, :, None]
  cols = jnp.maximum(bins.col_end - bins.col_start, 0)[:, None, :]
  level = jnp.minimum(_floor_log2(jnp.maximum(cols, 1)), levels)
  span = jnp.left_shift(1, level)
  windows = (cols + span - 1) // span
  shape = (k, oh, ow)
  plan = dict(
      steps=jnp.broadcast_to(rows * windows, shape),
      windows=jnp.broadcast_to(jnp.maximum(windows, 1), shape),
      row0=jnp.broadcast_to(bins.row_start[:, :, None], shape),
      col0=jnp.broadcast_to(bins.col_start[:, None, :], shape),
      col_last=jnp.broadcast_to(bins.col_end[:, None, :] - span, shape),
      span=jnp.broadcast_to(span, shape),
      plane=jnp.broadcast_to((level * n_img + bins.image_index[:, None, None]) * height, shape),
  )

  def pool_chunk(p):
    def body(carry):
      t, best, best_index = carry
      active = (t < p["steps"])[..., None]
      row = jnp.clip(p["row0"] + t // p["windows"], 0, height - 1)
      col = p["col0"] + (t % p["windows"]) * p["span"]
      col = jnp.clip(jnp.minimum(col, p["col_last"]), 0, width - 1)
      flat = (p["plane"] + row) * width + col
      value = table.at[flat].get(mode="promise_in_bounds")
      if index_table is None:
        return t + 1, jnp.where(active, jnp.maximum(best, value), best), best_index
      index = index_table.at[flat].get(mode="promise_in_bounds")
      take = active & ((value > best) | (best_index < 0))
      return t + 1, jnp.where(take, value, best), jnp.where(take, index, best_index)

    acc_shape = p["steps"].shape + (channels,)
    init = (
        jnp.int32(0),
        jnp.full(acc_shape, -jnp.inf, features.dtype),
        jnp.full(acc_shape if with_argmax else (0,), -1, jnp.int32),
    )
    num_steps = jnp.max(p["steps"], initial=0)
    _, best, best_index = lax.while_loop(lambda c: c[0] < num_steps, body, init)
    best = jnp.where((p["steps"] > 0)[..., None], best, jnp.zeros((), features.dtype))
    return best, best_index

  chunk = max(1, min(k, _CHUNK_ELEMENTS // max(1, oh * ow * channels)))
  num_chunks = -(-k // chunk)
  pad = num_chunks * chunk - k

  def to_chunks(x):  # padded boxes get steps == 0: empty
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((num_chunks, chunk) + x.shape[1:])

  values, argmax = lax.map(pool_chunk, jax.tree.map(to_chunks, plan))
  values = values.reshape((num_chunks * chunk, oh, ow, channels))[:k]
  if with_argmax:
    return values, argmax.reshape((num_chunks * chunk, oh, ow, channels))[:k]
  return values


def scatter_to_argmax(
    cotangent: jax.Array, argmax: jax.Array, image_index: jax.Array, features_shape
) -> jax.Array:
  """Transpose of :func:`bin_max`: adds each cotangent at its arg-max cell.

  Args:
    cotangent: ``[K, oh, ow, C]`` output cotangent.
    argmax: ``[K, oh, ow, C]`` from :func:`bin_max` (-1 for empty bins: dropped).
    image_index: ``[K]`` image of each box.
    features_shape: ``(N, H, W, C)``.

  Returns:
    ``[N, H, W, C]`` float32 gradient.
  """
  n_img, height, width, channels = features_shape
  channel = jnp.arange(channels, dtype=jnp.int32)[None, None, None]
  cell = image_index[:, None, None, None] * (height * width) + argmax
  flat = jnp.where(argmax >= 0, cell * channels + channel, n_img * height * width * channels)
  grad = jnp.zeros((n_img * height * width * channels,), jnp.float32)
  grad = grad.at[flat.reshape(-1)].add(cotangent.astype(jnp.float32).reshape(-1), mode="drop")
  return grad.reshape(features_shape)
