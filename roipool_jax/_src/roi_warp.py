"""``roi_warp`` (MNC): a bilinear warp of each box, then max pooling."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import roi_align as roi_align_lib
from roipool_jax._src import sampling, scaffold, tap_sum, validation


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

  Cost (``impl="gather"``): the warp is not built. Warp cell ``(i * sy + a,
  j * sx + b)`` is sample ``(i, j)`` of window offset ``(a, b)``, so one fused
  kernel makes every offset's samples from the warp's own taps and keeps
  their running max, writing only the ``[K, oh, ow, C]`` output; the backward
  rebuilds the warp for the split of tied maxima. On the FPN P2 config of the
  benchmarks (512 boxes, 256 channels, 7 x 7 from a 14 x 14 warp; 2-core AMD
  EPYC, float32) this took the forward from 37-47 to 12-15 ms, with no
  ``[K, wh, ww, C]`` temporary, and forward+backward from 200-230 to 149-187
  ms; the first call is 0.1-0.3 s longer. That kernel may round a sample one
  ulp differently from ``roi_align`` (XLA:CPU contracts a multiply and an add
  into one FMA where they share a kernel), so the output can differ from the
  max-pooled warp by an ulp or two (in 3.7% of that config's float32
  outputs). The output has the same bits with and without ``grad``, and the
  gradient is that of the max-pooled warp. ``impl="einsum"`` builds the warp
  (each offset would redo the row matmul of every bin).

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
  args = (features, flat.boxes, flat.image_index, flat.valid, size, warp, scale, aligned, impl)
  if impl == "einsum":  # a window's offsets would each redo the row matmul of every bin
    return _warp_then_pool(*args)
  return _pool_offsets(*args)


def _warp_weights(features, boxes, image_index, valid, warp, scale, aligned, impl):
  """Per-axis weights of the ``wh x ww`` warp: one sample per warp cell."""
  flat = boxes_lib.FlatBoxes(boxes, image_index, valid)
  rows, cols = roi_align_lib.align_geometry(flat, warp, scale, 1, aligned)
  return roi_align_lib.average_weights(rows, cols, warp, features.shape[1:3], 1, impl)


def _warp(features, boxes, image_index, valid, warp, scale, aligned, impl):
  """The whole ``[K, wh, ww, C]`` warp."""
  wy, wx = _warp_weights(features, boxes, image_index, valid, warp, scale, aligned, impl)
  return roi_align_lib.weighted_sum(features, wy, wx, image_index, impl)


def _warp_then_pool(features, boxes, image_index, valid, size, *warp_options):
  """The definition: the warp, then its windows' maxima."""
  return _max_pool(_warp(features, boxes, image_index, valid, *warp_options), size)


def _max_over_offsets(features, boxes, image_index, valid, size, warp, scale, aligned, impl):
  """:func:`_warp_then_pool` without the warp (``impl="gather"``).

  Warp cell ``(i * sy + a, j * sx + b)`` is sample ``(i, j)`` of window offset
  ``(a, b)``, made from the same taps: one fused kernel takes the max over the
  offsets' samples and writes only the output.
  """
  (oh, ow), (wh, ww) = size, warp
  ty, tx = _warp_weights(features, boxes, image_index, valid, warp, scale, aligned, impl)
  terms = []
  for a in range(wh // oh):
    for b in range(ww // ow):
      ty_a, tx_b = _every(ty, a, wh // oh), _every(tx, b, ww // ow)
      plan = tap_sum.map_plan(image_index, ty_a, tx_b, features.shape)
      terms.append((ty_a.weight, tx_b.weight, plan))
  return tap_sum.max_of_sums(features.reshape(-1, features.shape[3]), terms)


def _every(taps: sampling.Taps, first: int, step: int) -> sampling.Taps:
  """The taps of bins ``first, first + step, ...``."""
  return taps._replace(index=taps.index[:, first::step], weight=taps.weight[:, first::step])


# Differentiated through the warp, whose even split of tied maxima needs every sample. The
# output still comes from the fused kernel, so it has the same bits with and without `grad`
# (the two kernels may round a sample differently by an ulp: see roi_warp's Cost).
_pool_offsets = jax.custom_vjp(_max_over_offsets, nondiff_argnums=(4, 5, 6, 7, 8))


def _pool_offsets_fwd(features, boxes, image_index, valid, size, *warp_options):
  warp = lambda f, b: _warp(f, b, image_index, valid, *warp_options)  # noqa: E731
  warped, warp_vjp = jax.vjp(warp, features, boxes)
  out = _max_over_offsets(features, boxes, image_index, valid, size, *warp_options)
  return out, (warped, warp_vjp)


def _pool_offsets_bwd(size, warp, scale, aligned, impl, residuals, cotangent):
  warped, warp_vjp = residuals
  return (*warp_vjp(_max_pool_transpose(warped, size, cotangent)), None, None)


def _max_pool_transpose(warped: jax.Array, output_size, cotangent: jax.Array) -> jax.Array:
  """The warp's cotangent under :func:`_max_pool`, by JAX's rule for ``max``.

  Each window's cotangent, divided by the number of its samples equal to its
  maximum, goes to each of them (a window whose maximum is NaN has none: its
  samples get NaN, as under JAX's rule).
  """
  k, wh, ww, c = warped.shape
  (oh, ow), dtype = output_size, cotangent.dtype
  windows = warped.reshape(k, oh, wh // oh, ow, ww // ow, c)
  # Elementwise over the window's offsets, not reductions: XLA:CPU hands window reductions
  # to a library call that writes their broadcast results out at the warp's size.
  offsets = [windows[:, :, a, :, b] for a in range(wh // oh) for b in range(ww // ow)]
  top = functools.reduce(jnp.maximum, offsets)
  count = functools.reduce(jnp.add, [(v == top).astype(dtype) for v in offsets])
  hit = (windows == top[:, :, None, :, None]).astype(dtype)
  return ((cotangent / count)[:, :, None, :, None] * hit).reshape(warped.shape)


_pool_offsets.defvjp(_pool_offsets_fwd, _pool_offsets_bwd)


@partial(jax.named_call, name="roi_warp_max_pool")
def _max_pool(warped: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  *batch, wh, ww, c = warped.shape
  oh, ow = output_size
  windows = warped.reshape(*batch, oh, wh // oh, ow, ww // ow, c)
  return jnp.max(windows, axis=(-4, -2))
