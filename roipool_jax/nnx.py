"""Flax NNX modules (``flax.nnx``) for the RoI ops.

The modules of the ops are parameter-free dataclasses; :class:`DeformRoIPool`
and :class:`ModulatedDeformRoIPool` learn their offsets (and mask) and take
the map's channel count and ``rngs`` when built.

Example:
  >>> import jax.numpy as jnp
  >>> from roipool_jax import nnx as roi_nnx
  >>> layer = roi_nnx.RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)
  >>> features, boxes = jnp.ones((1, 32, 32, 4)), jnp.array([[0.0, 0.0, 256.0, 256.0]])
  >>> layer(features, boxes).shape
  (1, 7, 7, 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from roipool_jax._src import deform_modules, layers, validation


@dataclasses.dataclass
class RoIPool(layers.RoIPoolConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.RoIPoolConfig, "NNX")


@dataclasses.dataclass
class RoIAlign(layers.RoIAlignConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.RoIAlignConfig, "NNX")


@dataclasses.dataclass
class CropAndResize(layers.CropAndResizeConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.CropAndResizeConfig, "NNX")


@dataclasses.dataclass
class RoIWarp(layers.RoIWarpConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.RoIWarpConfig, "NNX")


@dataclasses.dataclass
class MultiScaleRoIAlign(layers.MultiScaleRoIAlignConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.MultiScaleRoIAlignConfig, "NNX")


@dataclasses.dataclass
class PSRoIPool(layers.PSRoIPoolConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.PSRoIPoolConfig, "NNX")


@dataclasses.dataclass
class PSRoIAlign(layers.PSRoIAlignConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.PSRoIAlignConfig, "NNX")


@dataclasses.dataclass
class RoIAlignRotated(layers.RoIAlignRotatedConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.RoIAlignRotatedConfig, "NNX")


@dataclasses.dataclass
class RiRoIAlignRotated(layers.RiRoIAlignRotatedConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.RiRoIAlignRotatedConfig, "NNX")


@dataclasses.dataclass
class BezierAlign(layers.BezierAlignConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.BezierAlignConfig, "NNX")


@dataclasses.dataclass
class PreciseRoIPool(layers.PreciseRoIPoolConfig, nnx.Module):
  __doc__ = layers.module_docstring(layers.PreciseRoIPoolConfig, "NNX")


class DeformRoIPool(nnx.Module):
  __doc__ = deform_modules.docstring(
    False,
    "NNX",
    "module(features, boxes, box_indices=None)",
  )

  def __init__(
    self,
    output_size: deform_modules.Size,
    channels: int,
    *,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    deform_fc_channels: int = 1024,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.options = deform_modules.DeformRoIPoolOptions(
      output_size, spatial_scale, sampling_ratio, gamma, deform_fc_channels, dtype, param_dtype
    )
    channels = validation.check_int("channels", channels)
    width, (oh, ow) = self.options.hidden(), self.options.size()
    self.channels, self.inputs = channels, oh * ow * channels
    self.offset_fc1 = self._linear(self.inputs, width, rngs)
    self.offset_fc2 = self._linear(width, width, rngs)
    self.offset_fc3 = self._linear(width, oh * ow * 2, rngs, zero=True)

  def _linear(self, inputs: int, outputs: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
    init = (
      dict(kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros) if zero else {}
    )
    o = self.options
    return nnx.Linear(inputs, outputs, dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs, **init)

  def _flat(self, features, boxes, box_indices) -> jax.Array:
    flat = deform_modules.flat(self.options.pool(features, boxes, box_indices, None))
    if flat.shape[-1] != self.inputs:
      raise ValueError(
        f"`features` must have the C = {self.channels} channels the module was built with "
        f"(its layers take oh * ow * C = {self.inputs} pooled values); got features of shape "
        f"{features.shape}."
      )
    return flat

  def _offsets(self, flat) -> jax.Array:
    x = jax.nn.relu(self.offset_fc2(jax.nn.relu(self.offset_fc1(flat))))
    return deform_modules.as_offsets(self.offset_fc3(x), self.options.size())

  def __call__(self, features, boxes, box_indices=None):
    flat = self._flat(features, boxes, box_indices)
    return self.options.pool(features, boxes, box_indices, self._offsets(flat))


class ModulatedDeformRoIPool(DeformRoIPool):
  __doc__ = deform_modules.docstring(
    True,
    "NNX",
    "module(features, boxes, box_indices=None)",
  )

  def __init__(self, output_size: deform_modules.Size, channels: int, **kwargs):
    super().__init__(output_size, channels, **kwargs)
    width, (oh, ow) = self.options.hidden(), self.options.size()
    rngs = kwargs["rngs"]
    self.mask_fc1 = self._linear(self.inputs, width, rngs)
    self.mask_fc2 = self._linear(width, oh * ow, rngs, zero=True)

  def __call__(self, features, boxes, box_indices=None):
    flat = self._flat(features, boxes, box_indices)
    pooled = self.options.pool(features, boxes, box_indices, self._offsets(flat))
    raw = self.mask_fc2(jax.nn.relu(self.mask_fc1(flat)))
    return pooled * deform_modules.as_mask(raw, self.options.size()).astype(pooled.dtype)


__all__ = (
  "BezierAlign",
  "CropAndResize",
  "DeformRoIPool",
  "ModulatedDeformRoIPool",
  "MultiScaleRoIAlign",
  "PSRoIAlign",
  "PSRoIPool",
  "PreciseRoIPool",
  "RiRoIAlignRotated",
  "RoIAlign",
  "RoIAlignRotated",
  "RoIPool",
  "RoIWarp",
)
