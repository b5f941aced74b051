"""``roi_warp`` (MNC): a bilinear warp of each box, then max pooling."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import roi_align as roi_align_lib
from roipool_jax._src import scaffold, validation


def roi_warp(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  warp_size: int | Sequence[int] | None = None,
  aligned: bool = True,
  box_indices: jax.typing.ArrayLike | None = None,
  impl: Literal["auto", "gather", "einsum"] = "auto",
) -> jax.Array:
  r"""RoI warping (MNC): bilinear warp of each box, then max pooling to ``oh x ow``.

  The box is first warped to a ``wh x ww`` grid by
  ``roi_align(..., sampling_ratio=1)``: one bilinear sample at the centre of
  each warp cell, which is :func:`crop_and_resize` of the pixel box
  (``warp_size`` defaults to ``2 * output_size``, as MNC warps to twice the
  pooled size). Then it is max-pooled over non-overlapping
  ``(wh / oh) x (ww / ow)`` windows::

      out[i, j, c] = max over warp cells (u, v) with u // (wh / oh) == i and
                     v // (ww / ow) == j of warp[u, v, c]

  As an RoI op it follows :func:`roi_align`'s rules for degenerate boxes:
  inverted and non-finite boxes give zeros (``crop_and_resize`` flips
  inverted boxes instead).

  Unlike ``roi_pool`` nothing is quantized, so the output is a continuous,
  differentiable function of the box coordinates (MNC needs the gradient with
  respect to the box to train its cascade).

  Gradient: through the max pool by JAX's rule for ``max`` (the cotangent is
  split evenly among equal maxima), then through the bilinear warp to the
  features and the boxes (see :func:`roi_align`).

  Dtypes: float64 features are computed in float64, all others in float32
  (boxes too); outputs keep the features' dtype. Empty inputs (``K = 0``
  boxes, ``N = 0`` images) give empty outputs and zero gradients.

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
    TypeError: as :func:`roi_align`; a ``warp_size`` that is not ints.
    ValueError: as :func:`roi_align`, or a ``warp_size`` that is not a
      positive multiple of ``output_size``.

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
  oh, ow = validation.normalize_size(output_size)
  if warp_size is None:
    wh, ww = 2 * oh, 2 * ow
  else:
    wh, ww = validation.normalize_size(warp_size, "warp_size")
  if wh % oh or ww % ow:
    raise ValueError(
      f"`warp_size` must be a multiple of `output_size` per axis; got warp_size "
      f"{(wh, ww)} and output_size {(oh, ow)}."
    )
  scale, aligned, impl = roi_align_lib.check_options(features, spatial_scale, aligned, impl)
  options = dict(size=(oh, ow), warp=(wh, ww), scale=scale, aligned=aligned, impl=impl)
  return scaffold.run(_roi_warp, jnp.asarray(features), boxes, box_indices, (oh, ow), **options)


# The warp and the max pool compile as one program (an eager call compiles at most one).
@partial(jax.jit, static_argnames=("size", "warp", "scale", "aligned", "impl"))
def _roi_warp(features, flat, *, size, warp, scale, aligned, impl):
  warped = roi_align_lib.align_bins(features, flat, warp, scale, 1, aligned, "avg", impl=impl)
  return _max_pool(warped, size)


@partial(jax.named_call, name="roi_warp_max_pool")
def _max_pool(warped: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  *batch, wh, ww, c = warped.shape
  oh, ow = output_size
  windows = warped.reshape(*batch, oh, wh // oh, ow, ww // ow, c)
  return jnp.max(windows, axis=(-4, -2))
