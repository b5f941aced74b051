"""Flax Linen modules (``flax.linen``) for the RoI ops; parameter-free, usable in ``nn.compact``.

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

from roipool_jax._src import layers


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


__all__ = (
  "CropAndResize",
  "MultiScaleRoIAlign",
  "PSRoIAlign",
  "PSRoIPool",
  "RoIAlign",
  "RoIAlignRotated",
  "RoIPool",
  "RoIWarp",
)
