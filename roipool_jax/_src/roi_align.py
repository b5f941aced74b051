"""``roi_align``: Mask R-CNN RoIAlign, bilinear sampling without quantization."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import backends, dense, sample_max, sampling, scaffold, tap_sum, validation

MODES = ("avg", "max")


def align_geometry(flat, output_size, spatial_scale, sampling_ratio, aligned):
  """``(rows, cols)`` :class:`sampling.Axis` of every box."""
  return sampling.box_axes(
    flat.boxes, flat.valid, output_size, spatial_scale, sampling_ratio, aligned
  )


def _max_samples(sampling_ratio: int, length: int) -> int:
  """Static bound on the samples of one bin that can matter along an axis.

  Fixed grids: all of them. Adaptive grids (spacing > 0.5 cell, or a single
  sample): those in ``[-1, length]`` are at most ``2 * length + 3``, plus two
  of slack on each side of the window.
  """
  return sampling_ratio if sampling_ratio > 0 else 2 * length + 7


def average_weights(rows, cols, output_size, map_size, sampling_ratio, impl):
  """Per-axis weights of ``mode="avg"`` for a resolved ``impl``.

  ``"gather"``: :class:`sampling.Taps` ``(ty, tx)``: two taps per sample for
  fixed grids, merged per-cell taps for adaptive ones. ``"einsum"``: the dense
  interpolation matrices ``Wy [K, oh, H]``, ``Wx [K, ow, W]``.
  """
  (oh, ow), (height, width) = output_size, map_size
  if sampling_ratio > 0:
    ty, _ = sampling.sample_taps(rows, oh, height, sampling_ratio, True)
    tx, _ = sampling.sample_taps(cols, ow, width, sampling_ratio, True)
    if impl == "einsum":
      return dense.interpolation_matrix(ty, height), dense.interpolation_matrix(tx, width)
    return ty, tx
  if impl == "einsum":  # row_taps builds the dense matrices directly
    wy = sampling.row_taps(rows, oh, height, dense=True).weight
    return wy, sampling.row_taps(cols, ow, width, dense=True).weight
  return sampling.row_taps(rows, oh, height), sampling.row_taps(cols, ow, width)


def average_per_bin(features, rows, cols, image_index, output_size, sampling_ratio):
  """``[K, oh, ow, C]`` averages where every bin is its own one-bin box (``impl="gather"``).

  For ops whose bins do not share a box's grid (``deform_roi_pool``,
  ``bezier_align``): ``rows`` and ``cols`` are :class:`sampling.Axis` of
  ``K * oh * ow`` one-bin boxes, bins in ``(k, i, j)`` order, and
  ``image_index`` is ``[K]``. Each bin reads only the cells its samples touch.
  """
  (oh, ow), channels = output_size, features.shape[3]
  ty, tx = average_weights(rows, cols, (1, 1), features.shape[1:3], sampling_ratio, "gather")
  index = jnp.repeat(image_index, oh * ow)
  out = backends.sum_taps(features, ty, tx, index, "gather")
  return out.reshape(-1, oh, ow, channels)


def weighted_sum(features, wy, wx, image_index, impl):
  """``[K, oh, ow, C]`` sums of :func:`average_weights`' weights for a resolved ``impl``."""
  if impl == "einsum":
    return dense.separable_sum(features, wy, wx, image_index)
  return backends.sum_taps(features, wy, wx, image_index, impl)


def _average(features, flat, rows, cols, output_size, sampling_ratio, impl):
  wy, wx = average_weights(rows, cols, output_size, features.shape[1:3], sampling_ratio, impl)
  return weighted_sum(features, wy, wx, flat.image_index, impl)


def _maximum(features, flat, rows, cols, output_size, sampling_ratio):
  """``mode="max"``: the window of samples that can land on the map, two taps each."""
  (oh, ow), (height, width) = output_size, features.shape[1:3]
  ty, limit_y = sampling.sample_taps(rows, oh, height, _max_samples(sampling_ratio, height), False)
  tx, limit_x = sampling.sample_taps(cols, ow, width, _max_samples(sampling_ratio, width), False)
  plan = tap_sum.map_plan(flat.image_index, ty, tx, features.shape)
  return sample_max.sample_max(features, ty.weight, tx.weight, plan, (limit_y, limit_x))


