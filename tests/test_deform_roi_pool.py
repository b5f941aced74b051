"""Tests of roipool_jax.deform_roi_pool: equality with roi_align at zero offsets, the NumPy
reference of mmcv's kernel, exact gradients for features, boxes and offsets."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st
from jax.test_util import check_grads

import roipool_jax
from roipool_jax import deform_roi_pool
from tests import reference
from tests.quick import some


@st.composite
def problems(draw, degenerate=True):
  n = draw(st.sampled_from([1, 2]))
  height, width = draw(st.sampled_from([(1, 1), (5, 7), (9, 6)]))
  scale = draw(st.sampled_from([1.0, 0.5]))
  size = draw(st.sampled_from([(1, 1), (2, 3)]))
  k = draw(st.sampled_from([1, 6]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  features = rng.standard_normal((n, height, width, 2)).astype(np.float32)
  extent = np.array([width, height]) / scale
  lo = rng.uniform(-0.3, 1.1, (k, 2)) * extent
  boxes = np.concatenate([lo, lo + rng.uniform(0.0, 1.0, (k, 2)) * extent], 1)
  offsets = rng.uniform(-3, 3, (k, *size, 2))
  if degenerate and k > 1:
    boxes[0, 2] = boxes[0, 0]  # zero width
    boxes[1, [1, 3]] = boxes[1, [3, 1]]  # inverted
  indices = rng.integers(0, n, k).astype(np.int32)
  return features, boxes.astype(np.float32), offsets.astype(np.float32), indices, scale, size


@hypothesis.settings(max_examples=min(8, hypothesis.settings().max_examples))
@hypothesis.given(problems(degenerate=False), st.sampled_from([0, -1, 1, 2]))
def test_zero_offsets_are_roi_align_aligned(problem, ratio):
  features, boxes, _, indices, scale, size = problem
  out = deform_roi_pool(
    features, boxes, None, size, spatial_scale=scale, sampling_ratio=ratio, box_indices=indices
  )
  zeros = np.zeros(boxes.shape[:1] + size + (2,), np.float32)
  np.testing.assert_array_equal(
    deform_roi_pool(
      features, boxes, zeros, size, spatial_scale=scale, sampling_ratio=ratio, box_indices=indices
    ),
    out,
  )
  want = roipool_jax.roi_align(
    features,
    boxes,
    size,
    spatial_scale=scale,
    sampling_ratio=ratio if ratio > 0 else -1,
    aligned=True,
    box_indices=indices,
  )
  np.testing.assert_array_equal(out, want)


@hypothesis.settings(max_examples=min(8, hypothesis.settings().max_examples))
@hypothesis.given(problems(), st.sampled_from([0, 2]), st.sampled_from([0.1, 0.5]))
def test_matches_the_reference(problem, ratio, gamma):
  features, boxes, offsets, indices, scale, size = problem
  out = deform_roi_pool(
    features,
    boxes,
    offsets,
    size,
    spatial_scale=scale,
    sampling_ratio=ratio,
    gamma=gamma,
    box_indices=indices,
  )
  expected = reference.deform_roi_pool(features, boxes, indices, offsets, size, scale, ratio, gamma)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


def test_an_offset_of_one_bin_moves_the_bin():
  features = np.random.default_rng(0).standard_normal((1, 12, 12, 2)).astype(np.float32)
  boxes = np.array([[2.5, 2.5, 8.5, 8.5]], np.float32)  # 3x3 bins of 2 cells
  # gamma * roi_w * dx = 2 cells = one bin to the right: bin (i, j) becomes bin (i, j + 1).
  right = np.zeros((1, 3, 3, 2), np.float32)
  right[..., 0] = 2.0 / (0.1 * 6.0)
  moved = deform_roi_pool(features, boxes, right, 3, sampling_ratio=2)
  plain = roipool_jax.roi_align(features, boxes, 3, sampling_ratio=2, aligned=True)
  np.testing.assert_allclose(moved[:, :, :2], plain[:, :, 1:], rtol=1e-5, atol=1e-6)


def _problem64():
  rng = np.random.default_rng(7)
  features = rng.standard_normal((2, 8, 9, 3))
  boxes = np.array([[0.3, 1.2, 6.6, 5.9], [2.1, -0.7, 9.4, 4.2], [1.5, 1.5, 3.25, 7.75]])
  offsets = rng.uniform(-1, 1, (3, 2, 3, 2))
  return features, boxes, offsets, np.array([0, 1, 0], np.int32)


@pytest.mark.parametrize("ratio", some([0, 2], 1, start=1))
def test_float64_gradients_pass_check_grads(ratio):
  features, boxes, offsets, indices = _problem64()
  with jax.enable_x64(True):

    def op(f, b, o):
      return deform_roi_pool(f, b, o, (2, 3), sampling_ratio=ratio, gamma=0.3, box_indices=indices)

    args = tuple(map(jnp.asarray, (features, boxes, offsets)))
    assert op(*args).dtype == jnp.float64
    check_grads(op, args, order=1, modes=("rev",))
    check_grads(op, args, order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("ratio", some([0, 2], 1))
def test_offset_and_box_gradients_match_central_differences_of_the_reference(ratio):
  features, boxes, offsets, indices = _problem64()
  cot = np.random.default_rng(3).standard_normal((3, 2, 3, 3))

  def reference_loss(b, o):
    out = reference.deform_roi_pool(
      features, np.asarray(b), indices, np.asarray(o), (2, 3), 0.5, ratio, 0.3
    )
    return np.vdot(out, cot)

  with jax.enable_x64(True):
    b, o = jnp.asarray(boxes), jnp.asarray(offsets)
    numeric_b = reference.central_differences(lambda b: reference_loss(b, o), b, 1e-6)
    numeric_o = reference.central_differences(lambda o: reference_loss(b, o), o, 1e-6)

    def loss(b, o):
      out = deform_roi_pool(
        features,
        b,
        o,
        (2, 3),
        spatial_scale=0.5,
        sampling_ratio=ratio,
        gamma=0.3,
        box_indices=indices,
      )
      return jnp.vdot(out, cot)

    grad_b, grad_o = jax.grad(loss, (0, 1))(b, o)
  assert np.count_nonzero(grad_o) > 0.9 * grad_o.size  # offsets move the samples
  np.testing.assert_allclose(grad_b, numeric_b, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grad_o, numeric_o, rtol=1e-6, atol=1e-8)


def test_degenerate_boxes_and_offsets_are_finite_and_do_not_touch_other_boxes():
  features, boxes, offsets, indices = _problem64()
  features, boxes, offsets = (x.astype(np.float32) for x in (features, boxes, offsets))
  bad = np.array(
    [
      [np.nan, 1, 5, 5],
      [1, 1, 5, 5],  # with a NaN offset
      [5, 5, 1, 1],  # inverted
      [3, 3, 3, 6],  # zero width
      [1e30, 1e30, 2e30, 2e30],  # far outside
      [1, 1, 5, 5],  # with a huge offset
      [-1e30, -1e30, 1e30, 1e30],  # huge, with a huge offset
    ],
    np.float32,
  )
  bad_offsets = np.zeros((7, 2, 3, 2), np.float32)
  bad_offsets[1, 0, 1, 0] = np.nan
  bad_offsets[5:] = 1e30
  mixed = np.concatenate([boxes, bad])
  mixed_offsets = np.concatenate([offsets, bad_offsets])
  mixed_indices = np.concatenate([indices, np.zeros(len(bad), np.int32)])

  def op(f, b, o):
    return deform_roi_pool(f, b, o, (2, 3), box_indices=mixed_indices)

  out = op(features, mixed, mixed_offsets)
  assert np.all(np.isfinite(out))
  alone = deform_roi_pool(features, boxes, offsets, (2, 3), box_indices=indices)
  np.testing.assert_array_equal(out[:3], alone)
  np.testing.assert_array_equal(out[3:10], 0.0)

  def loss(f, b, o, rows):
    return jnp.sum(op(f, b, o)[rows] ** 2)

  grads = jax.grad(loss, (0, 1, 2))(features, mixed, mixed_offsets, np.arange(3))
  clean = jax.grad(
    lambda f: jnp.sum(deform_roi_pool(f, boxes, offsets, (2, 3), box_indices=indices) ** 2)
  )(features)
  np.testing.assert_allclose(grads[0], clean, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grads[1][3:], 0.0)
  np.testing.assert_array_equal(grads[2][3:], 0.0)
  grads = jax.grad(loss, (0, 1, 2))(features, mixed, mixed_offsets, np.arange(3, 10))
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[1][:10], 0.0)


def test_jit_vmap_and_per_image_boxes_agree():
  features, boxes, offsets, indices = _problem64()
  features, boxes, offsets = (x.astype(np.float32) for x in (features, boxes, offsets))

  def op(f, b, o, i):
    return deform_roi_pool(f, b, o, (2, 3), box_indices=i)

  eager = op(features, boxes, offsets, indices)
  np.testing.assert_array_equal(jax.jit(op)(features, boxes, offsets, indices), eager)
  mapped = jax.vmap(op, in_axes=(None, None, 0, None))(
    features, boxes, np.stack([offsets, -offsets]), indices
  )
  np.testing.assert_array_equal(mapped[0], eager)
  per_image = np.stack([boxes[[0, 2]], boxes[[1, 1]]])
  per_offsets = np.stack([offsets[[0, 2]], offsets[[1, 1]]])
  out = op(features, per_image, per_offsets, None)
  flat = op(
    features, per_image.reshape(4, 4), per_offsets.reshape(4, 2, 3, 2), np.array([0, 0, 1, 1])
  )
  np.testing.assert_array_equal(out.reshape(flat.shape), flat)


def test_empty_inputs_work_forward_and_backward():
  features = _problem64()[0].astype(np.float32)
  none, no_offsets = np.zeros((0, 4), np.float32), np.zeros((0, 2, 2, 2), np.float32)

  def op(f, o):
    return deform_roi_pool(f, none, o, 2, box_indices=np.zeros(0, np.int32))

  assert op(features, no_offsets).shape == (0, 2, 2, 3)
  grads = jax.grad(lambda f, o: jnp.sum(op(f, o)), (0, 1))(features, no_offsets)
  np.testing.assert_array_equal(grads[0], 0.0)
  assert grads[1].shape == no_offsets.shape
  out = deform_roi_pool(features[:0], np.zeros((0, 2, 4), np.float32), None, 2)
  assert out.shape == (0, 2, 2, 2, 3)


def test_feature_gradient_is_bitwise_reproducible():
  features, boxes, offsets, indices = _problem64()
  boxes, offsets = np.concatenate([boxes] * 8), np.concatenate([offsets] * 8)
  indices = np.concatenate([indices] * 8)
  grad = jax.jit(
    jax.grad(
      lambda f: jnp.sum(deform_roi_pool(f, boxes, offsets, (2, 3), box_indices=indices) ** 2)
    )
  )
  features = features.astype(np.float32)
  np.testing.assert_array_equal(grad(features), grad(features))


@pytest.mark.parametrize(
  "offsets, error, match",
  [
    (np.zeros((3, 2, 2, 2), np.float32), ValueError, r"offsets.*\(3, 2, 3, 2\)"),
    (np.zeros((3, 2, 3), np.float32), ValueError, "offsets"),
    (np.zeros((3, 2, 3, 2), np.int32), TypeError, "offsets.*floating"),
    ("zeros", TypeError, "offsets"),
  ],
)
def test_bad_offsets_raise_clear_errors(offsets, error, match):
  features, boxes, _, indices = _problem64()
  with pytest.raises(error, match=match):
    deform_roi_pool(features, boxes, offsets, (2, 3), box_indices=indices)
