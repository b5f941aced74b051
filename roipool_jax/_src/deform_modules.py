"""What the Linen and NNX deformable RoI pooling modules share: options, layer shapes, docs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from roipool_jax._src import validation
from roipool_jax._src.deform_roi_pool import deform_roi_pool

Size = int | tuple[int, int]


@dataclasses.dataclass
class DeformRoIPoolOptions:
  """Options of the deformable RoI pooling modules.

  Attributes:
    output_size: ``oh`` or ``(oh, ow)``.
    spatial_scale: feature cells per image pixel.
    sampling_ratio: samples per bin axis; ``<= 0`` adaptive (mmcv's 0).
    gamma: scale of the learned offsets.
    deform_fc_channels: width of the hidden fully connected layers (mmcv: 1024).
    dtype: computation dtype of the fully connected layers (None: inferred).
    param_dtype: dtype of their parameters.
  """

  output_size: Size
  spatial_scale: float = 1.0
  sampling_ratio: int = 0
  gamma: float = 0.1
  deform_fc_channels: int = 1024
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def size(self) -> tuple[int, int]:
    return validation.normalize_size(self.output_size)

  def hidden(self) -> int:
    width = validation.check_int("deform_fc_channels", self.deform_fc_channels)
    if width < 1:
      raise ValueError(f"`deform_fc_channels` must be >= 1; got {width}.")
    return width

  def pool(self, features, boxes, box_indices, offsets) -> jax.Array:
    return deform_roi_pool(
      features,
      boxes,
      offsets,
      self.output_size,
      spatial_scale=self.spatial_scale,
      sampling_ratio=self.sampling_ratio,
      gamma=self.gamma,
      box_indices=box_indices,
    )


def flat(pooled: jax.Array) -> jax.Array:
  """``[..., oh, ow, C]`` pooled features as the fully connected layers' ``[..., oh * ow * C]``."""
  return pooled.reshape(pooled.shape[:-3] + (-1,))


def as_offsets(raw: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``[..., oh * ow * 2]`` outputs of the last offset layer as ``[..., oh, ow, 2]``."""
  return raw.reshape(raw.shape[:-1] + size + (2,))


def as_mask(raw: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``[..., oh * ow]`` outputs of the last mask layer as the ``[..., oh, ow, 1]`` sigmoid mask."""
  return jax.nn.sigmoid(raw.reshape(raw.shape[:-1] + size + (1,)))


_LAYERS = """
  The layers (mmcv's): ``pooled = deform_roi_pool(features, boxes, None)`` (plain
  RoIAlign with ``aligned=True``), then ``offsets = fc3(relu(fc2(relu(fc1(flat)))))``
  on ``flat = pooled.reshape(K, oh * ow * C)``, read as ``[K, oh, ow, 2]`` ``(dx, dy)``
  per bin, then ``deform_roi_pool(features, boxes, offsets)``. ``fc1`` and ``fc2``
  have ``deform_fc_channels`` outputs and Flax's default initialization; ``fc3``
  starts at zero, so training starts from RoIAlign. Gradients reach the features
  through both pooling calls.{mask}

  Porting mmcv weights: mmcv flattens ``[K, C, oh, ow]`` in ``(c, i, j)`` order and
  reads offsets as ``[K, 2, oh, ow]``; here the order is ``(i, j, c)`` and ``[K, oh,
  ow, 2]``: permute the inputs of the first layers and the outputs of ``fc3`` (and
  transpose torch's ``[out, in]`` weights into ``[in, out]`` kernels).
"""

_MASK = """ The mask is ``sigmoid(mask_fc2(relu(mask_fc1(flat))))`` read as
  ``[K, oh, ow, 1]``, with ``mask_fc2`` starting at zero (a mask of 0.5), and the
  module returns the deformable pool times the mask."""


def docstring(modulated: bool, framework: str, call: str) -> str:
  """The docstring of one of the four modules."""
  what = (
    "Modulated deformable RoI pooling (DCNv2): learned offsets and a learned\n"
    "  sigmoid mask per bin, as mmcv's ``ModulatedDeformRoIPoolPack``"
    if modulated
    else "Deformable RoI pooling with learned offsets, as mmcv's ``DeformRoIPoolPack``"
  )
  rest = DeformRoIPoolOptions.__doc__.partition("\n")[2]
  layers = _LAYERS.format(mask=_MASK if modulated else "")
  return (
    f"{what}; a Flax {framework} module with parameters.\n\n"
    + (
      "  Built as ``Module(output_size, channels, *, <options below>, rngs=rngs)``,\n"
      "  ``channels`` being the map's ``C``.\n"
      if framework == "NNX"
      else ""
    )
    + f"  ``{call}`` returns ``[K, oh, ow, C]`` (or ``[N, R, oh, ow, C]``); the pooling\n"
    f"  is :func:`roipool_jax.deform_roi_pool`.\n{layers}{rest}"
  )
