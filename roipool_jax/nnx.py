"""Flax NNX modules (``flax.nnx``) for the RoI ops; parameter-free dataclass modules.

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

from flax import nnx

from roipool_jax._src import layers


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
