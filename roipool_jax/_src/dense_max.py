"""The gather-free ``roi_pool`` (``impl="einsum"``): masked separable maxima.

A bin of ``roi_pool`` is a rectangle ``[hs, he) x [ws, we)`` of whole cells
(:class:`bin_max.Bins`), so its maximum is separable: first the maximum over
the bin's columns in every row, then over the bin's rows. With boolean masks
``Cx[k, j, w] = ws_j <= w < we_j`` and ``Ry[k, i, h] = hs_i <= h < he_i``::

    M[k, n, h, j, c] = max_w  where(Cx[k, j, w], F[n, h, w, c], -inf)
    out[k, i, j, c]  = max_{n, h}  where((n == n_k) & Ry[k, i, h], M[k, n, h, j, c], -inf)

(0 for empty bins). Both steps are masked reductions over broadcast operands,
the form TPUs (and any vector unit) run well; nothing is gathered.

Gradient, with the gather path's rule (the first maximal cell in row-major
order takes the whole cotangent): the first maximal cell is in the first row
``h*`` whose column maximum equals the bin's maximum, at the first column
``w*`` of that row holding it. Both are found by masked minimum reductions
over ``iota``, and the cotangent is spread back with the same masks::

    G[k, h, j, c]    = sum_i [h == h*(k, i, j, c)] cot[k, i, j, c]
    dF[n, h, w, c]  += sum_k [n == n_k] sum_j [w == w*(k, h, j, c)] G[k, h, j, c]

The last sum over boxes is a matmul with the one-hot image matrix: sums of
products with exact 0 and 1, in a fixed order, so the gradient is bitwise
deterministic on every backend. The lowered HLO has no gather and no scatter,
forward or backward (tested). Boxes go in consecutive chunks
(:func:`chunking.map_in_order`) that keep the ``[B, N, H, ow, C]`` maxima
near ``_CHUNK_ELEMENTS``; the work is ``K * N * H * W * ow * C`` compares,
dense in the map, against the gather path's work proportional to the cells
of the bins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking, dtypes
from roipool_jax._src.bin_max import Bins

# Elements of the per-chunk column maxima [B, N, H, ow, C].
_CHUNK_ELEMENTS = 1 << 22


def _masks(bins: Bins, num_images: int, height: int, width: int):
  """``image [B, N]``, ``rows [B, oh, H]`` and ``cols [B, ow, W]`` boolean masks."""
  h = jnp.arange(height, dtype=jnp.int32)[None, None]
  w = jnp.arange(width, dtype=jnp.int32)[None, None]
  rows = (bins.row_start[..., None] <= h) & (h < bins.row_end[..., None])
  cols = (bins.col_start[..., None] <= w) & (w < bins.col_end[..., None])
  image = bins.image_index[:, None] == jnp.arange(num_images, dtype=jnp.int32)[None]
  return image, rows, cols


def _column_max(features, cols):
  """``M [B, N, H, ow, C]``: the maximum over each bin column, per row."""
  neg = jnp.array(-jnp.inf, features.dtype)
  masked = jnp.where(cols[:, None, None, :, :, None], features[None, :, :, None], neg)
  return jnp.max(masked, axis=4)  # over w


def _chunk(bins: Bins, features_shape) -> int:
  n, h, _, c = features_shape
  ow = bins.col_start.shape[1]
  return chunking.chunk_size(bins.row_start.shape[0], n * h * ow * c, _CHUNK_ELEMENTS)


def _pool_chunk(features, bins: Bins):
  n, height, width, _ = features.shape
  image, rows, cols = _masks(bins, n, height, width)
  m = _column_max(features, cols)  # [B, N, H, ow, C]
  where = image[:, None, :, None] & rows[:, :, None, :]  # [B, oh, N, H]
  neg = jnp.array(-jnp.inf, features.dtype)
  best = jnp.max(jnp.where(where[..., None, None], m[:, None], neg), axis=(2, 3))
  nonempty = jnp.any(rows, axis=2)[:, :, None] & jnp.any(cols, axis=2)[:, None, :]
  return jnp.where(nonempty[..., None], best, jnp.zeros((), features.dtype))


def _grad_chunk(features, bins: Bins, values, cotangent):
  n, height, width, channels = features.shape
  acc = cotangent.dtype
  image, rows, cols = _masks(bins, n, height, width)
  neg = jnp.array(-jnp.inf, features.dtype)
  # The box's own image, selected by a masked max (exact for any value).
  own = jnp.max(
    jnp.where(image[:, :, None, None, None], features[None], neg), axis=1
  )  # [B, H, W, C]
  m = jnp.max(jnp.where(cols[:, None, :, :, None], own[:, :, None], neg), axis=3)  # [B, H, ow, C]
  # First row of each bin whose column maximum is the bin's maximum.
  h = jnp.arange(height, dtype=jnp.int32)[None, None, :, None, None]
  hit = rows[:, :, :, None, None] & (m[:, None] == values[:, :, None])  # [B, oh, H, ow, C]
  first_row = jnp.min(jnp.where(hit, h, height), axis=2, keepdims=True)
  g = jnp.sum(jnp.where(h == first_row, cotangent[:, :, None], jnp.zeros((), acc)), axis=1)
  # First column of that row, within the bin's columns, holding the maximum.
  w = jnp.arange(width, dtype=jnp.int32)[None, None, None, :, None]
  on = cols[:, None, :, :, None] & (own[:, :, None] == m[:, :, :, None])  # [B, H, ow, W, C]
  first_col = jnp.min(jnp.where(on, w, width), axis=3, keepdims=True)
  spread = jnp.where(w == first_col, g[:, :, :, None], jnp.zeros((), acc))
  per_box = jnp.sum(spread, axis=2)  # [B, H, W, C]
  one_hot = image.astype(acc)
  return jnp.einsum("bn,bhwc->nhwc", one_hot, per_box, precision=lax.Precision.HIGHEST)


@jax.custom_vjp
def dense_max(features: jax.Array, bins: Bins) -> jax.Array:
  """``[K, oh, ow, C]`` bin maxima without gathers (module docstring); 0 for empty bins."""
  chunk = _chunk(bins, features.shape)
  return chunking.map_in_order(lambda b: _pool_chunk(features, b), bins, chunk)


def _dense_max_fwd(features, bins):
  values = dense_max(features, bins)
  return values, (features, bins, values)


def _dense_max_bwd(residuals, cotangent):
  features, bins, values = residuals
  acc = dtypes.compute_dtype(features.dtype)
  chunk = _chunk(bins, features.shape)
  per_box = (bins, values, cotangent.astype(acc))
  split = chunking.split(per_box, chunk)
  num_chunks = jax.tree.leaves(split)[0].shape[0]

  def body(i, grad):
    b, v, cot = jax.tree.map(lambda x: x[i], split)
    return grad + _grad_chunk(features, b, v, cot)

  grad = lax.fori_loop(0, num_chunks, body, jnp.zeros(features.shape, acc))
  return grad.astype(features.dtype), None


dense_max.defvjp(_dense_max_fwd, _dense_max_bwd)
