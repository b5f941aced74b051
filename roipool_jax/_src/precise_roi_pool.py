"""``precise_roi_pool``: Precise RoI Pooling (PrRoI Pooling, IoU-Net)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import backends, dense, sampling, scaffold, validation
from roipool_jax._src import boxes as boxes_lib


def hat_integral(t: jax.Array) -> jax.Array:
  """``G(t) = integral of max(0, 1 - |u|) du from -inf to t``: 0, then two parabolas, then 1.

  ``G`` is continuously differentiable with ``G' = max(0, 1 - |t|)``, so
  autodiff through it gives the exact derivative everywhere.
  """
  left = 0.5 * jnp.square(t + 1.0)
  right = 1.0 - 0.5 * jnp.square(1.0 - t)
  inner = jnp.where(t <= 0.0, left, right)
  return jnp.where(t <= -1.0, 0.0, jnp.where(t >= 1.0, 1.0, inner))


def integral_taps(lo, hi, num_bins: int, length: int, spatial_scale: float, dense_form=False):
  """Per-cell weights of every bin's exact integral along one axis.

  Bin ``p`` spans ``[a, b]`` with ``a = lo * s + p * bin``, ``b = a + bin``,
  ``bin = max(hi * s - lo * s, 0) / P``. Cell ``r`` weighs ``(G(b - r) -
  G(a - r)) / bin``: the integral of its hat function over the bin, per unit
  length. Only cells ``floor(a) .. ceil(b)`` inside ``[0, L)`` can weigh.

  Args:
    lo, hi: ``[K]`` box edges in image pixels, in the compute dtype.
    num_bins: ``P``.
    length: ``L``, the map's extent along the axis.
    spatial_scale: ``s``.
    dense_form: tap ``t`` is cell ``t`` (the ``[K, P, L]`` matrix of the einsum path).

  Returns:
    :class:`sampling.Taps` with ``T = L``; a bin of zero length has no taps.
  """
  start, end = boxes_lib.scale_coords((lo, hi), spatial_scale)
  size = jnp.maximum(end - start, 0.0)
  bin_size = (size / num_bins)[:, None, None]  # [K, 1, 1]
  p = jnp.arange(num_bins, dtype=lo.dtype)[None, :, None]
  a = start[:, None, None] + boxes_lib.materialize(bin_size * p)  # [K, P, 1]
  b = a + bin_size
  tap = jnp.arange(length, dtype=jnp.int32)[None, None]
  first = jnp.clip(boxes_lib.to_int(jnp.floor(a)), 0, length - 1)
  last = jnp.clip(boxes_lib.to_int(jnp.ceil(b)), 0, length - 1)
  # Cells before the map or after it hold 0: a bin wholly outside has no taps.
  used = jnp.where(
    (bin_size > 0) & (b > -1.0) & (a < length), jnp.maximum(last - first + 1, 0), 0
  )  # [K, P, 1]
  if dense_form:
    cell = jnp.broadcast_to(tap, a.shape[:2] + (length,))
    in_bin = (tap >= first) & (tap < first + used)
  else:
    cell = jnp.minimum(first + tap, length - 1)
    in_bin = tap < used
  r = cell.astype(a.dtype)
  safe = jnp.where(bin_size > 0, bin_size, 1.0)
  weight = jnp.where(in_bin, (hat_integral(b - r) - hat_integral(a - r)) / safe, 0.0)
  index = cell if dense_form else jnp.where(in_bin, cell, -1)
  return sampling.Taps(index, weight, jnp.max(used, axis=(1, 2)))


def precise_roi_pool(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  box_indices: jax.typing.ArrayLike | None = None,
  impl: Literal["auto", "gather", "einsum"] = "auto",
) -> jax.Array:
  r"""Precise RoI Pooling: the exact average of the interpolated map over each bin.

  The map is read as a continuous function, the bilinear interpolation of
  its cells with cell ``(h, w)`` at the point ``(y, x) = (h, w)`` and zero
  outside the map::

      f(y, x) = sum_{h, w} F[h, w] * tri(y - h) * tri(x - w),   tri(t) = max(0, 1 - |t|)

  Each bin outputs the integral of ``f`` over the bin divided by the bin's
  area, with no sampling and no quantization. Per axis (x shown; y is the same
  with ``oh``), with ``s = spatial_scale`` and in the compute dtype::

      x0 = x1 * s        roi_w = max(x2 * s - x0, 0)     bin_w = roi_w / ow
      bin j spans [a, b],  a = x0 + j * bin_w,  b = a + bin_w

  and, since ``f`` is separable, the bin ``(i, j)`` value is
  ``sum_{h, w} F[h, w] * Wy[i, h] * Wx[j, w]`` with ``Wx[j, w] = (G(b - w) -
  G(a - w)) / bin_w``, ``G`` the integral of ``tri`` (0 below -1, 1 above
  1, parabolas between). These are the semantics of mmcv's ``PrRoIPool``:
  no half-pixel offset, values outside the map are 0 (so ``f`` fades to 0
  over the ring of cells around the map), and a bin of zero area (a
  zero-size or inverted box) outputs 0. Boxes with non-finite coordinates,
  or (under ``jit``) an out-of-range ``box_indices`` entry, output 0. No box
  affects another.

  The output is a continuous, piecewise polynomial function of the box, and
  its gradient with respect to the box is exact and in general non-zero
  (IoU-Net refines boxes by gradient ascent on it). Gradients (the tap-sum
  kernel's hand-written ``custom_vjp`` plus autodiff of the weights above):

  * features: ``cotangent * Wy[i, h] * Wx[j, w]`` to every cell ``(h, w)``,
    accumulated in the compute dtype in a fixed order (bitwise reproducible
    on CPU);
  * boxes: the exact derivative of the integral, which is mmcv's boundary
    formula; 0 for bins of zero area.

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Implementations (``impl``): ``"gather"`` reads, per bin, the
  ``(ceil(bin_h) + 2) x (ceil(bin_w) + 2)`` cells (at most) that its integral
  touches on the map, in chunks of bins sorted by cost; ``"einsum"`` applies
  the dense ``Wy [K, oh, H]`` and ``Wx [K, ow, W]`` with matmuls, with no
  gather or scatter in its HLO. ``"auto"`` picks ``"einsum"`` on TPU and GPU,
  ``"gather"`` on CPU.

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    box_indices: ``[K]`` integer image index of each box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 4]`` boxes.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"`` (see above); static.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes)
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes``, a
      non-positive ``output_size`` or ``spatial_scale``, an unknown ``impl``,
      or ``box_indices`` of the wrong length or (when concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import precise_roi_pool
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    >>> precise_roi_pool(x, jnp.array([[0.0, 0.0, 1.0, 1.0]]), 2)[0, :, :, 0]
    Array([[1.75, 2.25],
           [2.75, 3.25]], dtype=float32)

  References:
    Jiang, Luo, Mao, Xiao, Jiang, "Acquisition of Localization Confidence for
    Accurate Object Detection", ECCV 2018. https://arxiv.org/abs/1807.11590
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  impl = backends.resolve(impl)
  options = dict(size=size, scale=scale, impl=impl)
  return scaffold.run(_precise_roi_pool, jnp.asarray(features), boxes, box_indices, size, **options)


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "impl"))
def _precise_roi_pool(features, flat, *, size, scale, impl):
  (oh, ow), (height, width) = size, features.shape[1:3]
  b = flat.boxes
  dense_form = impl == "einsum"
  ty = integral_taps(b[:, 1], b[:, 3], oh, height, scale, dense_form)
  tx = integral_taps(b[:, 0], b[:, 2], ow, width, scale, dense_form)
  if dense_form:
    return dense.separable_sum(features, ty.weight, tx.weight, flat.image_index)
  return backends.sum_taps(features, ty, tx, flat.image_index, impl)
