"""Tests of multi_scale_roi_align: torchvision MultiScaleRoIAlign parity, level rule, cost."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax import multi_scale_roi_align, roi_align
from roipool_jax._src import multiscale, pyramid
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
  if impl == "gather":  # the plain forward (levels read in place where it applies): same bits
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(*features)), np.asarray(out))
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


def _spread_pyramid(dtype, boxes_per_level=(5, 0, 9, 2), channels=3):
  """A 4-level pyramid and boxes whose levels (P2..P5) have the given counts, shuffled, plus
  degenerate boxes (NaN, inverted, zero-area: level 0)."""
  rng = np.random.default_rng(7)
  maps = [
    jnp.asarray(rng.standard_normal((2, 64 >> i, 96 >> i, channels)), dtype) for i in range(4)
  ]
  sides = {0: (8, 100), 1: (115, 220), 2: (230, 440), 3: (460, 900)}
  boxes = []
  for level, count in enumerate(boxes_per_level):
    side = rng.uniform(*sides[level], size=(count, 1))
    corner = rng.uniform(-40, 300, size=(count, 2))
    boxes.append(np.concatenate([corner, corner + side], axis=1))
  degenerate = [[np.nan, 1, 2, 3], [50, 50, 10, 10], [30, 30, 30, 80]]
  boxes = np.concatenate(boxes + [np.asarray(degenerate)])[
    rng.permutation(sum(boxes_per_level) + 3)
  ]
  index = rng.integers(0, 2, len(boxes))
  return maps, jnp.asarray(boxes, jnp.float32), jnp.asarray(index, jnp.int32)


def _concatenations(jaxpr) -> list:
  """Output shapes of the concatenations of a jaxpr and of every jaxpr nested in it."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "concatenate":
      shapes.append(eqn.outvars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _concatenations(sub)
  return shapes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("chunk_elements", [None, 7 * 7 * 3 * 2])
def test_forward_by_level_has_the_bits_of_the_stacked_pyramid(dtype, chunk_elements, monkeypatch):
  # The forward reads each level in place, chunk by chunk (float32, float64, float16 on CPU),
  # plain and under grad. It must give the stacked table's bits, also with chunks of 2 boxes
  # (levels split over several chunks, the last one padded) and a level without boxes.
  if chunk_elements is not None:
    monkeypatch.setattr(pyramid, "_CHUNK_ELEMENTS", chunk_elements)
  with jax.enable_x64(dtype == jnp.float64):
    maps, boxes, index = _spread_pyramid(dtype)

    def f(*levels):
      return multi_scale_roi_align(list(levels), boxes, 7, image_size=(256, 384), box_indices=index)

    def fwd_bwd(*levels):
      out, pullback = jax.vjp(f, *levels)
      return out, pullback(jnp.ones_like(out))

    jax.clear_caches()
    plain, (out, grads) = jax.jit(f)(*maps), jax.jit(fwd_bwd)(*maps)
    plain_jaxpr = jax.make_jaxpr(f)(*maps).jaxpr
    fwd_bwd_hlo = jax.jit(fwd_bwd).lower(*maps).compile().as_text()
    with monkeypatch.context() as m:
      m.setattr(pyramid, "_reads_levels_in_place", lambda *_: False)
      jax.clear_caches()
      stacked, (_, stacked_grads) = jax.jit(f)(*maps), jax.jit(fwd_bwd)(*maps)
    jax.clear_caches()
  assert plain.dtype == dtype
  bits = lambda x: np.asarray(x, np.float64)  # noqa: E731
  np.testing.assert_array_equal(bits(plain), bits(stacked))
  np.testing.assert_array_equal(bits(out), bits(stacked))
  for g, e in zip(grads, stacked_grads, strict=True):
    np.testing.assert_array_equal(bits(g), bits(e))
  assert np.abs(bits(plain)).sum() > 0
  # Only the stacked form copies the pyramid into one table: the by-level forward does not,
  # and under grad of the maps alone XLA drops the backward's copy (only the weights read it).
  rows = sum(m.shape[0] * m.shape[1] * m.shape[2] for m in maps)
  by_level = dtype != jnp.bfloat16 and jax.default_backend() == "cpu"
  assert ((rows, maps[0].shape[3]) in _concatenations(plain_jaxpr)) != by_level
  table = f"[{rows},{maps[0].shape[3]}]" + "{1,0} concatenate("
  assert (table in fwd_bwd_hlo) != by_level


def test_forward_by_level_vmap_matches_per_example_calls():
  # Batched boxes take the stacked form (custom_vmap); unbatched boxes with batched maps too.
  maps, boxes, index = _spread_pyramid(jnp.float32)
  batch = jnp.stack([boxes, boxes[::-1] * 0.9])

  def f(levels, b):
    return multi_scale_roi_align(levels, b, 3, image_size=(256, 384), box_indices=index)

  out = jax.vmap(f, in_axes=(None, 0))(maps, batch)
  for i in range(2):
    np.testing.assert_allclose(out[i], f(maps, batch[i]), rtol=1e-5, atol=1e-5)
  maps2 = [jnp.stack([m, -m]) for m in maps]
  out = jax.vmap(f, in_axes=(0, None))(maps2, boxes)
  np.testing.assert_allclose(out[1], -f(maps, boxes), rtol=1e-5, atol=1e-5)


def test_forward_reads_levels_in_place_only_for_outputs_no_larger_than_the_pyramid():
  # The by-level form pays one gather of the output where the stacked one copies the
  # pyramid: the plain forward takes it when K * oh * ow <= the pyramid's rows (here 80).
  maps = [jnp.ones((1, 8, 8, 2)), jnp.ones((1, 4, 4, 2))]
  for k, in_place in ((1, True), (2, False)):
    boxes = jnp.tile(jnp.asarray([[0.0, 0.0, 20.0, 20.0]]), (k, 1))
    pool = lambda m, b: multi_scale_roi_align(m, b, 7, image_size=(32, 32))  # noqa: E731
    concatenations = _concatenations(jax.make_jaxpr(pool)(maps, boxes).jaxpr)
    assert ((80, 2) in concatenations) != (in_place and jax.default_backend() == "cpu")
