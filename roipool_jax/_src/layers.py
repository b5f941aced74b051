"""Configuration of each op as a layer: the one implementation behind the Linen and NNX modules.

Each class holds an op's static options as dataclass fields and applies the
functional op in ``__call__(features, boxes, box_indices=None)``.
:mod:`roipool_jax.linen` and :mod:`roipool_jax.nnx` mix these classes into
``flax.linen.Module`` and ``flax.nnx.Module``, adding nothing but the base:
the modules are parameter-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from roipool_jax._src.multiscale import multi_scale_roi_align
from roipool_jax._src.roi_align import roi_align
from roipool_jax._src.roi_pool import roi_pool
from roipool_jax._src.roi_warp import roi_warp

Size = int | tuple[int, int]


@dataclasses.dataclass
class RoIPoolConfig:
  """Options of :func:`roipool_jax.roi_pool`."""

  output_size: Size
  spatial_scale: float = 1.0
  quantization: str = "round"

  def __call__(self, features, boxes, box_indices=None):
    return roi_pool(
      features,
      boxes,
      self.output_size,
      spatial_scale=self.spatial_scale,
      box_indices=box_indices,
      quantization=self.quantization,
    )


@dataclasses.dataclass
class RoIAlignConfig:
  """Options of :func:`roipool_jax.roi_align`."""

  output_size: Size
  spatial_scale: float = 1.0
  sampling_ratio: int = -1
  aligned: bool = False
  mode: str = "avg"
  impl: str = "auto"

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
class RoIWarpConfig:
  """Options of :func:`roipool_jax.roi_warp`."""

  output_size: Size
  spatial_scale: float = 1.0
  warp_size: Size | None = None
  aligned: bool = True
  impl: str = "auto"

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
  """Options of :func:`roipool_jax.multi_scale_roi_align` (``image_size`` is static)."""

  output_size: Size
  image_size: tuple[int, int]
  sampling_ratio: int = 2
  aligned: bool = False
  canonical_scale: int = 224
  canonical_level: int = 4
  impl: str = "auto"

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
