"""Flax Linen modules (``flax.linen``) for the RoI ops, usable in ``nn.compact``.

The modules of the ops are parameter-free; :class:`DeformRoIPool` and
:class:`ModulatedDeformRoIPool` learn their offsets (and mask).

Example:
  >>> import jax.numpy as jnp
  >>> from roipool_jax import linen as roi_nn
  >>> layer = roi_nn.RoIAlign(output_size=7, spatial_scale=1 / 16, sampling_ratio=2)
  >>> features, boxes = jnp.ones((1, 32, 32, 4)), jnp.array([[0.0, 0.0, 256.0, 256.0]])
  >>> layer.apply({}, features, boxes).shape
  (1, 7, 7, 4)
"""

from __future__ import annotations

import flax.linen as nn

from roipool_jax._src import deform_modules, layers


class RoIPool(layers.RoIPoolConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.RoIPoolConfig, "Linen")


class RoIAlign(layers.RoIAlignConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.RoIAlignConfig, "Linen")


class CropAndResize(layers.CropAndResizeConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.CropAndResizeConfig, "Linen")


class RoIWarp(layers.RoIWarpConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.RoIWarpConfig, "Linen")


class MultiScaleRoIAlign(layers.MultiScaleRoIAlignConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.MultiScaleRoIAlignConfig, "Linen")


class PSRoIPool(layers.PSRoIPoolConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.PSRoIPoolConfig, "Linen")


class PSRoIAlign(layers.PSRoIAlignConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.PSRoIAlignConfig, "Linen")


class RoIAlignRotated(layers.RoIAlignRotatedConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.RoIAlignRotatedConfig, "Linen")


class RiRoIAlignRotated(layers.RiRoIAlignRotatedConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.RiRoIAlignRotatedConfig, "Linen")


class BezierAlign(layers.BezierAlignConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.BezierAlignConfig, "Linen")


class PreciseRoIPool(layers.PreciseRoIPoolConfig, nn.Module):
  __doc__ = layers.module_docstring(layers.PreciseRoIPoolConfig, "Linen")


class DeformRoIPool(deform_modules.DeformRoIPoolOptions, nn.Module):
  __doc__ = deform_modules.docstring(False, "Linen", "module(features, boxes, box_indices=None)")

  def _dense(self, features: int, name: str, zero: bool = False) -> nn.Dense:
    init = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros) if zero else {}
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **init)

  def _offsets(self, flat):
    width, (oh, ow) = self.hidden(), self.size()
    x = nn.relu(self._dense(width, "offset_fc1")(flat))
    x = nn.relu(self._dense(width, "offset_fc2")(x))
    return deform_modules.as_offsets(self._dense(oh * ow * 2, "offset_fc3", True)(x), (oh, ow))

  @nn.compact
  def __call__(self, features, boxes, box_indices=None):
    flat = deform_modules.flat(self.pool(features, boxes, box_indices, None))
    return self.pool(features, boxes, box_indices, self._offsets(flat))


class ModulatedDeformRoIPool(DeformRoIPool):
  __doc__ = deform_modules.docstring(True, "Linen", "module(features, boxes, box_indices=None)")

  @nn.compact
  def __call__(self, features, boxes, box_indices=None):
    flat = deform_modules.flat(self.pool(features, boxes, box_indices, None))
    pooled = self.pool(features, boxes, box_indices, self._offsets(flat))
    width, (oh, ow) = self.hidden(), self.size()
    x = nn.relu(self._dense(width, "mask_fc1")(flat))
    mask = deform_modules.as_mask(self._dense(oh * ow, "mask_fc2", True)(x), (oh, ow))
    return pooled * mask.astype(pooled.dtype)


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
