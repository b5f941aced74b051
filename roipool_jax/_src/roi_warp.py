"""``crop_and_resize`` (bilinear warp of a box to a fixed grid) and ``roi_warp`` (MNC)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from roipool_jax._src import roi_align as roi_align_lib
from roipool_jax._src import validation


def crop_and_resize(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  crop_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  aligned: bool = True,
  box_indices: jax.typing.ArrayLike | None = None,
  impl: str = "auto",
) -> jax.Array:
  r"""Warps every box to a fixed ``ch x cw`` grid by bilinear interpolation.

  Output cell ``(i, j)`` is one bilinear sample at the centre of cell
  ``(i, j)`` of a ``ch x cw`` grid laid over the box: this is exactly
  ``roi_align(..., sampling_ratio=1)``. With ``s = spatial_scale`` and
  ``offset = 0.5 if aligned else 0``::

      x_j = (x1 * s - offset) + j * bin_w + 0.5 * bin_w,   bin_w = (x2 - x1) * s / cw
      y_i = (y1 * s - offset) + i * bin_h + 0.5 * bin_h,   bin_h = (y2 - y1) * s / ch

  (with ``aligned=False`` the box size is at least 1 cell, as in
  :func:`roi_align`). Edges follow :func:`roi_align`'s bilinear rule: samples
  within one cell outside the map are clamped to the border cell, samples
  further out are 0. Gradients flow to the features and to the boxes.

  Relation to ``tf.image.crop_and_resize``: TensorFlow takes *normalized*
  boxes ``(y1, x1, y2, x2)`` and samples corner-aligned points
  ``x_j = x1 * (W - 1) + j * (x2 - x1) * (W - 1) / (cw - 1)``, with
  ``extrapolation_value`` outside ``[0, W - 1]``. Those same points ``a + j * d``
  are obtained here (``aligned=True``, ``spatial_scale=1``) with the pixel box
  ``x1' = a + 0.5 - d / 2``, ``x2' = x1' + cw * d``; the results agree wherever
  the samples lie inside the map (edge handling differs as described).

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 4]`` or ``[N, R, 4]`` boxes ``(x1, y1, x2, y2)`` in image pixels.
    crop_size: ``ch`` (square) or ``(ch, cw)``; static.
    spatial_scale: static feature cells per image pixel.
    aligned: static; pixel-centre model (-0.5 shift), the default here.
    box_indices: ``[K]`` image index per box for ``[K, 4]`` boxes.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``; static (see :func:`roi_align`).

  Returns:
    ``[K, ch, cw, C]`` or ``[N, R, ch, cw, C]`` in the features' dtype.

  Raises:
    ValueError: as :func:`roi_align`.
    TypeError: as :func:`roi_align`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import crop_and_resize
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> crop_and_resize(x, jnp.array([[0.0, 0.0, 4.0, 4.0]]), 2)[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
  """
  crop_size = validation.normalize_output_size(crop_size, "crop_size")
  return roi_align_lib.roi_align(
    features,
    boxes,
    crop_size,
    spatial_scale=spatial_scale,
    sampling_ratio=1,
    aligned=aligned,
    box_indices=box_indices,
    impl=impl,
  )


def roi_warp(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  warp_size: int | Sequence[int] | None = None,
  aligned: bool = True,
  box_indices: jax.typing.ArrayLike | None = None,
  impl: str = "auto",
) -> jax.Array:
  r"""RoI warping (MNC): bilinear warp of each box, then max pooling to ``oh x ow``.

  The box is first warped to a ``wh x ww`` grid with :func:`crop_and_resize`
  (one bilinear sample at the centre of each warp cell; ``warp_size``
  defaults to ``2 * output_size``, as MNC warps to twice the pooled size),
  then max-pooled over non-overlapping ``(wh / oh) x (ww / ow)`` windows::

      out[i, j, c] = max over warp cells (u, v) with u // (wh / oh) == i and
                     v // (ww / ow) == j of crop_and_resize(...)[u, v, c]

  Unlike ``roi_pool`` nothing is quantized, so the output is a continuous,
  differentiable function of the box coordinates (MNC needs the gradient with
  respect to the box to train its cascade).

  Gradient: through the max pool by JAX's rule for ``max`` (the cotangent is
  split evenly among equal maxima), then through the bilinear warp to the
  features and the boxes (see :func:`roi_align`).

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 4]`` or ``[N, R, 4]`` boxes ``(x1, y1, x2, y2)`` in image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    warp_size: static ``wh`` or ``(wh, ww)``, multiples of ``output_size``;
      default ``2 * output_size``.
    aligned: static; pixel-centre model (see :func:`crop_and_resize`).
    box_indices: ``[K]`` image index per box for ``[K, 4]`` boxes.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``; static (see :func:`roi_align`).

  Returns:
    ``[K, oh, ow, C]`` or ``[N, R, oh, ow, C]`` in the features' dtype.

  Raises:
    ValueError: as :func:`roi_align`, or a ``warp_size`` that is not a
      positive multiple of ``output_size``.
    TypeError: as :func:`roi_align`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import roi_warp
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> roi_warp(x, jnp.array([[0.0, 0.0, 4.0, 4.0]]), 1)[0, :, :, 0]
    Array([[12.5]], dtype=float32)

  References:
    Dai, He, Sun, "Instance-aware Semantic Segmentation via Multi-task Network
    Cascades", CVPR 2016. https://arxiv.org/abs/1512.04412
  """
  oh, ow = validation.normalize_output_size(output_size)
  if warp_size is None:
    wh, ww = 2 * oh, 2 * ow
  else:
    wh, ww = validation.normalize_output_size(warp_size, "warp_size")
  if wh % oh or ww % ow:
    raise ValueError(
      f"`warp_size` must be a multiple of `output_size` per axis; got warp_size "
      f"{(wh, ww)} and output_size {(oh, ow)}."
    )
  warped = crop_and_resize(
    features,
    boxes,
    (wh, ww),
    spatial_scale=spatial_scale,
    aligned=aligned,
    box_indices=box_indices,
    impl=impl,
  )
  return _max_pool(warped, (oh, ow))


@partial(jax.named_call, name="roi_warp_max_pool")
def _max_pool(warped: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  *batch, wh, ww, c = warped.shape
  oh, ow = output_size
  windows = warped.reshape(*batch, oh, wh // oh, ow, ww // ow, c)
  return jnp.max(windows, axis=(-4, -2))
