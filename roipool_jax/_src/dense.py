"""The gather-free backend (``impl="einsum"``): RoIAlign as two matmuls per chunk.

RoIAlign's average is separable (:mod:`roipool_jax._src.sampling`), so with
dense per-axis interpolation matrices ``Wy [K, oh, H]`` and ``Wx [K, ow, W]``
(``Wy[k, i, y]`` = the summed, averaged bilinear weight of bin ``i``'s samples
on row ``y``) it is::

    out[k, i, j, :] = sum_y sum_x Wy[k, i, y] * Wx[k, j, x] * F[n_k, y, x, :]

computed as two ``einsum`` contractions. The image of each box is folded into
the first one as a one-hot factor, so ``F`` is read as one ``[N * H, W * C]``
matrix and nothing is gathered::

    A[k, i, x, :] = sum_{(n, y)} [n == n_k] Wy[k, i, y] F[n, y, x, :]  # [K, oh, W, C]
    out[k, i, j, :] = sum_x Wx[k, j, x] A[k, i, x, :]

The lowered HLO has no gather and no scatter, forward or backward. The
gradient is ordinary autodiff: the transposed matmuls, deterministic on every
backend. This is the formulation TPUs run well, and what TensorFlow's TPU
detection models use. The cost is ``2 * K * oh * N * H * W * C`` flops (dense
in the map, not in the box), against the gather path's cost proportional to
the samples. Boxes go in consecutive chunks (:func:`chunking.map_in_order`)
so that ``A`` never exceeds about ``_CHUNK_ELEMENTS`` floats; nothing of size
``K * H * W * C`` is built.

Matmuls run in the compute dtype (float32, or float64 for float64 features)
with ``Precision.HIGHEST``, so the results agree with the gather path to
rounding (16-bit inputs are widened; the output has the input dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking, dtypes
from roipool_jax._src.sampling import Taps

# Floats of the intermediate A per chunk of boxes (64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def interpolation_matrix(taps: Taps, length: int) -> jax.Array:
  """``[K, P, length]`` dense weights: ``W[k, p, r] = sum_t weight[k, p, t] [index[k, p, t] == r]``.

  A broadcast compare and a sum, with no gather. Unused taps (index -1) match
  no cell.
  """
  cells = jnp.arange(length, dtype=taps.index.dtype).reshape((1,) * taps.index.ndim + (length,))
  hit = taps.index[..., None] == cells
  return jnp.sum(jnp.where(hit, taps.weight[..., None], 0.0), axis=-2)


def _image_rows(wy: jax.Array, image_index: jax.Array, num_images: int) -> jax.Array:
  """``[K, oh, N * H]``: ``wy`` placed in the rows of each box's image (zeros elsewhere)."""
  images = jnp.arange(num_images, dtype=image_index.dtype)
  one_hot = (image_index[:, None] == images[None, :]).astype(wy.dtype)  # [K, N]
  rows = one_hot[:, None, :, None] * wy[:, :, None, :]  # [K, oh, N, H]
  return rows.reshape(wy.shape[:2] + (-1,))


def _chunked(chunk_fn, wy, wx, image_index, per_box: int, out_shape, dtype):
  """``chunk_fn`` over consecutive chunks of boxes whose intermediate holds ``per_box`` floats."""
  if wy.shape[0] == 0:
    return jnp.zeros(out_shape, dtype)
  chunk = chunking.chunk_size(wy.shape[0], per_box, _CHUNK_ELEMENTS)
  return dtypes.narrow(chunking.map_in_order(chunk_fn, (wy, wx, image_index), chunk), dtype)


def separable_sum(features: jax.Array, wy: jax.Array, wx: jax.Array, image_index: jax.Array):
  """``[K, oh, ow, C]``: ``sum_y sum_x wy[k, i, y] wx[k, j, x] F[n_k, y, x]`` (module docstring).

  Args:
    features: ``[N, H, W, C]`` map.
    wy: ``[K, oh, H]`` row weights in the compute dtype.
    wx: ``[K, ow, W]`` column weights, same dtype.
    image_index: ``[K]`` int32 image of each box; a box whose index is
      outside ``[0, N)`` gets zeros.

  Returns:
    ``[K, oh, ow, C]`` in the features' dtype, accumulated in the weights' dtype.
  """
  n, h, w, c = features.shape
  k, oh, ow = wy.shape[0], wy.shape[1], wx.shape[1]
  table = features.astype(wy.dtype).reshape(n * h, w * c)

  def chunk_fn(chunk):
    cwy, cwx, cindex = chunk
    rows = _image_rows(cwy, cindex, n).reshape(-1, n * h)  # [Kc*oh, N*H]
    a = jnp.dot(rows, table, precision=lax.Precision.HIGHEST)  # [Kc*oh, W*C]
    a = a.reshape(cwy.shape[0], oh, w, c)
    return jnp.einsum("kjx,kixc->kijc", cwx, a, precision=lax.Precision.HIGHEST)

  return _chunked(chunk_fn, wy, wx, image_index, oh * w * c, (k, oh, ow, c), features.dtype)


def position_sensitive_sum(
  features: jax.Array, wy: jax.Array, wx: jax.Array, image_index: jax.Array, channel_order: str
) -> jax.Array:
  """``[K, oh, ow, C_out]``: :func:`separable_sum` where bin ``(i, j)`` of output channel ``c``
  reads input channel ``(c * oh + i) * ow + j`` (``"channel_major"``) or ``(i * ow + j) *
  C_out + c`` (``"bin_major"``); R-FCN, ``C = C_out * oh * ow``.

  The map is read as ``oh`` matrices ``[N * H, W * C_out * ow]``, one per bin
  row ``i`` (the channels that row's bins read), so the first contraction is
  a matmul batched over ``i`` and never computes channels a bin does not read.
  """
  n, h, w, c = features.shape
  k, oh, ow = wy.shape[0], wy.shape[1], wx.shape[1]
  c_out = c // (oh * ow)
  # The channels as (i, j, c) or (c, i, j): where bin row i sits among them, and what the
  # channels of one bin row (a row of the first matmul's output) are, in order.
  if channel_order == "bin_major":
    channels, i_axis, row_channels, contract = (oh, ow, c_out), 0, (ow, c_out), "kjx,kixjc->kijc"
  else:
    channels, i_axis, row_channels, contract = (c_out, oh, ow), 1, (c_out, ow), "kjx,kixcj->kijc"
  grouped = features.astype(wy.dtype).reshape((n, h, w) + channels)
  table = jnp.moveaxis(grouped, 3 + i_axis, 0).reshape(oh, n * h, w * c_out * ow)

  def chunk_fn(chunk):
    cwy, cwx, cindex = chunk
    rows = _image_rows(cwy, cindex, n)  # [Kc, oh, N*H]
    a = jnp.einsum("kiy,iyz->kiz", rows, table, precision=lax.Precision.HIGHEST)
    a = a.reshape((cwy.shape[0], oh, w) + row_channels)
    return jnp.einsum(contract, cwx, a, precision=lax.Precision.HIGHEST)

  per_box = oh * w * c_out * ow
  return _chunked(chunk_fn, wy, wx, image_index, per_box, (k, oh, ow, c_out), features.dtype)
