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
rounding (bf16/f16 inputs are upcast; the output has the input dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from roipool_jax._src import chunking
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
  images = jnp.arange(n, dtype=image_index.dtype)

  def chunk_fn(chunk):
    cwy, cwx, cindex = chunk
    one_hot = (cindex[:, None] == images[None, :]).astype(wy.dtype)  # [Kc, N]
    rows = (one_hot[:, None, :, None] * cwy[:, :, None, :]).reshape(-1, n * h)  # [Kc*oh, N*H]
    a = jnp.dot(rows, table, precision=lax.Precision.HIGHEST)  # [Kc*oh, W*C]
    a = a.reshape(cwy.shape[0], oh, w, c)
    return jnp.einsum("kjx,kixc->kijc", cwx, a, precision=lax.Precision.HIGHEST)

  if k == 0:
    return jnp.zeros((0, oh, ow, c), features.dtype)
  chunk = chunking.chunk_size(k, oh * w * c, _CHUNK_ELEMENTS)
  out = chunking.map_in_order(chunk_fn, (wy, wx, image_index), chunk)
  return out.astype(features.dtype)
