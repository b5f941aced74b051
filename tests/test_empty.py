"""Empty inputs: K = 0 boxes, N = 0 images and C = 0 channels, for every op, impl and mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import roipool_jax
from tests.quick import some


def _pyramid(f):
  return [f, f[:, ::2, ::2]]


OPS = {
  "roi_pool": lambda f, b, i: roipool_jax.roi_pool(f, b, (2, 3), box_indices=i),
  "roi_pool floor": lambda f, b, i: roipool_jax.roi_pool(
    f, b, (2, 3), box_indices=i, quantization="floor"
  ),
  "crop_and_resize tf nearest": lambda f, b, i: roipool_jax.crop_and_resize(
    f, b, (2, 3), box_indices=i, box_format="tf", method="nearest", extrapolation_value=1.0
  ),
}
for impl in ("gather", "einsum"):
  for ratio in (-1, 2):
    OPS[f"roi_align {impl} ratio {ratio}"] = lambda f, b, i, impl=impl, ratio=ratio: (
      roipool_jax.roi_align(f, b, (2, 3), sampling_ratio=ratio, box_indices=i, impl=impl)
    )
  OPS[f"crop_and_resize {impl}"] = lambda f, b, i, impl=impl: roipool_jax.crop_and_resize(
    f, b, (2, 3), box_indices=i, impl=impl
  )
  OPS[f"precise_roi_pool {impl}"] = lambda f, b, i, impl=impl: roipool_jax.precise_roi_pool(
    f, b, (2, 3), box_indices=i, impl=impl
  )
  OPS[f"roi_warp {impl}"] = lambda f, b, i, impl=impl: roipool_jax.roi_warp(
    f, b, (2, 3), box_indices=i, impl=impl
  )
  OPS[f"multi_scale_roi_align {impl}"] = lambda f, b, i, impl=impl: (
    roipool_jax.multi_scale_roi_align(
      _pyramid(f), b, (2, 3), image_size=(8, 8), box_indices=i, impl=impl
    )
  )
for ratio in (-1, 2):
  OPS[f"roi_align max ratio {ratio}"] = lambda f, b, i, ratio=ratio: roipool_jax.roi_align(
    f, b, (2, 3), sampling_ratio=ratio, box_indices=i, mode="max"
  )

for ratio in (0, 2):
  OPS[f"deform_roi_pool ratio {ratio}"] = lambda f, b, i, ratio=ratio: roipool_jax.deform_roi_pool(
    f, b, jnp.ones(b.shape[:-1] + (2, 3, 2)), (2, 3), sampling_ratio=ratio, box_indices=i
  )

CASES = {
  # name: (features shape, boxes shape, box_indices or None)
  "no boxes": ((2, 8, 8, 3), (0, 4), np.zeros(0, np.int32)),
  "no boxes per image": ((2, 8, 8, 3), (2, 0, 4), None),
  "no images": ((0, 8, 8, 3), (0, 5, 4), None),
  "no images, flat": ((0, 8, 8, 3), (0, 4), None),
  "no channels": ((2, 8, 8, 0), (3, 4), np.array([0, 1, 1], np.int32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("op", some(sorted(OPS), 2))
def test_empty_inputs_forward_and_backward(op, case):
  features_shape, boxes_shape, indices = CASES[case]
  features = jnp.ones(features_shape)
  boxes = jnp.broadcast_to(jnp.asarray([1.0, 1.0, 5.0, 6.0]), boxes_shape)
  out = OPS[op](features, boxes, indices)
  assert out.shape == boxes_shape[:-1] + (2, 3) + features_shape[3:]
  assert out.dtype == features.dtype and np.all(np.asarray(out) == 0)

  def loss(f, b):
    return jnp.sum(OPS[op](f, b, indices) ** 2)

  for grad_fn in (jax.grad(loss, (0, 1)), jax.jit(jax.grad(loss, (0, 1)))):
    grad_f, grad_b = grad_fn(features, boxes)
    assert grad_f.shape == features.shape and grad_b.shape == boxes.shape
    assert np.all(np.asarray(grad_f) == 0) and np.all(np.asarray(grad_b) == 0)
