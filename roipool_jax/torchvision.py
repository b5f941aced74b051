"""``torchvision.ops``' RoI functions and modules with their exact signatures, for porting.

Porting a torchvision model's RoI calls is a change of import::

    # from torchvision.ops import roi_align, MultiScaleRoIAlign
    from roipool_jax.torchvision import roi_align, MultiScaleRoIAlign

Everything here takes and returns what ``torchvision.ops`` does:

* feature maps are NCHW ``[N, C, H, W]`` and results ``[K, C, oh, ow]``;
* ``boxes`` is a ``[K, 5]`` array of ``(batch_index, x1, y1, x2, y2)`` rows,
  or a list of ``[L_i, 4]`` arrays, one per image (box ``j`` of image ``i``
  comes out at row ``L_0 + ... + L_{i-1} + j``, as in torchvision);
* ``spatial_scale``, ``sampling_ratio`` and ``aligned`` may be positional,
  with torchvision's defaults;
* the modules are callables built with torchvision's constructor arguments.

The numbers are those of :func:`roipool_jax.roi_pool`,
:func:`roipool_jax.roi_align`, :func:`roipool_jax.ps_roi_pool`,
:func:`roipool_jax.ps_roi_align` and :func:`roipool_jax.multi_scale_roi_align`,
which match torchvision to float rounding (see their docstrings for the exact
formulas). What the layer adds is only the layout: it transposes each map to
NHWC and the result back to NCHW. XLA fuses these copies into the kernel's
reads where it can, but a model written for JAX should keep NHWC maps and call
:mod:`roipool_jax` directly, which avoids them (and, for R-FCN, can lay its score
maps out bin-major: ``channel_order`` of :func:`roipool_jax.ps_roi_pool`).

As with the NHWC ops, an eager call compiles at most one program: concrete
rois are split on the host, K is padded to the ops' bucket, and the
transposes compile with the op, so a call with a new K whose bucket was seen
compiles nothing.

Differences from torchvision that remain: the batch index in ``[K, 5]`` rois
is truncated to an int32 (as torchvision's kernels do), and an index outside
``[0, N)`` raises a ``ValueError`` when the rois are concrete and gives zeros
(no gradient) under ``jit``, instead of reading out of bounds.
``ps_roi_align`` outputs 0 where torchvision outputs NaN (zero-size boxes
with adaptive sampling), and ``ps_roi_pool``'s gradient is the exact gradient
of its forward (see :func:`roipool_jax.ps_roi_pool`). ``MultiScaleRoIAlign``
raises a ``ValueError`` when the maps' inferred scales are not consecutive
powers of two (tiny maps of odd image sizes can round two levels to the same
scale); torchvision then maps boxes between the first and last scale and
pools those of levels past its list of maps as zeros.

Examples:
  >>> import jax.numpy as jnp
  >>> from roipool_jax.torchvision import roi_align
  >>> x = jnp.ones((2, 8, 32, 32))  # NCHW
  >>> rois = jnp.array([[0.0, 0.0, 0.0, 64.0, 64.0], [1.0, 8.0, 8.0, 40.0, 72.0]])
  >>> roi_align(x, rois, 7, 0.5, 2).shape
  (2, 8, 7, 7)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import roipool_jax
from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import validation

__all__ = (
  "BoxesShapeError",
  "ChannelsError",
  "MultiScaleRoIAlign",
  "PSRoIAlign",
  "PSRoIPool",
  "RoIAlign",
  "RoIPool",
  "ps_roi_align",
  "ps_roi_pool",
  "roi_align",
  "roi_pool",
)

Size = int | tuple[int, int]


class BoxesShapeError(ValueError, AssertionError):
  """A ``boxes`` argument that is neither ``[K, 5]`` rois nor a list of ``[L, 4]`` boxes.

  A ``ValueError``, as for every bad value in roipool_jax, and an
  ``AssertionError``, which is what torchvision raises for it
  (``torch._assert`` in ``check_roi_boxes_shape``): code that catches either
  keeps working.
  """


class ChannelsError(ValueError, RuntimeError):
  """Position-sensitive maps whose channel count ``C`` is not a multiple of ``oh * ow``.

  A ``ValueError``, as for every bad value in roipool_jax, and a
  ``RuntimeError``, which is what torchvision raises for it (a ``TORCH_CHECK``
  in its kernels): code that catches either keeps working.
  """


def _check_ps_channels(input: jax.typing.ArrayLike, output_size: tuple[int, int]) -> None:
  """Position-sensitive maps: ``C`` must be ``C_out * oh * ow``."""
  oh, ow = output_size
  channels = np.shape(input)[1]
  if channels % (oh * ow):
    raise ChannelsError(
      f"`input` channels C must be a multiple of oh * ow = {oh} * {ow} = {oh * ow} "
      f"(C = C_out * oh * ow); got input shape {np.shape(input)} (NCHW) and output_size "
      f"{output_size}."
    )


def _check_nchw(name: str, input: jax.typing.ArrayLike) -> None:
  """A numeric ``[N, C, H, W]`` map, with errors that speak of NCHW."""
  validation.array_dtype(name, input)
  shape = np.shape(input)
  if len(shape) != 4:
    raise ValueError(f"`{name}` must be NCHW [N, C, H, W] (rank 4); got shape {shape}.")


def _on_nchw(op, input, boxes, output_size, *, position_sensitive=False, **options) -> jax.Array:
  """``op`` (an NHWC roipool_jax op) on NCHW ``input`` and torchvision ``boxes``; NCHW out."""
  output_size = validation.normalize_size(output_size)
  b, indices = convert_boxes(boxes)
  _check_nchw("input", input)
  if position_sensitive:
    _check_ps_channels(input, output_size)
  return _pool_nchw(op, input, b, indices, output_size=output_size, **options)


def _pool_nchw(op, maps, boxes: jax.Array, box_indices: jax.Array, **options) -> jax.Array:
  """``op(maps, boxes, box_indices=..., **options)`` on NCHW ``maps`` (one map or a list of
  levels), its result ``[K, C, oh, ow]``.

  The layout changes compile into one program with the op, and an eager call
  pads K to the op's bucket on the host first (:func:`boxes.prepare_boxes`),
  so an eager call compiles at most one program, and none for a K whose
  bucket was seen, as the NHWC ops do.
  """
  eager = validation.is_concrete(maps, boxes, box_indices)
  num_images = np.shape(jax.tree.leaves(maps)[0])[0]
  args = boxes_lib.prepare_boxes(boxes, box_indices, num_images, pad=eager)
  options = tuple(sorted(options.items()))
  try:
    hash(options)
  except TypeError:  # an array where a static option belongs: the op raises its own error
    return _nchw_pool(maps, boxes, box_indices, op=op, options=options)
  out = _nchw_pool_program(maps, args.boxes, args.box_indices, op=op, options=options)
  return boxes_lib.unpad(out, args.batch_shape)


def _nchw_pool(maps, boxes, box_indices, *, op, options):
  nhwc = jax.tree.map(lambda m: jnp.asarray(m).transpose(0, 2, 3, 1), maps)
  return op(nhwc, boxes, box_indices=box_indices, **dict(options)).transpose(0, 3, 1, 2)


_nchw_pool_program = jax.jit(_nchw_pool, static_argnames=("op", "options"))


def convert_boxes(boxes: object) -> tuple[jax.Array, jax.Array]:
  """torchvision's box argument as ``(boxes [K, 4], box_indices [K])``.

  Concrete boxes are split (or concatenated) on the host, so nothing is
  compiled per K; traced ones in the program.

  Args:
    boxes: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list (or
      tuple) of ``[L_i, 4]`` arrays, one per image.

  Returns:
    ``[K, 4]`` boxes in the dtype given and ``[K]`` int32 image indices
    (``[K, 5]`` rows: the batch index truncated toward zero, as a float to
    int32 conversion in XLA: NaN becomes 0, out-of-range values saturate).

  Raises:
    TypeError: ``boxes`` that is neither an array nor a list of arrays.
    BoxesShapeError: (a ``ValueError`` and an ``AssertionError``) an array
      that is not ``[K, 5]``, or a list element that is not ``[L, 4]``.
  """
  if isinstance(boxes, (list, tuple)):
    if not boxes:
      raise ValueError("`boxes` as a list must hold one [L, 4] array per image; got an empty list.")
    for i, b in enumerate(boxes):
      validation.array_dtype(f"boxes[{i}]", b)
      if np.ndim(b) != 2 or np.shape(b)[1] != 4:
        raise BoxesShapeError(
          f"`boxes[{i}]` must be [L, 4] (x1, y1, x2, y2) boxes of image {i}; got shape "
          f"{np.shape(b)}."
        )
    arrays = [b if isinstance(b, jax.Array) else np.asarray(b) for b in boxes]
    dtype = jnp.result_type(*arrays)
    counts = [a.shape[0] for a in arrays]
    indices = boxes_lib.to_device(np.repeat(np.arange(len(arrays), dtype=np.int32), counts))
    if not validation.is_concrete(arrays):
      return jnp.concatenate([a.astype(dtype) for a in arrays]), indices
    return boxes_lib.to_device(np.concatenate([np.asarray(a, dtype) for a in arrays])), indices
  dtype = validation.array_dtype("boxes", boxes)
  if np.ndim(boxes) != 2 or np.shape(boxes)[1] != 5:
    raise BoxesShapeError(
      "`boxes` must be torchvision's rois [K, 5] (batch_index, x1, y1, x2, y2) or a list of "
      f"[L, 4] arrays, one per image; got shape {np.shape(boxes)} and dtype {dtype}."
    )
  if not validation.is_concrete(boxes):
    return boxes[:, 1:], boxes[:, 0].astype(jnp.int32)
  rois = np.asarray(boxes)
  return boxes_lib.to_device(rois[:, 1:]), boxes_lib.to_device(_int32(rois[:, 0]))


def _int32(x: np.ndarray) -> np.ndarray:
  """``x.astype(int32)`` with XLA's rule on the host: truncation toward zero, NaN to 0,
  saturation outside the int32 range (NumPy's own cast leaves those undefined)."""
  info = np.iinfo(np.int32)
  if not np.issubdtype(x.dtype, np.integer):  # in float64, where the int32 bounds are exact
    x = np.asarray(x, np.float64)
    x = np.where(np.isnan(x), 0, np.trunc(x))
  return np.clip(x, info.min, info.max).astype(np.int32)


def roi_pool(
  input: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  output_size: Size,
  spatial_scale: float = 1.0,
) -> jax.Array:
  """``torchvision.ops.roi_pool``: :func:`roipool_jax.roi_pool` on NCHW maps.

  Args:
    input: ``[N, C, H, W]`` feature maps.
    boxes: ``[K, 5]`` rois ``(batch_index, x1, y1, x2, y2)`` or a list of
      ``[L_i, 4]`` boxes per image.
    output_size: ``oh`` or ``(oh, ow)``; static.
    spatial_scale: feature cells per image pixel; static.

  Returns:
    ``[K, C, oh, ow]`` in the maps' dtype.
  """
  return _on_nchw(roipool_jax.roi_pool, input, boxes, output_size, spatial_scale=spatial_scale)


def roi_align(
  input: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  output_size: Size,
  spatial_scale: float = 1.0,
  sampling_ratio: int = -1,
  aligned: bool = False,
) -> jax.Array:
  """``torchvision.ops.roi_align``: :func:`roipool_jax.roi_align` on NCHW maps.

  Args:
    input: ``[N, C, H, W]`` feature maps.
    boxes: ``[K, 5]`` rois ``(batch_index, x1, y1, x2, y2)`` or a list of
      ``[L_i, 4]`` boxes per image.
    output_size: ``oh`` or ``(oh, ow)``; static.
    spatial_scale: feature cells per image pixel; static.
    sampling_ratio: samples per bin axis, ``<= 0`` adaptive; static.
    aligned: half-pixel offset; static.

  Returns:
    ``[K, C, oh, ow]`` in the maps' dtype.
  """
  return _on_nchw(
    roipool_jax.roi_align,
    input,
    boxes,
    output_size,
    spatial_scale=spatial_scale,
    sampling_ratio=sampling_ratio,
    aligned=aligned,
  )


def ps_roi_pool(
  input: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  output_size: Size,
  spatial_scale: float = 1.0,
) -> jax.Array:
  """``torchvision.ops.ps_roi_pool``: :func:`roipool_jax.ps_roi_pool` on NCHW maps.

  Args:
    input: ``[N, C_out * oh * ow, H, W]`` feature maps.
    boxes: ``[K, 5]`` rois ``(batch_index, x1, y1, x2, y2)`` or a list of
      ``[L_i, 4]`` boxes per image.
    output_size: ``oh`` or ``(oh, ow)``; static.
    spatial_scale: feature cells per image pixel; static.

  Returns:
    ``[K, C_out, oh, ow]`` in the maps' dtype.

  Raises:
    ChannelsError: (a ``ValueError`` and a ``RuntimeError``) ``C`` is not a
      multiple of ``oh * ow``.
  """
  return _on_nchw(
    roipool_jax.ps_roi_pool,
    input,
    boxes,
    output_size,
    position_sensitive=True,
    spatial_scale=spatial_scale,
  )


def ps_roi_align(
  input: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
  output_size: Size,
  spatial_scale: float = 1.0,
  sampling_ratio: int = -1,
) -> jax.Array:
  """``torchvision.ops.ps_roi_align``: :func:`roipool_jax.ps_roi_align` on NCHW maps.

  Args:
    input: ``[N, C_out * oh * ow, H, W]`` feature maps.
    boxes: ``[K, 5]`` rois ``(batch_index, x1, y1, x2, y2)`` or a list of
      ``[L_i, 4]`` boxes per image.
    output_size: ``oh`` or ``(oh, ow)``; static.
    spatial_scale: feature cells per image pixel; static.
    sampling_ratio: samples per bin axis, ``<= 0`` adaptive; static.

  Returns:
    ``[K, C_out, oh, ow]`` in the maps' dtype.

  Raises:
    ChannelsError: (a ``ValueError`` and a ``RuntimeError``) ``C`` is not a
      multiple of ``oh * ow``.
  """
  return _on_nchw(
    roipool_jax.ps_roi_align,
    input,
    boxes,
    output_size,
    position_sensitive=True,
    spatial_scale=spatial_scale,
    sampling_ratio=sampling_ratio,
  )


@dataclasses.dataclass(frozen=True)
class RoIPool:
  """``torchvision.ops.RoIPool``: ``RoIPool(output_size, spatial_scale)(input, rois)``.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
  """

  output_size: Size
  spatial_scale: float

  def __call__(self, input, rois):
    """See :func:`roi_pool`."""
    return roi_pool(input, rois, self.output_size, self.spatial_scale)


@dataclasses.dataclass(frozen=True)
class RoIAlign:
  """``torchvision.ops.RoIAlign``: ``RoIAlign(output_size, spatial_scale, sampling_ratio,
  aligned=False)(input, rois)``.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis, ``<= 0`` adaptive.
    aligned: half-pixel offset.
  """

  output_size: Size
  spatial_scale: float
  sampling_ratio: int
  aligned: bool = False

  def __call__(self, input, rois):
    """See :func:`roi_align`."""
    return roi_align(
      input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
    )


@dataclasses.dataclass(frozen=True)
class PSRoIPool:
  """``torchvision.ops.PSRoIPool``: ``PSRoIPool(output_size, spatial_scale)(input, rois)``.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
  """

  output_size: Size
  spatial_scale: float

  def __call__(self, input, rois):
    """See :func:`ps_roi_pool`."""
    return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)


