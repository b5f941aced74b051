"""``multi_scale_roi_align``: RoIAlign over an FPN pyramid, one level per box."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from roipool_jax._src import backends, pyramid, sampling, scaffold, tap_sum, validation
from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import roi_align as roi_align_lib


def infer_levels(
  map_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
) -> tuple[list[float], int]:
  """Spatial scales of the levels and the pyramid level ``k_min`` of the first.

  As torchvision: each level's scale is ``2 ** round(log2(H_l / image_h))``
  (float32 arithmetic, rounding half to even) and the first level is
  ``k_min = -log2(scale_0)``. Unlike torchvision, the levels must be
  consecutive (``scale_l = scale_0 / 2 ** l``); torchvision also accepts
  other scales, and pools boxes whose level has no map as zeros.
  """
  scales = []
  for h, _ in map_sizes:
    exponent = np.round(np.log2(np.float32(h) / np.float32(image_size[0])))
    scales.append(float(2.0**exponent))
  k_min = int(-math.log2(scales[0]))
  expected = [scales[0] / 2**level for level in range(len(scales))]
  if scales != expected:
    raise ValueError(
      "`features` must be consecutive pyramid levels, finest first (each half the size of the "
      f"previous); inferred scales {scales} from map sizes {list(map_sizes)} and image_size "
      f"{tuple(image_size)} ({validation.NCHW_HINT})."
    )
  return scales, k_min


def fpn_levels(
  boxes: jax.Array,
  k_min: int,
  k_max: int,
  canonical_scale: float = 224,
  canonical_level: int = 4,
  eps: float = 1e-6,
) -> jax.Array:
  """FPN level index (``0`` is ``k_min``) of each ``[K, 4]`` box, as torchvision computes it.

  ``k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``
  clamped to ``[k_min, k_max]``, in the dtype of ``boxes`` (torchvision: the
  boxes' dtype); boxes with zero or non-finite area go to ``k_min``. The
  division is correctly rounded for an integral ``canonical_scale``.
  """
  dtype = boxes.dtype
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  if float(canonical_scale).is_integer() and canonical_scale <= 2**22:
    ratio = boxes_lib.exact_div(jnp.sqrt(area), int(canonical_scale))
  else:
    ratio = jnp.sqrt(area) / jnp.asarray(canonical_scale, dtype)
  level = jnp.floor(jnp.asarray(canonical_level, dtype) + jnp.log2(ratio) + jnp.asarray(eps, dtype))
  level = jnp.where(jnp.isnan(level), k_min, jnp.clip(level, k_min, k_max))
  return level.astype(jnp.int32) - k_min


def multi_scale_roi_align(
  features: Sequence[jax.typing.ArrayLike],
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  image_size: Sequence[int],
  sampling_ratio: int = 2,
  aligned: bool = False,
  box_indices: jax.typing.ArrayLike | None = None,
  canonical_scale: float = 224,
  canonical_level: int = 4,
  impl: Literal["auto", "gather", "einsum"] = "auto",
) -> jax.Array:
  r"""RoIAlign on a feature pyramid: each box is pooled from the level its size selects.

  Matches ``torchvision.ops.MultiScaleRoIAlign`` (Feature Pyramid Networks,
  Eqn. 1). From the static map sizes and ``image_size``, level ``l`` of
  ``features`` has scale ``2 ** round(log2(H_l / image_h))`` and the first
  level is pyramid level ``k_min = -log2(scale_0)``. A box of area ``A`` (image
  pixels) is assigned, in the compute dtype (below; torchvision: the boxes'
  dtype)::

      k = floor(canonical_level + log2(sqrt(A) / canonical_scale) + 1e-6)
      k = clip(k, k_min, k_min + L - 1)      # zero-area or inverted boxes: k_min

  and pooled with :func:`roi_align` (``mode="avg"``) on level ``k - k_min``
  at that level's scale. ``aligned`` is configurable (torchvision hard-codes
  ``False``, the default here). Gradients flow to every level and to the
  boxes (the level choice itself is piecewise constant).

  detectron2's ``ROIPooler`` (``pooler_type="ROIAlignV2"``) is this op with
  ``aligned=True``, ``sampling_ratio=0`` and its ``canonical_box_size`` as
  ``canonical_scale``, except that it adds its epsilon inside the logarithm,
  ``log2(sqrt(A) / canonical_box_size + 1e-8)``. The levels differ only for
  boxes whose ``sqrt(A)`` lies within about one part in a million below a
  power-of-two multiple of ``canonical_scale``, which torchvision's rule
  (the one above) puts a level higher.

  Cost (``impl="gather"``): one RoIAlign of every box at its own level, with
  no per-level pass over the boxes, in one of two forms with the same bits
  (:mod:`roipool_jax._src.pyramid`). On CPU, with ``0 < sampling_ratio <= 2`` and
  float32, float64 or float16 maps, the forward reads each level in place
  when the output has no more rows (``K * oh * ow``) than the pyramid has
  cells (``sum_l N * H_l * W_l``): the boxes, grouped by level in chunks,
  are pooled chunk by chunk from their own level and put back in box order
  (a copy of the output instead of the pyramid; 1000 boxes on FPN P2-P5 of
  an 800 x 1216 image: 0.71-0.91x the time, and twice the compile time).
  Otherwise the levels are read as one ``[sum_l N * H_l * W_l, C]`` table, a
  copy of the pyramid per call. The backward scatters into such a table's
  gradient and slices it into the levels' gradients; it copies the pyramid
  only for the boxes' gradient.

  Dtypes: float64 features are computed in float64, all others in float32
  (boxes too); outputs keep the features' dtype. Empty inputs (``K = 0``
  boxes, ``N = 0`` images) give empty outputs and zero gradients.

  Args:
    features: ``L`` maps ``[N, H_l, W_l, C]``, finest first, each level half
      the size of the previous one (e.g. FPN P2..P5).
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    image_size: static ``(H, W)`` of the (padded) input images; torchvision
      uses the largest height and width over the batch.
    sampling_ratio: static samples per bin axis (``<= 0``: adaptive).
    aligned: static; see :func:`roi_align`.
    box_indices: ``[K]`` image index per box for ``[K, 4]`` boxes.
    canonical_scale: static positive number (224): the box size in pixels
      that maps to ``canonical_level``.
    canonical_level: static int (4: ResNet C4/P4 for a 224 px box).
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``; static (see
      :func:`roi_align`). With ``"einsum"`` every level is a dense pass over
      all boxes (the other levels' boxes have zero weights).

  Returns:
    ``[K, oh, ow, C]`` or ``[N, R, oh, ow, C]`` in the features' dtype.

  Raises:
    TypeError: ``features`` that is not a sequence of arrays (a dict of named
      levels is named as such), levels of different dtypes, ``image_size``
      not ints, ``canonical_scale`` not a number, ``canonical_level`` not an
      int, or as :func:`roi_align`.
    ValueError: an empty or non-consecutive pyramid (NCHW levels are named
      as such), levels that disagree in N or C, a non-positive
      ``image_size`` or ``canonical_scale``, or as :func:`roi_align`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import multi_scale_roi_align
    >>> p2, p3 = jnp.ones((1, 64, 64, 8)), jnp.ones((1, 32, 32, 8))
    >>> boxes = jnp.array([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 250.0, 250.0]])
    >>> multi_scale_roi_align([p2, p3], boxes, 7, image_size=(256, 256)).shape
    (2, 7, 7, 8)

  References:
    Lin, Dollar, Girshick, He, Hariharan, Belongie, "Feature Pyramid Networks
    for Object Detection", CVPR 2017. https://arxiv.org/abs/1612.03144
  """
  if isinstance(features, Mapping):
    raise TypeError(
      "`features` must be a sequence of [N, H_l, W_l, C] maps, finest first; got a "
      f"{type(features).__name__} (torchvision's named levels: pass `list(features.values())` "
      "in pyramid order)."
    )
  if isinstance(features, (jax.Array, np.ndarray)) or not isinstance(features, Sequence):
    raise TypeError(
      "`features` must be a sequence of [N, H_l, W_l, C] maps (one per pyramid level); got "
      f"{type(features).__name__}."
    )
  if not features:
    raise ValueError("`features` must hold at least one pyramid level; got an empty sequence.")
  for level, f in enumerate(features):
    validation.check_features(f, name=f"features[{level}]")
  shapes = [np.shape(f) for f in features]
  if len({(s[0], s[3]) for s in shapes}) != 1:
    raise ValueError(
      f"All `features` levels must share N and C; got shapes {shapes} ({validation.NCHW_HINT})."
    )
  level_dtypes = [jnp.result_type(f) for f in features]
  if len(set(level_dtypes)) != 1:
    raise TypeError(f"All `features` levels must share one dtype; got {level_dtypes}.")
  image = validation.normalize_size(image_size, "image_size")
  size = validation.normalize_size(output_size)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  aligned = validation.check_bool("aligned", aligned)
  s0 = validation.check_positive("canonical_scale", canonical_scale)
  k0 = validation.check_int("canonical_level", canonical_level)
  impl = backends.resolve(impl)
  scales, k_min = infer_levels([s[1:3] for s in shapes], image)
  options = dict(
    size=size,
    scales=tuple(scales),
    k_min=k_min,
    ratio=ratio,
    aligned=aligned,
    canonical_scale=s0,
    canonical_level=k0,
    impl=impl,
  )
  levels = [jnp.asarray(f) for f in features]
  return scaffold.run(_multi_scale, levels, boxes, box_indices, size, **options)


@partial(
  jax.jit,
  static_argnames=(
    "size",
    "scales",
    "k_min",
    "ratio",
    "aligned",
    "canonical_scale",
    "canonical_level",
    "impl",
  ),
)
def _multi_scale(
  features,
  flat,
  *,
  size,
  scales,
  k_min,
  ratio,
  aligned,
  canonical_scale,
  canonical_level,
  impl,
):
  k_max = k_min + len(features) - 1
  level = fpn_levels(flat.boxes, k_min, k_max, canonical_scale, canonical_level)
  if impl == "gather":
    return _pyramid_gather(features, flat, level, size, scales, ratio, aligned)
  out = None
  for index, (f, scale) in enumerate(zip(features, scales, strict=True)):
    on_level = flat._replace(valid=flat.valid & (level == index))
    pooled = roi_align_lib.align_bins(f, on_level, size, scale, ratio, aligned, "avg", impl=impl)
    out = pooled if out is None else jnp.where((level == index)[:, None, None, None], pooled, out)
  return out


def _pyramid_gather(features, flat, level, size, scales, ratio, aligned):
  """Every box at its own level (:func:`pyramid.pyramid_tap_sum`)."""
  boxes, image_index, valid = flat
  (oh, ow), channels = size, features[0].shape[3]
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  per_box = lambda values, dtype: jnp.asarray(np.asarray(values), dtype)[level]  # noqa: E731
  height, width = per_box(heights, jnp.int32), per_box(widths, jnp.int32)
  scale = per_box(scales, boxes.dtype)
  rows, cols = sampling.box_axes(boxes, valid, size, scale, ratio, aligned)
  if ratio > 0:
    ty, _ = sampling.sample_taps(rows, oh, height[:, None, None], ratio, True)
    tx, _ = sampling.sample_taps(cols, ow, width[:, None, None], ratio, True)
  else:
    ty = sampling.row_taps(rows, oh, max(heights), limit=height)
    tx = sampling.row_taps(cols, ow, max(widths), limit=width)
  origin = image_index * height * width  # in the box's own level
  plan = tap_sum.Plan(origin, width, ty.index, tx.index, ty.count, tx.count)
  tables = [f.reshape(-1, channels) for f in features]
  return pyramid.pyramid_tap_sum(tables, ty.weight, tx.weight, plan, level)