def align_bins(
  features,
  flat,
  output_size,
  spatial_scale,
  sampling_ratio,
  aligned,
  mode,
  impl="gather",
):
  """RoIAlign of flat boxes, ``[K, oh, ow, C]``; shared by ``roi_align`` and
  ``multi_scale_roi_align``.

  ``impl`` is a resolved backend (``"gather"`` or ``"einsum"``, see
  :func:`backends.resolve`).
  """
  rows, cols = align_geometry(flat, output_size, spatial_scale, sampling_ratio, aligned)
  if mode == "max":
    return _maximum(features, flat, rows, cols, output_size, sampling_ratio)
  return _average(features, flat, rows, cols, output_size, sampling_ratio, impl)


def roi_align(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  sampling_ratio: int = -1,
  aligned: bool = False,
  box_indices: jax.typing.ArrayLike | None = None,
  mode: Literal["avg", "max"] = "avg",
  impl: Literal["auto", "gather", "einsum"] = "auto",
) -> jax.Array:
  r"""RoIAlign (Mask R-CNN): bilinear samples averaged (or maxed) over an ``oh x ow`` grid.

  No coordinate is rounded: each bin's value is computed from bilinearly
  interpolated samples at regularly spaced points inside it. ``mode="avg"``
  matches ``torchvision.ops.roi_align`` (and Detectron2's ``ROIAlign``) for
  every box, including boxes partly or wholly outside the map and adaptive
  sampling of boxes larger than the map. Per axis (y shown; x is the same with
  columns, ``W`` and ``ow``), in the compute dtype (below), with
  ``s = spatial_scale``::

      offset = 0.5 if aligned else 0       # aligned: pixel centres are at +0.5
      y0 = y1 * s - offset                 y_end = y2 * s - offset
      roi_h = y_end - y0                   # not aligned: roi_h = max(roi_h, 1)
      bin_h = roi_h / oh                   # correctly rounded
      g = sampling_ratio if sampling_ratio > 0 else ceil(bin_h)   # per box
      sample i of bin p:  y = y0 + p * bin_h + (i + 0.5) * bin_h / g,  i = 0 .. g-1

  Bilinear rule for a sample at ``y`` (torchvision's): if ``y < -1`` or
  ``y > H`` (or the same for ``x``) the sample is 0 (but still counted);
  otherwise ``y`` is clamped to ``>= 0``, ``y_low = floor(y)``; if
  ``y_low >= H - 1`` both neighbours are row ``H - 1``; the weights are
  ``1 - (y - y_low)`` and ``y - y_low``. The bin value is, per channel:

  * ``mode="avg"``: the sum of the ``g_y * g_x`` samples divided by
    ``max(g_y * g_x, 1)``;
  * ``mode="max"``: the maximum of the samples (as mmcv's ``pool_mode="max"``);
    NaN if a sample is NaN, and 0 if the bin has no sample. (mmcv's kernel
    skips NaN samples, and gives a bin without samples ``-FLT_MAX``.)

  A bin with ``g = 0`` (a zero-size box with ``aligned=True`` and adaptive
  sampling) has no sample and outputs 0. Inverted boxes (``x2 < x1`` or
  ``y2 < y1``) output zeros and get zero gradients. This is the one
  deliberate difference from torchvision, which gives them size 1
  (``aligned=False``), samples a mirrored box (``aligned=True``,
  ``sampling_ratio > 0``) or crashes (``aligned=True``, adaptive). Non-finite
  coordinates and (under ``jit``) out-of-range ``box_indices`` give zeros.

  Gradients (hand-written ``custom_vjp`` for the sampling kernel):

  * features: each sample sends ``cotangent * weight / count`` (avg) to its
    four neighbour cells; for ``mode="max"`` only the first maximal sample in
    ``(iy, ix)`` row-major order, per channel, sends ``cotangent * weight``.
    Accumulated in the compute dtype by a scatter-add issued in a fixed
    order (boxes sorted by cost, then bins, then taps); XLA:CPU executes it
    sequentially, so the gradient is bitwise reproducible run to run
    (tested). XLA:GPU
    implements scatter-add with atomics, so on GPU the last bits may vary.
  * boxes: the exact derivative of the formulas above through the sample
    positions (``d weight / d y = -+1`` inside the map, 0 where a position is
    clamped or dropped), with the integer grid ``g`` and the neighbour cells
    held constant; zero for degenerate boxes. ``box_indices`` has none.

  Dtypes: float64 features are computed in float64, all others in float32
  (boxes too); outputs keep the features' dtype. Empty inputs (``K = 0``
  boxes, ``N = 0`` images) give empty outputs and zero gradients.

  Cost: each output reads about ``4 * g_y * g_x`` cells of ``C`` values for a
  fixed ``sampling_ratio``. For adaptive sampling, the samples of a bin are
  first merged per cell, so a bin reads at most
  ``min(bin_h + 2, H) * min(bin_w + 2, W)`` cells (at least one), never
  ``g^2`` samples: the work is bounded per bin by the map. For
  ``mode="max"`` only the samples within one cell of the map are visited.
  Nothing of size ``K * H * W * C`` is materialized.

  Implementations (``impl``): the above describes ``"gather"``.
  ``"einsum"`` (``mode="avg"`` only) computes the same formula with dense
  per-axis interpolation matrices ``Wy [K, oh, H]`` and ``Wx [K, ow, W]``
  and two matmuls, ``out = Wy @ F @ Wx^T`` per box. Its HLO has no gather
  and no scatter, and its gradients (autodiff: the transposed matmuls) are
  deterministic on every backend. It costs ``2 * K * oh * N * H * W * C``
  flops, and a non-finite value anywhere in the map reaches every box (``0 *
  inf`` is NaN). ``"auto"`` (default) picks ``"einsum"`` on TPU and GPU and
  ``"gather"`` on CPU; ``mode="max"`` always uses ``"gather"``.

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel (1/4 for FPN P2).
    sampling_ratio: static samples per bin along each axis; ``<= 0`` means
      adaptive, ``ceil(roi_size / output_size)`` per box and axis.
    aligned: static; shift boxes by -0.5 cell (Detectron2's pixel model;
      recommended) instead of the legacy ``roi_size >= 1`` rule.
    box_indices: ``[K]`` integer image index of each box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 4]`` boxes.
    mode: ``"avg"`` (torchvision) or ``"max"`` (mmcv's max pool mode).
    impl: ``"auto"``, ``"gather"`` or ``"einsum"`` (see above); static.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes)
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type (``output_size`` not ints,
      ``spatial_scale`` not a static number, ``sampling_ratio`` not an int,
      ``aligned`` not a bool, ``mode``/``impl`` not a str), non-floating
      ``features`` or non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes`` (a
      torchvision ``[K, 5]`` rois array is named as such), a non-positive
      ``output_size`` or ``spatial_scale``, an unknown ``mode`` or ``impl``
      (or ``"einsum"`` with ``mode="max"``), ``box_indices`` of the wrong
      length or (when concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import roi_align
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)   # x[0, h, w, 0] = 4 h + w
    >>> # aligned: the box covers cells 1..2, one sample at each cell centre
    >>> roi_align(x, jnp.array([[1.0, 1.0, 3.0, 3.0]]), 2, aligned=True)[0, :, :, 0]
    Array([[ 5.,  6.],
           [ 9., 10.]], dtype=float32)

  References:
    He, Gkioxari, Dollar, Girshick, "Mask R-CNN", ICCV 2017.
    https://arxiv.org/abs/1703.06870
  """
  scale, aligned, impl = check_options(features, spatial_scale, aligned, impl, mode)
  size = validation.normalize_size(output_size)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  options = dict(size=size, scale=scale, ratio=ratio, aligned=aligned, mode=mode, impl=impl)
  return scaffold.run(_roi_align, jnp.asarray(features), boxes, box_indices, size, **options)


def check_options(
  features: object, spatial_scale: object, aligned: object, impl: str, mode: str = "avg"
) -> tuple[float, bool, str]:
  """The checks of the options :func:`roi_align` shares with the ops built on it
  (``roi_warp``); returns the checked ``(spatial_scale, aligned, impl)``."""
  validation.check_features(features)
  scale = validation.check_spatial_scale(spatial_scale)
  aligned = validation.check_bool("aligned", aligned)
  validation.check_choice("mode", mode, MODES)
  return scale, aligned, backends.resolve(impl, mode == "avg", 'for mode="max"')


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "ratio", "aligned", "mode", "impl"))
def _roi_align(features, flat, *, size, scale, ratio, aligned, mode, impl):
  return align_bins(features, flat, size, scale, ratio, aligned, mode, impl=impl)
