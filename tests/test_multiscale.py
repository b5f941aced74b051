"""Tests of multi_scale_roi_align: torchvision MultiScaleRoIAlign parity, level rule, cost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax import multi_scale_roi_align, roi_align
from roipool_jax._src import multiscale
from tests import fixtures_io
from tests.quick import some

CASES = fixtures_io.load_cases("torchvision_multiscale.npz")


@pytest.mark.parametrize("impl", ["gather", "einsum"])
@pytest.mark.parametrize("name", some(sorted(CASES)))
def test_matches_torchvision_multiscale_roi_align(name, impl):
  c = CASES[name]
  levels = sorted(k for k in c if k.startswith("features"))
  features = [jnp.asarray(c[k]) for k in levels]

  def f(*maps):
    return multi_scale_roi_align(
      list(maps),
      c["boxes"],
      tuple(int(s) for s in c["output_size"]),
      image_size=tuple(int(s) for s in c["image_size"]),
      sampling_ratio=int(c["sampling_ratio"]),
      box_indices=c["box_indices"],
      impl=impl,
    )

  out, vjp = jax.vjp(f, *features)
  np.testing.assert_allclose(np.asarray(out), c["output"], rtol=1e-5, atol=1e-5)
  expected = [c[f"grad{i}"] for i in range(len(levels))]
  fixtures_io.assert_gradients_match(vjp, c["cotangent"], expected)


def test_level_rule_and_clamping():
  sides = jnp.asarray([1.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 5000.0])
  boxes = jnp.stack([jnp.zeros_like(sides), jnp.zeros_like(sides), sides, sides], axis=1)
  # k = floor(4 + log2(side / 224)) clamped to [2, 5], as an index from k_min = 2.
  expected = [0, 0, 1, 1, 2, 2, 3, 3]
  np.testing.assert_array_equal(multiscale.fpn_levels(boxes, 2, 5), expected)
  degenerate = jnp.asarray([[5.0, 5.0, 5.0, 50.0], [9.0, 9.0, 1.0, 1.0], [jnp.nan, 0, 1, 1]])
  np.testing.assert_array_equal(multiscale.fpn_levels(degenerate, 2, 5), [0, 0, 0])


def test_canonical_scale_and_level_options():
  sides = jnp.asarray([10.0, 20.0, 39.9, 40.0, 80.0, 500.0])
  boxes = jnp.stack([jnp.zeros_like(sides), jnp.zeros_like(sides), sides, sides], axis=1)
  # A float canonical scale is the same as the int; a non-integral one divides directly.
  np.testing.assert_array_equal(
    multiscale.fpn_levels(boxes, 2, 5, 224.0), multiscale.fpn_levels(boxes, 2, 5, 224)
  )
  # k = floor(3 + log2(side / 20)) clamped to [2, 5].
  np.testing.assert_array_equal(multiscale.fpn_levels(boxes, 2, 5, 20, 3), [0, 1, 1, 2, 3, 3])
  np.testing.assert_array_equal(multiscale.fpn_levels(boxes, 2, 5, 20.5, 3), [0, 0, 1, 1, 2, 3])
  maps = [jnp.ones((1, 16, 16, 2)), jnp.ones((1, 8, 8, 2))]
  out = multi_scale_roi_align(maps, boxes[:2], 2, image_size=(64, 64), canonical_scale=224.0)
  assert out.shape == (2, 2, 2, 2)


def test_each_box_equals_roi_align_on_its_level():
  rng = np.random.default_rng(0)
  pyramid = [
    jnp.asarray(rng.standard_normal((1, 32 >> i, 40 >> i, 2)), jnp.float32) for i in range(3)
  ]
  boxes = jnp.asarray([[0, 0, 20, 20], [10, 10, 100, 90], [0, 0, 127, 159]], jnp.float32)
  out = multi_scale_roi_align(pyramid, boxes, 3, image_size=(128, 160), aligned=True)
  levels = multiscale.fpn_levels(boxes, 2, 4)
  for k in range(3):
    level = int(levels[k])
    expected = roi_align(
      pyramid[level],
      boxes[k : k + 1],
      3,
      spatial_scale=0.25 / 2**level,
      sampling_ratio=2,
      aligned=True,
    )
    np.testing.assert_allclose(out[k : k + 1], expected, rtol=1e-6, atol=1e-6)


def test_inferred_scales_and_errors():
  assert multiscale.infer_levels([(200, 304), (100, 152), (50, 76)], (800, 1216)) == (
    [0.25, 0.125, 0.0625],
    2,
  )
  with pytest.raises(ValueError, match="consecutive"):
    multiscale.infer_levels([(200, 304), (50, 76)], (800, 1216))
  with pytest.raises(TypeError, match="sequence"):
    multi_scale_roi_align(jnp.ones((1, 8, 8, 1)), jnp.ones((1, 4)), 2, image_size=(32, 32))
  with pytest.raises(ValueError, match="share N and C"):
    maps = [jnp.ones((1, 8, 8, 2)), jnp.ones((1, 4, 4, 3))]
    multi_scale_roi_align(maps, jnp.ones((1, 4)), 2, image_size=(32, 32))
