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
  """:func:`roipool_jax.roi_pool` as a Linen module (fields: its options)."""


class RoIAlign(layers.RoIAlignConfig, nn.Module):
  """:func:`roipool_jax.roi_align` as a Linen module (fields: its options)."""


class CropAndResize(layers.CropAndResizeConfig, nn.Module):
  """:func:`roipool_jax.crop_and_resize` as a Linen module (fields: its options)."""


class RoIWarp(layers.RoIWarpConfig, nn.Module):
  """:func:`roipool_jax.roi_warp` as a Linen module (fields: its options)."""


class MultiScaleRoIAlign(layers.MultiScaleRoIAlignConfig, nn.Module):
  """:func:`roipool_jax.multi_scale_roi_align` as a Linen module; ``features`` is the list
  of pyramid levels, finest first."""


__all__ = ("CropAndResize", "MultiScaleRoIAlign", "RoIAlign", "RoIPool", "RoIWarp")
