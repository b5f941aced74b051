"""Tests of roi_warp (MNC RoI warping)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax import roi_warp
from tests import reference


def _problem(seed, k=6, shape=(2, 7, 9, 3)):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal(shape).astype(np.float32)
  lo = rng.uniform(-4, 8, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.5, 9, (k, 2))], 1).astype(np.float32)
  return features, boxes, rng.integers(0, shape[0], k).astype(np.int32)


@pytest.mark.parametrize("warp_size, output_size", [(None, (2, 3)), ((6, 6), 3), ((4, 9), (2, 3))])
def test_roi_warp_is_max_pool_of_the_warp(warp_size, output_size):
  features, boxes, indices = _problem(2)
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  wh, ww = warp_size or (2 * oh, 2 * ow)
  out = roi_warp(features, boxes, output_size, warp_size=warp_size, box_indices=indices)
  expected = reference.roi_warp(features, boxes, indices, (oh, ow), (wh, ww))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_roi_warp_gradients():
  features, _, _ = _problem(4, shape=(1, 8, 8, 2))
  features = jnp.asarray(features)
  # Warp samples (4 x 4 over each box) stay off integer positions under +-eps.
  boxes = jnp.asarray([[1.3, 0.7, 6.0, 5.6], [0.2, 2.6, 4.6, 7.4]], jnp.float32)
  cot = jnp.asarray(np.random.default_rng(5).standard_normal((2, 2, 2, 2)), jnp.float32)

  @jax.jit
  def loss(f, b):
    return jnp.vdot(roi_warp(f, b, 2), cot)

  grad_f, grad_b = jax.grad(loss, argnums=(0, 1))(features, boxes)
  numeric = reference.central_differences(lambda b: loss(features, b), boxes, 1e-2)
  np.testing.assert_allclose(grad_b, numeric, rtol=1e-3, atol=1e-3)
  # Feature gradient: autodiff of the dense formulation (one sample per warp cell).

  def dense(f):
    warped = reference.dense_roi_align(f, boxes, np.zeros(2, int), (4, 4), 1.0, 1, True, "avg")
    return jnp.vdot(warped.reshape(2, 2, 2, 2, 2, 2).max(axis=(2, 4)), cot)

  np.testing.assert_allclose(grad_f, jax.grad(dense)(features), rtol=1e-5, atol=1e-5)


def test_tied_maxima_share_the_cotangent_evenly():
  # Zeros outside one corner: windows there tie (every sample exactly 0). The backward
  # rebuilds the warp and splits each window's cotangent among its tied maxima, as
  # jax.grad of the max-pooled dense warp does; an arg-max rule would not.
  rng = np.random.default_rng(8)
  features = np.zeros((1, 8, 8, 2), np.float32)
  features[0, :3, :3] = rng.uniform(1, 2, (3, 3, 2))
  boxes = jnp.asarray([[1.3, 0.7, 6.0, 5.6], [0.2, 2.6, 4.6, 7.4], [0.0, 0.0, 7.0, 7.0]])
  cot = jnp.asarray(rng.standard_normal((3, 2, 2, 2)), jnp.float32)
  grad_f = jax.grad(lambda f: jnp.vdot(roi_warp(f, boxes, 2), cot))(jnp.asarray(features))

  def dense(f):
    warped = reference.dense_roi_align(f, boxes, np.zeros(3, int), (4, 4), 1.0, 1, True, "avg")
    return jnp.vdot(warped.reshape(3, 2, 2, 2, 2, 2).max(axis=(2, 4)), cot)

  np.testing.assert_allclose(grad_f, jax.grad(dense)(jnp.asarray(features)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_has_the_same_bits_with_and_without_grad(dtype):
  # The forward's fused kernel and the warp the backward differentiates may round a sample
  # differently; the output must come from the same kernel either way.
  features, boxes, indices = _problem(7, k=96, shape=(2, 20, 30, 16))
  features = jnp.asarray(features, dtype)

  def op(f):
    return roi_warp(f, boxes * 2.5, 3, box_indices=indices)

  plain = np.asarray(jax.jit(op)(features))
  with_grad = np.asarray(jax.jit(lambda f: jax.vjp(op, f)[0])(features))
  np.testing.assert_array_equal(plain.view(np.uint8), with_grad.view(np.uint8))


def test_roi_warp_under_jit_and_vmap():
  features, boxes, _ = _problem(6, k=3, shape=(2, 6, 6, 2))
  per_map = jnp.stack([boxes, boxes + 1.0])
  out = jax.jit(jax.vmap(lambda f, b: roi_warp(f[None], b, 2)))(features, per_map)
  for n in range(2):
    np.testing.assert_allclose(out[n], roi_warp(features[n][None], per_map[n], 2), atol=1e-5)


def test_bad_warp_size_raises():
  with pytest.raises(ValueError, match="warp_size"):
    roi_warp(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 4)), 2, warp_size=5)
  with pytest.raises(ValueError, match="output_size"):
    roi_warp(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 4)), 0)
