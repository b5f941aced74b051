"""Tests of the Flax Linen and NNX modules: same results as the functions, inside models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import roipool_jax
from roipool_jax import linen as roi_linen
from roipool_jax import nnx as roi_nnx

FEATURES = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
BOXES = jnp.asarray([[8.0, 8.0, 100.0, 120.0], [0.0, 0.0, 255.0, 255.0], [40, 60, 90, 70]])
INDICES = jnp.asarray([0, 1, 1])

# (module name, options, the function call it must equal)
CASES = [
  (
    "RoIPool",
    dict(output_size=3, spatial_scale=1 / 16),
    lambda f, b, i: roipool_jax.roi_pool(f, b, 3, spatial_scale=1 / 16, box_indices=i),
  ),
  (
    "RoIAlign",
    dict(output_size=(2, 3), spatial_scale=1 / 16, sampling_ratio=2, aligned=True),
    lambda f, b, i: roipool_jax.roi_align(
      f, b, (2, 3), spatial_scale=1 / 16, sampling_ratio=2, aligned=True, box_indices=i
    ),
  ),
  (  # defaults only: the module's defaults must be the function's
    "PSRoIPool",
    dict(output_size=(2, 3)),
    lambda f, b, i: roipool_jax.ps_roi_pool(f, b, (2, 3), box_indices=i),
  ),
  (
    "PSRoIAlign",
    dict(output_size=(2, 3)),
    lambda f, b, i: roipool_jax.ps_roi_align(f, b, (2, 3), box_indices=i),
  ),
  (
    "PSRoIPool",
    dict(output_size=(2, 3), channel_order="bin_major"),
    lambda f, b, i: roipool_jax.ps_roi_pool(f, b, (2, 3), box_indices=i, channel_order="bin_major"),
  ),
  (
    "PSRoIAlign",
    dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, channel_order="bin_major"),
    lambda f, b, i: roipool_jax.ps_roi_align(
      f, b, (2, 3), spatial_scale=0.5, sampling_ratio=2, box_indices=i, channel_order="bin_major"
    ),
  ),
  (
    "PreciseRoIPool",
    dict(output_size=(2, 3), spatial_scale=1 / 16),
    lambda f, b, i: roipool_jax.precise_roi_pool(f, b, (2, 3), spatial_scale=1 / 16, box_indices=i),
  ),
  (
    "RoIWarp",
    dict(output_size=2, spatial_scale=1 / 16),
    lambda f, b, i: roipool_jax.roi_warp(f, b, 2, spatial_scale=1 / 16, box_indices=i),
  ),
]


@pytest.mark.parametrize("name, options, expected", CASES)
def test_linen_and_nnx_modules_equal_the_functions(name, options, expected):
  # Position-sensitive modules read C_out * oh * ow channels: 2 * 2 * 3 (the map tiled 4 times;
  # with C_out > 1 the channel orders differ).
  features = jnp.tile(FEATURES, (1, 1, 1, 4)) if name.startswith("PS") else FEATURES
  want = expected(features, BOXES, INDICES)
  linen_layer = getattr(roi_linen, name)(**options)
  np.testing.assert_array_equal(linen_layer.apply({}, features, BOXES, INDICES), want)
  nnx_layer = getattr(roi_nnx, name)(**options)
  np.testing.assert_array_equal(nnx_layer(features, BOXES, INDICES), want)
  # Under jit the boxes are not padded to a bucket: another program, the same values.
  jitted = nnx.jit(lambda m, f: m(f, BOXES, INDICES))(nnx_layer, features)
  np.testing.assert_allclose(jitted, want, rtol=1e-6, atol=1e-7)


def test_linen_module_inside_a_compact_model_under_jit_and_vmap():
  class Head(nn.Module):
    @nn.compact
    def __call__(self, features, boxes, indices):
      pooled = roi_linen.RoIAlign(output_size=2, spatial_scale=1 / 16, sampling_ratio=2)(
        features, boxes, indices
      )
      return nn.Dense(4)(pooled.reshape(pooled.shape[0], -1))

  head = Head()
  params = head.init(jax.random.key(0), FEATURES, BOXES, INDICES)
  out = jax.jit(head.apply)(params, FEATURES, BOXES, INDICES)
  assert out.shape == (3, 4)
  grads = jax.grad(lambda p: jnp.sum(head.apply(p, FEATURES, BOXES, INDICES) ** 2))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # nn.vmap over images, per-image boxes.
  per_image = jnp.stack([BOXES, BOXES * 0.5])
  layer = nn.vmap(roi_linen.RoIPool, in_axes=0, out_axes=0, variable_axes={}, split_rngs={})
  mapped = layer(output_size=2, spatial_scale=1 / 16).apply({}, FEATURES[:, None], per_image)
  for n in range(2):
    expected = roipool_jax.roi_pool(FEATURES[n : n + 1], per_image[n], 2, spatial_scale=1 / 16)
    np.testing.assert_array_equal(mapped[n], expected)


def test_multi_scale_modules():
  pyramid = [FEATURES, FEATURES[:, ::2, ::2], FEATURES[:, ::4, ::4]]
  want = roipool_jax.multi_scale_roi_align(
    pyramid, BOXES, 2, image_size=(64, 64), box_indices=INDICES
  )
  linen_layer = roi_linen.MultiScaleRoIAlign(output_size=2, image_size=(64, 64))
  np.testing.assert_array_equal(linen_layer.apply({}, pyramid, BOXES, INDICES), want)
  nnx_layer = roi_nnx.MultiScaleRoIAlign(2, (64, 64))
  np.testing.assert_array_equal(nnx_layer(pyramid, BOXES, INDICES), want)


def test_linen_module_inside_nn_scan():
  class Step(nn.Module):
    @nn.compact
    def __call__(self, total, xs):
      features, boxes = xs
      pooled = roi_linen.RoIAlign(output_size=2, sampling_ratio=2)(features[None], boxes)
      return total + pooled.sum(), pooled

  scan = nn.scan(Step, variable_broadcast=False, split_rngs={}, in_axes=0, out_axes=0, length=2)
  boxes = jnp.asarray([[[1.0, 1.0, 6.0, 6.0]], [[2.0, 0.0, 9.0, 5.0]]])
  _, pooled = scan().apply({}, 0.0, (FEATURES, boxes))
  for n in range(2):
    want = roipool_jax.roi_align(FEATURES[n : n + 1], boxes[n], 2, sampling_ratio=2)
    np.testing.assert_allclose(pooled[n], want, rtol=1e-6, atol=1e-6)
