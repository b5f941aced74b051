"""Configuration of each op as a layer: the one implementation behind the Linen and NNX modules.

Each class holds an op's static options as dataclass fields, with the op's
defaults, and applies the functional op in
``__call__(features, boxes, box_indices=None)``. :mod:`roipool_jax.linen` and
:mod:`roipool_jax.nnx` mix these classes into ``flax.linen.Module`` and
``flax.nnx.Module``, adding nothing but the base: the modules are
parameter-free, and the options are validated by the op at trace time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from roipool_jax._src.bezier_align import bezier_align
from roipool_jax._src.crop_and_resize import crop_and_resize
from roipool_jax._src.multiscale import multi_scale_roi_align
from roipool_jax._src.precise_roi_pool import precise_roi_pool
from roipool_jax._src.ps_roi_align import ps_roi_align
from roipool_jax._src.ps_roi_pool import ps_roi_pool
from roipool_jax._src.riroi_align_rotated import riroi_align_rotated
from roipool_jax._src.roi_align import roi_align
from roipool_jax._src.roi_align_rotated import roi_align_rotated
from roipool_jax._src.roi_pool import roi_pool
from roipool_jax._src.roi_warp import roi_warp

Size = int | tuple[int, int]
Impl = Literal["auto", "gather", "einsum"]
ChannelOrder = Literal["channel_major", "bin_major"]


def module_docstring(config: type, framework: str) -> str:
  """The docstring of ``config``'s Flax ``framework`` module: the op, the call, the fields.

  The config's first line names the op (``Options of :func:`...`.``); the rest
  (its ``Attributes:``) documents the module's fields, so both modules and the
  config share one text.
  """
  first, _, rest = config.__doc__.partition("\n")
  op = first.removeprefix("Options of ").removesuffix(".")
  levels = " (``features``: the list of levels)" if config is MultiScaleRoIAlignConfig else ""
  return (
    f"{op} as a parameter-free Flax {framework} module.\n\n"
    f"  ``module(features, boxes, box_indices=None)``{levels} applies the op with the\n"
    "  options below (the op's defaults) and returns what the op returns; the op\n"
    f"  validates them when it is traced.\n{rest}"
  )


@dataclasses.dataclass
class RoIPoolConfig:
  """Options of :func:`roipool_jax.roi_pool`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    quantization: ``"round"`` (torchvision) or ``"floor"`` (the article).
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
  """

  output_size: Size
  spatial_scale: float = 1.0
  quantization: Literal["round", "floor"] = "round"
  impl: Impl = "auto"

  def __call__(self, features, boxes, box_indices=None):
    return roi_pool(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      box_indices=box_indices,
      quantization=self.quantization,
      impl=self.impl,
    )


@dataclasses.dataclass
class RoIAlignConfig:
  """Options of :func:`roipool_jax.roi_align`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive.
    aligned: half-pixel offset (Detectron2's pixel model).
    mode: ``"avg"`` or ``"max"``.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
  """

  output_size: Size
  spatial_scale: float = 1.0
  sampling_ratio: int = -1
  aligned: bool = False
  mode: Literal["avg", "max"] = "avg"
  impl: Impl = "auto"

  def __call__(self, features, boxes, box_indices=None):
    return roi_align(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      sampling_ratio=self.sampling_ratio,
      aligned=self.aligned,
      box_indices=box_indices,
      mode=self.mode,
      impl=self.impl,
    )


@dataclasses.dataclass
class CropAndResizeConfig:
  """Options of :func:`roipool_jax.crop_and_resize`.

  Attributes:
    crop_size: ``ch`` or ``(ch, cw)``.
    spatial_scale: feature cells per image pixel (pixel boxes).
    aligned: half-pixel offset (pixel boxes).
    box_format: ``"xyxy"`` (pixels) or ``"tf"`` (normalized ``(y1, x1, y2, x2)``).
    method: ``"bilinear"`` or ``"nearest"``.
    extrapolation_value: value outside the map (TensorFlow's rule), or None.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
  """

  crop_size: Size
  spatial_scale: float = 1.0
  aligned: bool = True
  box_format: Literal["xyxy", "tf"] = "xyxy"
  method: Literal["bilinear", "nearest"] = "bilinear"
  extrapolation_value: float | None = None
  impl: Impl = "auto"

  def __call__(self, features, boxes, box_indices=None):
    return crop_and_resize(
      features,
      boxes,
      self.crop_size,
      spatial_scale=self.spatial_scale,
      aligned=self.aligned,
      box_indices=box_indices,
      box_format=self.box_format,
      method=self.method,
      extrapolation_value=self.extrapolation_value,
      impl=self.impl,
    )


@dataclasses.dataclass
class RoIWarpConfig:
  """Options of :func:`roipool_jax.roi_warp`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    warp_size: the warp grid, a multiple of ``output_size``; None: twice it.
    aligned: half-pixel offset.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
  """

  output_size: Size
  spatial_scale: float = 1.0
  warp_size: Size | None = None
  aligned: bool = True
  impl: Impl = "auto"

  def __call__(self, features, boxes, box_indices=None):
    return roi_warp(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      warp_size=self.warp_size,
      aligned=self.aligned,
      box_indices=box_indices,
      impl=self.impl,
    )


@dataclasses.dataclass
class MultiScaleRoIAlignConfig:
  """Options of :func:`roipool_jax.multi_scale_roi_align`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    image_size: ``(H, W)`` of the (padded) input images; static.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive.
    aligned: half-pixel offset.
    canonical_scale: the box size that maps to ``canonical_level``.
    canonical_level: the FPN level of a ``canonical_scale`` box.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
  """

  output_size: Size
  image_size: tuple[int, int]
  sampling_ratio: int = 2
  aligned: bool = False
  canonical_scale: float = 224
  canonical_level: int = 4
  impl: Impl = "auto"

  def __call__(self, features: Sequence, boxes, box_indices=None):
    return multi_scale_roi_align(
      features,
      boxes,
      self.output_size,
      image_size=self.image_size,
      sampling_ratio=self.sampling_ratio,
      aligned=self.aligned,
      box_indices=box_indices,
      canonical_scale=self.canonical_scale,
      canonical_level=self.canonical_level,
      impl=self.impl,
    )


@dataclasses.dataclass
class PSRoIPoolConfig:
  """Options of :func:`roipool_jax.ps_roi_pool`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``; the map has ``C_out * oh * ow`` channels.
    spatial_scale: feature cells per image pixel.
    channel_order: ``"channel_major"`` (torchvision's) or ``"bin_major"`` (faster).
  """

  output_size: Size
  spatial_scale: float = 1.0
  channel_order: ChannelOrder = "channel_major"

  def __call__(self, features, boxes, box_indices=None):
    return ps_roi_pool(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      box_indices=box_indices,
      channel_order=self.channel_order,
    )


@dataclasses.dataclass
class PSRoIAlignConfig:
  """Options of :func:`roipool_jax.ps_roi_align`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``; the map has ``C_out * oh * ow`` channels.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
    channel_order: ``"channel_major"`` (torchvision's) or ``"bin_major"`` (faster).
  """

  output_size: Size
  spatial_scale: float = 1.0
  sampling_ratio: int = -1
  impl: Impl = "auto"
  channel_order: ChannelOrder = "channel_major"

  def __call__(self, features, boxes, box_indices=None):
    return ps_roi_align(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      sampling_ratio=self.sampling_ratio,
      box_indices=box_indices,
      impl=self.impl,
      channel_order=self.channel_order,
    )


@dataclasses.dataclass
class RoIAlignRotatedConfig:
  """Options of :func:`roipool_jax.roi_align_rotated`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive.
    aligned: half-pixel offset (detectron2: always).
    clockwise: the angle turns clockwise (mmcv's option).
  """

  output_size: Size
  spatial_scale: float = 1.0
  sampling_ratio: int = -1
  aligned: bool = True
  clockwise: bool = False

  def __call__(self, features, boxes, box_indices=None):
    return roi_align_rotated(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      sampling_ratio=self.sampling_ratio,
      aligned=self.aligned,
      clockwise=self.clockwise,
      box_indices=box_indices,
    )


@dataclasses.dataclass
class RiRoIAlignRotatedConfig:
  """Options of :func:`roipool_jax.riroi_align_rotated`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    num_orientations: orientation channels per group (the map's innermost).
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive.
    clockwise: the sampling grid turns clockwise (mmcv's option).
  """

  output_size: Size
  num_orientations: int = 8
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  clockwise: bool = False

  def __call__(self, features, boxes, box_indices=None):
    return riroi_align_rotated(
      features,
      boxes,
      self.output_size,
      num_orientations=self.num_orientations,
      spatial_scale=self.spatial_scale,
      sampling_ratio=self.sampling_ratio,
      clockwise=self.clockwise,
      box_indices=box_indices,
    )


@dataclasses.dataclass
class BezierAlignConfig:
  """Options of :func:`roipool_jax.bezier_align`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive.
    aligned: half-pixel offset.
  """

  output_size: Size
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  aligned: bool = True

  def __call__(self, features, boxes, box_indices=None):
    return bezier_align(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      sampling_ratio=self.sampling_ratio,
      aligned=self.aligned,
      box_indices=box_indices,
    )


@dataclasses.dataclass
class PreciseRoIPoolConfig:
  """Options of :func:`roipool_jax.precise_roi_pool`.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``.
  """

  output_size: Size
  spatial_scale: float = 1.0
  impl: Impl = "auto"

  def __call__(self, features, boxes, box_indices=None):
    return precise_roi_pool(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      box_indices=box_indices,
      impl=self.impl,
    )
