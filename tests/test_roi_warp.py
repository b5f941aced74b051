"""Tests of crop_and_resize and roi_warp (MNC RoI warping)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax import crop_and_resize, roi_align, roi_warp
from tests import reference

F32 = np.float32


def _reference_crop(features, boxes, indices, crop, scale):
  """Bilinear samples at the centres of a ch x cw grid over each box (aligned)."""
  ch, cw = crop
  out = np.zeros((len(boxes), ch, cw, features.shape[3]), np.float32)
  for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float32)):
    x0, y0 = x1 * F32(scale) - F32(0.5), y1 * F32(scale) - F32(0.5)
    bin_w = (x2 * F32(scale) - F32(0.5) - x0) / F32(cw)
    bin_h = (y2 * F32(scale) - F32(0.5) - y0) / F32(ch)
    for i in range(ch):
      for j in range(cw):
        y = y0 + F32(i) * bin_h + F32(0.5) * bin_h
        x = x0 + F32(j) * bin_w + F32(0.5) * bin_w
        out[k, i, j] = reference.bilinear(features[indices[k]], y, x)
  return out


def _problem(seed, k=6, shape=(2, 7, 9, 3)):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal(shape).astype(np.float32)
  lo = rng.uniform(-4, 8, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.5, 9, (k, 2))], 1).astype(np.float32)
  return features, boxes, rng.integers(0, shape[0], k).astype(np.int32)


@pytest.mark.parametrize("crop", [(1, 1), (3, 5), (6, 6)])
def test_crop_and_resize_samples_cell_centres(crop):
  features, boxes, indices = _problem(0)
  out = crop_and_resize(features, boxes * 2, crop, spatial_scale=0.5, box_indices=indices)
  expected = _reference_crop(features, boxes * 2, indices, crop, 0.5)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def _tf_crop_and_resize(image, box, crop):
  """tf.image.crop_and_resize's formula for one normalized box (y1, x1, y2, x2)."""
  height, width = image.shape[:2]
  y1, x1, y2, x2 = box
  ch, cw = crop
  out = np.zeros((ch, cw, image.shape[2]))
  for i in range(ch):
    y = y1 * (height - 1) + i * (y2 - y1) * (height - 1) / (ch - 1)
    for j in range(cw):
      x = x1 * (width - 1) + j * (x2 - x1) * (width - 1) / (cw - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
      dy, dx = y - y0, x - x0
      top = image[y0, x0] * (1 - dx) + image[y0, x1_] * dx
      bottom = image[y1_, x0] * (1 - dx) + image[y1_, x1_] * dx
      out[i, j] = top * (1 - dy) + bottom * dy
  return out


def test_documented_conversion_reproduces_tf_crop_and_resize_inside_the_map():
  rng = np.random.default_rng(1)
  features = rng.standard_normal((1, 10, 12, 2)).astype(np.float32)
  crop = (4, 5)
  normalized = [(0.1, 0.2, 0.8, 0.7), (0.0, 0.0, 1.0, 1.0), (0.35, 0.05, 0.55, 0.95)]
  for y1, x1, y2, x2 in normalized:
    # Sample points a + j * d per axis, then the pixel box the docstring gives.
    ay, dy = y1 * 9, (y2 - y1) * 9 / (crop[0] - 1)
    ax, dx = x1 * 11, (x2 - x1) * 11 / (crop[1] - 1)
    px1, py1 = ax + 0.5 - dx / 2, ay + 0.5 - dy / 2
    box = np.array([[px1, py1, px1 + crop[1] * dx, py1 + crop[0] * dy]], np.float32)
    ours = crop_and_resize(features, box, crop)[0]
    expected = _tf_crop_and_resize(features[0], (y1, x1, y2, x2), crop)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("warp_size, output_size", [(None, (2, 3)), ((6, 6), 3), ((4, 9), (2, 3))])
def test_roi_warp_is_max_pool_of_the_warp(warp_size, output_size):
  features, boxes, indices = _problem(2)
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  wh, ww = warp_size or (2 * oh, 2 * ow)
  out = roi_warp(features, boxes, output_size, warp_size=warp_size, box_indices=indices)
  crop = _reference_crop(features, boxes, indices, (wh, ww), 1.0)
  expected = crop.reshape(len(boxes), oh, wh // oh, ow, ww // ow, -1).max(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_crop_and_resize_is_roi_align_with_one_sample():
  features, boxes, indices = _problem(3)
  for aligned in (False, True):
    a = crop_and_resize(features, boxes, 4, aligned=aligned, box_indices=indices)
    b = roi_align(features, boxes, 4, sampling_ratio=1, aligned=aligned, box_indices=indices)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
  eps = 1e-2
  for i in np.ndindex(*boxes.shape):
    step = jnp.zeros(boxes.shape).at[i].set(eps)
    numeric = (loss(features, boxes + step) - loss(features, boxes - step)) / (2 * eps)
    np.testing.assert_allclose(grad_b[i], numeric, rtol=1e-3, atol=1e-3)
  # Feature gradient: autodiff of the dense formulation (one sample per warp cell).

  def dense(f):
    warped = reference.dense_roi_align(f, boxes, np.zeros(2, int), (4, 4), 1.0, 1, True, "avg")
    return jnp.vdot(warped.reshape(2, 2, 2, 2, 2, 2).max(axis=(2, 4)), cot)

  np.testing.assert_allclose(grad_f, jax.grad(dense)(features), rtol=1e-5, atol=1e-5)


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