@dataclasses.dataclass(frozen=True)
class PSRoIAlign:
  """``torchvision.ops.PSRoIAlign``: ``PSRoIAlign(output_size, spatial_scale,
  sampling_ratio)(input, rois)``.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis, ``<= 0`` adaptive.
  """

  output_size: Size
  spatial_scale: float
  sampling_ratio: int

  def __call__(self, input, rois):
    """See :func:`ps_roi_align`."""
    return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)


@dataclasses.dataclass(frozen=True, repr=False)
class MultiScaleRoIAlign:
  """``torchvision.ops.MultiScaleRoIAlign`` over a dict of named NCHW levels.

  ``MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio)(x, boxes,
  image_shapes)`` pools each box from the level its size selects, as
  :func:`roipool_jax.multi_scale_roi_align` describes. The levels are
  ``x[name]`` for ``name`` in ``featmap_names``, in that order (finest first);
  other entries of ``x`` are ignored. The image size that fixes each level's
  scale is the largest height and the largest width in ``image_shapes``, as in
  torchvision.

  Attributes:
    featmap_names: the keys of the levels to use, finest first.
    output_size: ``(oh, ow)``; an int ``oh`` given is kept as ``(oh, oh)``, as
      torchvision keeps it (and prints it: the ``repr`` is torchvision's).
    sampling_ratio: samples per bin axis, ``<= 0`` adaptive.
    canonical_scale: the box size (pixels) that maps to ``canonical_level``.
    canonical_level: the FPN level of a ``canonical_scale`` box.
  """

  featmap_names: Sequence[str]
  output_size: Size
  sampling_ratio: int
  canonical_scale: float = 224
  canonical_level: int = 4

  def __post_init__(self):
    object.__setattr__(self, "output_size", validation.normalize_size(self.output_size))

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(featmap_names={self.featmap_names}, "
      f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
    )

  def __call__(
    self,
    x: Mapping[str, jax.typing.ArrayLike],
    boxes: Sequence[jax.typing.ArrayLike],
    image_shapes: Sequence[tuple[int, int]],
  ) -> jax.Array:
    """Pools ``boxes`` (a list of ``[L_i, 4]`` per image) from the named levels of ``x``.

    Returns:
      ``[sum L_i, C, oh, ow]`` in the levels' dtype.
    """
    if not isinstance(x, Mapping):
      raise TypeError(
        f"`x` must map level names to NCHW maps (an OrderedDict, as torchvision's backbone "
        f"returns); got {type(x).__name__}."
      )
    missing = [name for name in self.featmap_names if name not in x]
    if missing:
      raise ValueError(
        f"`x` has no level named {missing} (featmap_names {list(self.featmap_names)}); its keys "
        f"are {list(x)}."
      )
    if not isinstance(boxes, (list, tuple)):
      raise TypeError(
        "`boxes` must be a list of [L_i, 4] arrays, one per image (torchvision's proposals); got "
        f"{type(boxes).__name__}."
      )
    if not image_shapes:
      raise ValueError("`image_shapes` must hold one (height, width) per image; got none.")
    height = max(int(shape[0]) for shape in image_shapes)
    width = max(int(shape[1]) for shape in image_shapes)
    for name in self.featmap_names:
      _check_nchw(f"x[{name!r}]", x[name])
    b, indices = convert_boxes(boxes)
    return _pool_nchw(
      roipool_jax.multi_scale_roi_align,
      [x[name] for name in self.featmap_names],
      b,
      indices,
      output_size=self.output_size,
      image_size=(height, width),
      sampling_ratio=self.sampling_ratio,
      canonical_scale=self.canonical_scale,
      canonical_level=self.canonical_level,
    )
