"""riroi_align_rotated: mmcv's published values, the NumPy reference, the orientation mix."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import roipool_jax
from tests import reference
from tests.quick import examples

# mmcv's tests/test_ops/test_riroi_align_rotated.py: an NCHW map with 8 orientation
# channels, rois (batch, cx, cy, w, h, theta in radians), num_samples 2, 2x2 output,
# its output and the input gradient for a cotangent of ones (published to 4 decimals).
MMCV_FEATURES = [
  [[1, 2], [3, 4]],
  [[1, 2], [4, 3]],
  [[4, 3], [2, 1]],
  [[1, 2], [5, 6]],
  [[3, 4], [7, 8]],
  [[9, 10], [13, 14]],
  [[11, 12], [15, 16]],
  [[1, 1], [2, 2]],
]
MMCV_ROIS = [[0.0, 0.5, 0.5, 1.0, 1.0, np.pi / 3], [0.0, 1.0, 1.0, 3.0, 3.0, np.pi / 2]]
MMCV_OUTPUT = [
  [
    [[1.8425, 1.3516], [2.3151, 1.8241]],
    [[2.4779, 1.7416], [3.2173, 2.5632]],
    [[2.7149, 2.2638], [2.6540, 2.3673]],
    [[2.9461, 2.8638], [2.8028, 2.7205]],
    [[4.1943, 2.7214], [5.6119, 4.1391]],
    [[7.5276, 6.0547], [8.9453, 7.4724]],
    [[12.1943, 10.7214], [13.6119, 12.1391]],
    [[9.5489, 8.4237], [10.5763, 9.4511]],
  ],
  [
    [[7.6562, 12.5625], [4.0000, 6.6250]],
    [[1.0000, 1.3125], [0.5000, 0.6562]],
    [[1.6562, 1.9375], [1.0000, 1.3125]],
    [[1.8438, 2.0547], [0.7500, 1.1562]],
    [[0.8438, 3.0625], [0.2500, 1.1875]],
    [[2.6562, 2.5625], [1.5000, 1.6250]],
    [[3.6562, 4.5625], [2.0000, 2.6250]],
    [[6.6562, 10.5625], [3.5000, 5.6250]],
  ],
]
MMCV_GRAD = [[[1.4727, 1.5586], [1.5586, 1.6602]]] * 8


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def test_mmcv_published_values():
  rois = np.asarray(MMCV_ROIS, np.float32)
  boxes = rois[:, 1:].copy()
  boxes[:, 4] = np.degrees(boxes[:, 4])  # mmcv's radians to degrees
  indices = rois[:, 0].astype(np.int32)

  def op(f):
    return roipool_jax.riroi_align_rotated(f, boxes, 2, sampling_ratio=2, box_indices=indices)

  out, vjp = jax.vjp(op, jnp.asarray(nhwc([MMCV_FEATURES])))
  np.testing.assert_allclose(out, nhwc(MMCV_OUTPUT), atol=1e-4)
  (grad,) = vjp(jnp.ones_like(out))
  np.testing.assert_allclose(grad, nhwc([MMCV_GRAD]), atol=1e-4)


@st.composite
def problems(draw, degenerate=True):
  n = draw(st.sampled_from([1, 2]))
  height, width = draw(st.sampled_from([(1, 1), (5, 7), (9, 6)]))
  orientations, groups = draw(st.sampled_from([(1, 2), (2, 1), (4, 2), (8, 1)]))
  scale = draw(st.sampled_from([1.0, 0.5]))
  k = draw(st.sampled_from([1, 5]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  features = rng.standard_normal((n, height, width, groups * orientations)).astype(np.float32)
  extent = np.array([width, height]) / scale
  centre = rng.uniform(-0.3, 1.3, (k, 2)) * extent
  size = rng.uniform(0.0, 1.2, (k, 2)) * extent
  angle = rng.uniform(-800, 800, (k, 1))
  boxes = np.concatenate([centre, size, angle], 1)
  if degenerate and k > 1:
    boxes[0, 2] = 0.0  # zero width: sampled as 1 cell
    boxes[1, 3] = -boxes[1, 3]  # negative height: sampled as 1 cell
    step = 360 / orientations  # an angle on an orientation: no mix
    boxes[2, 4] = draw(st.sampled_from([0.0, step, -step, 3 * step, -360.0]))
  indices = rng.integers(0, n, k).astype(np.int32)
  return features, boxes.astype(np.float32), indices, scale, orientations


@hypothesis.given(
  problems(), st.sampled_from([0, 1, 2]), st.sampled_from([(1, 1), (2, 3)]), st.booleans()
)
def test_matches_the_reference(problem, ratio, size, clockwise):
  features, boxes, indices, scale, orientations = problem
  out = roipool_jax.riroi_align_rotated(
    features,
    boxes,
    size,
    num_orientations=orientations,
    spatial_scale=scale,
    sampling_ratio=ratio,
    clockwise=clockwise,
    box_indices=indices,
  )
  expected = reference.riroi_align_rotated(
    features, boxes, indices, size, scale, ratio, orientations, clockwise
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


@hypothesis.settings(max_examples=examples(3))  # both sides of the identity compile
@hypothesis.given(problems(), st.integers(-9, 9), st.sampled_from([0, 2]))
def test_whole_orientation_steps_rotate_the_channels_of_roi_align_rotated(problem, steps, ratio):
  features, boxes, indices, scale, orientations = problem
  boxes[:, 4] = steps * 360 / orientations
  options = dict(spatial_scale=scale, sampling_ratio=ratio, box_indices=indices)
  out = roipool_jax.riroi_align_rotated(
    features, boxes, 2, num_orientations=orientations, **options
  )
  pooled = roipool_jax.roi_align_rotated(features, boxes, 2, aligned=False, **options)
  grouped = np.asarray(pooled).reshape(pooled.shape[:-1] + (-1, orientations))
  # out[..., o] = pooled[..., (o - steps) mod O]: a roll by `steps` along the orientations.
  expected = np.roll(grouped, steps, axis=-1).reshape(pooled.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_the_mix_interpolates_between_neighbouring_orientations():
  # A constant map whose orientation o holds o: every sample of orientation t reads t.
  x = jnp.broadcast_to(jnp.arange(4.0), (1, 5, 5, 4))
  angles = np.array([0.0, 22.5, 90.0, 135.0, -45.0, 405.0])
  boxes = np.array([[2.0, 2.0, 2.0, 2.0, a] for a in angles], np.float32)
  out = roipool_jax.riroi_align_rotated(x, boxes, 1, num_orientations=4)[:, 0, 0]
  # u = angle / 90: s = floor(u) mod 4, f = u - floor(u); out[o] = (1-f) t0 + f t1
  # with t0 = (o - s) mod 4 and t1 = (o - s + 1) mod 4.
  expected = [
    [0, 1, 2, 3],  # u = 0
    [0.25, 1.25, 2.25, 2.25],  # u = 1/4: s = 0, f = 1/4; o = 3 mixes 3 and 0
    [3, 0, 1, 2],  # u = 1: s = 1, f = 0
    [1.5, 0.5, 1.5, 2.5],  # u = 3/2: s = 1, f = 1/2
    [1.5, 2.5, 1.5, 0.5],  # u = -1/2: m = -1, s = 3, f = 1/2
    [0.5, 1.5, 2.5, 1.5],  # u = 9/2: a full turn more than 1/2
  ]
  np.testing.assert_allclose(out, expected, atol=1e-6)


BOXES = np.array(
  [
    [4.3, 3.7, 5.1, 3.3, 17.0],
    [5.2, 4.1, 7.3, 5.9, -63.0],
    [2.1, 6.3, 9.7, 4.4, 131.0],
    [6.6, 2.4, 3.1, 8.2, 250.0],
  ]
)
INDICES = np.array([0, 1, 1, 0], np.int32)


def _features(seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((2, 9, 10, 8)).astype(dtype)


def _op(features, boxes, indices=INDICES, **options):
  return roipool_jax.riroi_align_rotated(
    features, boxes, (2, 3), num_orientations=4, box_indices=indices, **options
  )


@pytest.mark.parametrize("ratio", [0, 2])
def test_float64_gradients_pass_check_grads(ratio):
  with jax.enable_x64(True):
    features = jnp.asarray(_features(1, np.float64))

    def op(f, b):
      return _op(f, b, sampling_ratio=ratio)

    assert op(features, BOXES).dtype == jnp.float64
    check_grads(op, (features, jnp.asarray(BOXES)), order=1, modes=("rev",), eps=1e-6)


def test_the_angle_gradient_includes_the_orientation_mix():
  with jax.enable_x64(True):
    features = jnp.asarray(_features(2, np.float64))
    cot = np.random.default_rng(3).standard_normal((4, 2, 3, 8))

    def loss(b, mixed=True):
      out = _op(features, b) if mixed else _op(features, b.at[:, 4].set(0.0))
      return jnp.vdot(out, cot)

    numeric = reference.central_differences(loss, jnp.asarray(BOXES), 1e-6)
    grad = jax.grad(loss)(jnp.asarray(BOXES))
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-8)
    # Rotating the grid alone would give a different angle gradient.
    positions_only = jax.grad(
      lambda b: jnp.vdot(
        roipool_jax.roi_align_rotated(features, b, (2, 3), aligned=False, box_indices=INDICES),
        cot,
      )
    )(jnp.asarray(BOXES))
    assert np.all(np.abs(grad[:, 4] - positions_only[:, 4]) > 1e-6)


def test_jit_vmap_and_per_image_boxes_agree():
  features = _features()
  boxes = BOXES.astype(np.float32)
  eager = _op(features, boxes)
  # An eager call pads its 4 boxes to 8 (scaffold's K bucket): another program, whose
  # rotated-grid arithmetic XLA may fuse (and round) differently, by an ulp.
  close = dict(rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.jit(_op)(features, boxes, INDICES), eager, **close)
  mapped = jax.vmap(_op, in_axes=(None, 0, None))(features, np.stack([boxes, boxes[::-1]]), INDICES)
  np.testing.assert_allclose(mapped[0], eager, **close)
  eight = np.concatenate([boxes, boxes[::-1]])
  indices = np.concatenate([INDICES, INDICES[::-1]])
  np.testing.assert_array_equal(
    jax.jit(_op)(features, eight, indices), _op(features, eight, indices)
  )
  per_image = np.stack([boxes[[0, 3]], boxes[[1, 2]]])
  out = _op(features, per_image, None)
  flat = _op(features, per_image.reshape(4, 5), np.array([0, 0, 1, 1], np.int32))
  np.testing.assert_array_equal(out.reshape(flat.shape), flat)


def test_degenerate_boxes_give_zeros_and_do_not_touch_other_boxes():
  features = _features()
  boxes = BOXES.astype(np.float32)
  bad = np.array(
    [
      [np.nan, 1, 5, 5, 0],
      [1, 1, 5, 5, np.inf],
      [4, 4, 5, 5, np.nan],
      [1e30, 1e30, 5, 5, 10],  # far outside
      [4, 4, 1e30, 1e30, 1e30],  # huge
    ],
    np.float32,
  )
  mixed = np.concatenate([boxes, bad])
  indices = np.concatenate([INDICES, np.zeros(len(bad), np.int32)])
  out = _op(features, mixed, indices)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:4], _op(features, boxes))
  np.testing.assert_array_equal(out[4:8], 0.0)

  def loss(f, b, rows):
    return jnp.sum(_op(f, b, indices)[rows] ** 2)

  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(4))
  clean = jax.grad(lambda f: jnp.sum(_op(f, boxes) ** 2))(features)
  np.testing.assert_allclose(grad_f, clean, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad_b[4:], 0.0)
  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, np.arange(4, 9))
  assert np.all(np.isfinite(grad_f)) and np.all(np.isfinite(grad_b))
  np.testing.assert_array_equal(grad_b[:8], 0.0)


def test_empty_inputs_work_forward_and_backward():
  features = _features()
  none = np.zeros((0, 5), np.float32)

  def op(f):
    return _op(f, none, np.zeros(0, np.int32))

  assert op(features).shape == (0, 2, 3, 8)
  np.testing.assert_array_equal(jax.grad(lambda f: jnp.sum(op(f)))(features), 0.0)
  out = roipool_jax.riroi_align_rotated(features[:0], np.zeros((0, 2, 5), np.float32), 2)
  assert out.shape == (0, 2, 2, 2, 8)


def test_bf16_features_keep_their_dtype():
  features = _features()
  out = _op(features.astype(jnp.bfloat16), BOXES)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _op(features, BOXES), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_gradients_follow_the_float32_ones(dtype):
  features = _features().astype(dtype)  # values exact in both dtypes
  cot = np.random.default_rng(3).standard_normal((len(BOXES), 2, 3, 8)).astype(np.float32)

  def grads(f):
    loss = lambda f, b: jnp.vdot(_op(f, b).astype(jnp.float32), cot)  # noqa: E731
    return jax.grad(loss, (0, 1))(f, BOXES)

  (f16, b16), (f32, b32) = grads(features), grads(features.astype(jnp.float32))
  assert f16.dtype == dtype and np.abs(f32).max() > 0.1 and np.abs(b32).max() > 0.1
  np.testing.assert_allclose(np.asarray(f16, np.float32), f32, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(b16, b32, rtol=5e-2, atol=5e-2)


def test_modules_apply_the_op():
  from roipool_jax import linen as roi_linen
  from roipool_jax import nnx as roi_nnx

  features = _features()
  expected = _op(features, BOXES, sampling_ratio=2)
  options = dict(output_size=(2, 3), num_orientations=4, sampling_ratio=2)
  linen = roi_linen.RiRoIAlignRotated(**options).apply({}, features, BOXES, INDICES)
  np.testing.assert_array_equal(linen, expected)
  np.testing.assert_array_equal(
    roi_nnx.RiRoIAlignRotated(**options)(features, BOXES, INDICES), expected
  )


def test_channels_must_be_whole_orientation_groups():
  with pytest.raises(ValueError, match=r"multiple of `num_orientations` = 8.*\(2, 9, 10, 6\)"):
    roipool_jax.riroi_align_rotated(_features()[..., :6], BOXES, 2, box_indices=INDICES)
