"""ps_roi_pool and ps_roi_align: torchvision fixtures, NumPy reference, properties, gradients."""

import functools
import math
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import roipool_jax
from roipool_jax import torchvision as tv
from roipool_jax._src import position_sensitive
from tests import fixtures_io, reference
from tests.quick import examples, some

CASES = fixtures_io.load_cases("torchvision_position_sensitive.npz")
POOL = sorted(name for name in CASES if name.startswith("pool"))
ALIGN = sorted(name for name in CASES if name.startswith("align"))


def size_of(c):
  return tuple(int(s) for s in np.broadcast_to(c["output_size"], (2,)))


def call(c, impl=None):
  """The op of fixture case ``c`` as a function of the features (NHWC API)."""
  size, scale, indices = size_of(c), float(c["spatial_scale"]), c["box_indices"]
  if "sampling_ratio" in c:
    options = dict(sampling_ratio=int(c["sampling_ratio"]))
    if impl:
      options["impl"] = impl
    return lambda x: roipool_jax.ps_roi_align(
      x, c["boxes"], size, spatial_scale=scale, box_indices=indices, **options
    )
  return lambda x: roipool_jax.ps_roi_pool(
    x, c["boxes"], size, spatial_scale=scale, box_indices=indices
  )


@pytest.mark.parametrize("name", POOL)
def test_ps_roi_pool_matches_torchvision(name):
  c = CASES[name]
  out, vjp = jax.vjp(call(c), jnp.asarray(c["features"]))
  # Bit for bit: the same edges, additions in the same order, and a true division.
  np.testing.assert_array_equal(np.asarray(out), c["output"])
  (grad,) = vjp(jnp.asarray(c["cotangent"]))
  if "inside" in name:  # torchvision's backward agrees with its forward here
    fixtures_io.assert_gradients_match(vjp, c["cotangent"], [c["grad"]], tol=1e-6)
  # Everywhere: the exact gradient of the forward.
  expected = reference.ps_roi_pool_grad(
    c["features"].shape,
    c["boxes"],
    c["box_indices"],
    size_of(c),
    float(c["spatial_scale"]),
    c["cotangent"],
  )
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_ps_roi_pool_gradient_differs_from_torchvision_only_where_it_clips_to_h_minus_1():
  """torchvision's backward clips bins to H (its forward to H - 1): the documented difference."""
  c = CASES["pool_edges_7x7"]
  _, vjp = jax.vjp(call(c), jnp.asarray(c["features"]))
  (grad,) = vjp(jnp.asarray(c["cotangent"]))
  assert np.all(np.asarray(grad)[:, -1, :] == 0) and np.all(np.asarray(grad)[:, :, -1] == 0)
  assert np.any(c["grad"][:, -1, :] != 0)  # torchvision sends gradient to cells it never read


@pytest.mark.parametrize("impl", ["gather", "einsum"])
@pytest.mark.parametrize("name", some(ALIGN, 2))
def test_ps_roi_align_matches_torchvision(name, impl):
  c = CASES[name]
  out, vjp = jax.vjp(call(c, impl), jnp.asarray(c["features"]))
  np.testing.assert_allclose(out, c["output"], rtol=1e-5, atol=1e-5)
  fixtures_io.assert_gradients_match(vjp, c["cotangent"], [c["grad"]])


def nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("name", ["pool_inside", "align_ratio2"])
def test_torchvision_layer_and_modules(name):
  c = CASES[name]
  rois = np.concatenate([c["box_indices"][:, None].astype(np.float32), c["boxes"]], 1)
  size, scale = size_of(c), float(c["spatial_scale"])
  if name.startswith("pool"):
    fn, module = tv.ps_roi_pool(nchw(c["features"]), rois, size, scale), tv.PSRoIPool(size, scale)
  else:
    ratio = int(c["sampling_ratio"])
    fn = tv.ps_roi_align(nchw(c["features"]), rois, size, scale, ratio)
    module = tv.PSRoIAlign(size, scale, ratio)
  np.testing.assert_allclose(fn, nchw(c["output"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(module(nchw(c["features"]), rois), fn)


@st.composite
def problems(draw):
  """A small map with C_out * oh * ow channels and boxes of every kind (degenerate included)."""
  n = draw(st.sampled_from([1, 2]))
  height, width = draw(st.sampled_from([(1, 1), (5, 7), (9, 6)]))
  oh, ow = draw(st.sampled_from([(1, 1), (2, 3), (3, 3)]))
  c_out = draw(st.sampled_from([1, 2]))
  k = draw(st.sampled_from([1, 5]))
  scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((n, height, width, c_out * oh * ow)).astype(np.float32)
  lo = rng.uniform(-8, 2 * max(height, width) / scale, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(-3, 3 * max(height, width) / scale, (k, 2))], 1)
  if draw(st.booleans()):  # exact halves and integers, and a zero-size box
    boxes = np.round(boxes * 2) / 2
    boxes[0, 2:] = boxes[0, :2]
  indices = rng.integers(0, n, k).astype(np.int32)
  return features, boxes.astype(np.float32), indices, (oh, ow), scale


ORDERS = st.sampled_from(["channel_major", "bin_major"])


@hypothesis.given(problems(), ORDERS)
def test_ps_roi_pool_and_its_gradient_match_the_reference(problem, order):
  features, boxes, indices, size, scale = problem
  options = dict(spatial_scale=scale, box_indices=indices, channel_order=order)
  out, vjp = jax.vjp(lambda f: roipool_jax.ps_roi_pool(f, boxes, size, **options), features)
  expected = reference.ps_roi_pool(features, boxes, indices, size, scale, order)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  cotangent = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
  expected_grad = reference.ps_roi_pool_grad(
    features.shape, boxes, indices, size, scale, cotangent, order
  )
  np.testing.assert_allclose(vjp(cotangent)[0], expected_grad, rtol=1e-5, atol=1e-6)


@hypothesis.given(
  problems(), st.sampled_from([-1, 1, 2]), st.sampled_from(["gather", "einsum"]), ORDERS
)
def test_ps_roi_align_matches_the_reference(problem, ratio, impl, order):
  features, boxes, indices, size, scale = problem
  out = roipool_jax.ps_roi_align(
    features,
    boxes,
    size,
    spatial_scale=scale,
    sampling_ratio=ratio,
    box_indices=indices,
    impl=impl,
    channel_order=order,
  )
  expected = reference.ps_roi_align(features, boxes, indices, size, scale, ratio, order)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=examples(3))  # both sides of the identity compile
@hypothesis.given(problems(), st.sampled_from([-1, 2]))
def test_ps_roi_align_of_a_repeated_map_is_roi_align(problem, ratio):
  """When every bin's channel group holds the same map, position sensitivity is invisible:
  ps_roi_align is roi_align with aligned=True."""
  features, boxes, indices, (oh, ow), scale = problem
  base = features[..., : features.shape[3] // (oh * ow)]
  repeated = np.repeat(base, oh * ow, axis=3)  # channel c * P + p holds base channel c
  options = dict(spatial_scale=scale, sampling_ratio=ratio, box_indices=indices)
  out = roipool_jax.ps_roi_align(repeated, boxes, (oh, ow), **options)
  expected = roipool_jax.roi_align(base, boxes, (oh, ow), aligned=True, **options)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def _inputs(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((2, 8, 9, 2 * 6)).astype(dtype)
  boxes = np.array(
    [[1.3, 0.7, 6.3, 5.7], [2.7, 1.3, 4.9, 6.45], [-1.2, 2.2, 7.9, 8.4], [0.45, 0.6, 8.6, 7.4]],
    dtype,
  )
  return features, boxes, np.array([0, 1, 1, 0], np.int32)


OPS = {
  "ps_roi_pool": lambda f, b, i: roipool_jax.ps_roi_pool(f, b, (2, 3), box_indices=i),
  "ps_roi_align gather": lambda f, b, i: roipool_jax.ps_roi_align(
    f, b, (2, 3), box_indices=i, impl="gather"
  ),
  "ps_roi_align einsum": lambda f, b, i: roipool_jax.ps_roi_align(
    f, b, (2, 3), box_indices=i, impl="einsum"
  ),
  "ps_roi_align ratio 2": lambda f, b, i: roipool_jax.ps_roi_align(
    f, b, (2, 3), sampling_ratio=2, box_indices=i
  ),
  "ps_roi_pool bin-major": lambda f, b, i: roipool_jax.ps_roi_pool(
    f, b, (2, 3), box_indices=i, channel_order="bin_major"
  ),
  "ps_roi_align gather bin-major": lambda f, b, i: roipool_jax.ps_roi_align(
    f, b, (2, 3), box_indices=i, impl="gather", channel_order="bin_major"
  ),
  "ps_roi_align einsum bin-major": lambda f, b, i: roipool_jax.ps_roi_align(
    f, b, (2, 3), box_indices=i, impl="einsum", channel_order="bin_major"
  ),
}


def bin_major(features, output_size):
  """A channel-major map (channel ``c * P + p``) with its channels reordered bin-major
  (channel ``p * C_out + c``): the same score maps, laid out the other way."""
  *lead, channels = features.shape
  bins = output_size[0] * output_size[1]
  grouped = features.reshape(*lead, channels // bins, bins)
  return np.swapaxes(grouped, -1, -2).reshape(features.shape)


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align gather", "ps_roi_align einsum"])
def test_bin_major_map_gives_the_channel_major_results(op):
  """The same score maps in either channel order: the same outputs, and the same gradients
  in the map's own order; bit for bit for the gather kernels (the same sums in the same
  order)."""
  features, boxes, indices = _inputs(5)
  reordered = bin_major(features, (2, 3))
  assert not np.array_equal(reordered, features)
  fn, fn_bin = OPS[op], OPS[op + " bin-major"]
  loss = lambda fn: lambda f: jnp.sum(jnp.sin(fn(f, boxes, indices)))  # noqa: E731
  same = (
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    if "einsum" in op
    else np.testing.assert_array_equal
  )
  same(fn_bin(reordered, boxes, indices), fn(features, boxes, indices))
  same(
    jax.grad(loss(fn_bin))(reordered), bin_major(np.asarray(jax.grad(loss(fn))(features)), (2, 3))
  )


@pytest.mark.parametrize("op", sorted(OPS))
def test_jit_vmap_and_per_image_boxes_agree(op):
  features, boxes, indices = _inputs()
  fn = OPS[op]
  eager = fn(features, boxes, indices)
  np.testing.assert_array_equal(jax.jit(fn)(features, boxes, indices), eager)
  # vmap over two box sets.
  stacked = np.stack([boxes, boxes[::-1]])
  mapped = jax.vmap(fn, in_axes=(None, 0, None))(features, stacked, indices)
  np.testing.assert_array_equal(mapped[0], eager)
  np.testing.assert_allclose(mapped[1], fn(features, boxes[::-1], indices), rtol=1e-6)
  # vmap over two maps, the boxes shared: the outputs and gradients of the calls one by one,
  # bit for bit for the gather kernels (true divisions stay true divisions when only the map
  # is batched); batched matmuls may sum in another order.
  maps = np.stack([features, features[..., ::-1] * 3.0 - 1.0])
  mapped = jax.vmap(fn, in_axes=(0, None, None))(maps, boxes, indices)
  loss = lambda f: jnp.sum(jnp.sin(fn(f, boxes, indices)))  # noqa: E731
  grads = jax.vmap(jax.grad(loss))(maps)
  same = (
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    if "einsum" in op
    else np.testing.assert_array_equal
  )
  for j in range(2):
    same(mapped[j], fn(maps[j], boxes, indices))
    same(grads[j], jax.grad(loss)(maps[j]))
  # Per-image [N, R, 4] boxes: box r of image n.
  per_image = np.stack([boxes[:2], boxes[2:]])
  out = fn(features, per_image, None)
  flat = fn(features, per_image.reshape(4, 4), np.array([0, 0, 1, 1], np.int32))
  assert out.shape == (2, 2) + flat.shape[1:]
  np.testing.assert_array_equal(out.reshape(flat.shape), flat)


@pytest.mark.parametrize("op", sorted(OPS))
def test_float64_gradients_pass_check_grads(op):
  with jax.enable_x64(True):
    features, boxes, indices = _inputs(1, np.float64)
    fn = OPS[op]
    out = fn(features, boxes, indices)
    assert out.dtype == jnp.float64
    f = lambda x, b: fn(x, b, indices)  # noqa: E731
    check_grads(f, (jnp.asarray(features), jnp.asarray(boxes)), order=1, modes=("rev",))
    check_grads(f, (jnp.asarray(features), jnp.asarray(boxes)), order=1, modes=("rev",), eps=1e-6)


def test_ps_roi_align_box_gradients_match_central_differences():
  with jax.enable_x64(True):
    features, boxes, indices = _inputs(2, np.float64)
    cot = np.random.default_rng(3).standard_normal((4, 2, 3, 2))

    def loss(b):
      return jnp.vdot(roipool_jax.ps_roi_align(features, b, (2, 3), box_indices=indices), cot)

    numeric = reference.central_differences(loss, jnp.asarray(boxes), 1e-6)
    np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(boxes)), numeric, rtol=1e-7, atol=1e-8)


def test_ps_roi_pool_has_no_box_gradient():
  features, boxes, indices = _inputs()
  grad = jax.grad(lambda b: jnp.sum(OPS["ps_roi_pool"](features, b, indices)))(boxes)
  np.testing.assert_array_equal(grad, np.zeros_like(boxes))


@pytest.mark.parametrize("op", sorted(OPS))
def test_degenerate_boxes_give_zeros_and_do_not_touch_other_boxes(op):
  features, boxes, indices = _inputs()
  bad = np.array(
    [
      [np.nan, 1, 5, 5],
      [1, np.inf, 5, 5],
      [6, 6, 2, 2],  # inverted
      [3, 3, 3, 3],  # zero size
      [1e30, 1e30, 2e30, 2e30],  # huge, far outside
      [-50, -50, -40, -40],  # outside
    ],
    np.float32,
  )
  fn = OPS[op]
  mixed = np.concatenate([boxes, bad])
  mixed_indices = np.concatenate([indices, np.zeros(len(bad), np.int32)])
  out = fn(features, mixed, mixed_indices)
  assert np.all(np.isfinite(out))
  if "einsum" in op:  # a matmul over more boxes may block its sums differently (last bit)
    np.testing.assert_allclose(out[:4], fn(features, boxes, indices), rtol=1e-6, atol=1e-7)
  else:
    np.testing.assert_array_equal(out[:4], fn(features, boxes, indices))
  np.testing.assert_array_equal(out[4:6], 0.0)  # non-finite boxes
  if not op.startswith("ps_roi_pool"):  # ps_roi_pool makes an inverted box 1 cell, as torchvision
    np.testing.assert_array_equal(out[6], 0.0)
  np.testing.assert_array_equal(out[-2:], 0.0)  # outside the map

  def loss(f, b, rows):
    return jnp.sum(fn(f, b, mixed_indices)[rows] ** 2)

  good, dead = np.arange(4), np.array([4, 5, 10, 11])  # dead: non-finite and outside boxes
  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, good)
  assert np.all(np.isfinite(grad_f)) and np.all(np.isfinite(grad_b))
  clean = jax.grad(lambda f: jnp.sum(fn(f, boxes, indices) ** 2))(features)
  np.testing.assert_allclose(grad_f, clean, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad_b[4:], 0.0)
  grad_f, grad_b = jax.grad(loss, (0, 1))(features, mixed, dead)
  np.testing.assert_array_equal(grad_f, 0.0)
  np.testing.assert_array_equal(grad_b, 0.0)


@pytest.mark.parametrize("op", sorted(OPS))
def test_empty_inputs_work_forward_and_backward(op):
  features, boxes, indices = _inputs()
  fn = OPS[op]
  none = np.zeros((0, 4), np.float32)
  out = fn(features, none, np.zeros(0, np.int32))
  assert out.shape == (0, 2, 3, 2)
  grad = jax.grad(lambda f: jnp.sum(fn(f, none, np.zeros(0, np.int32))))(features)
  np.testing.assert_array_equal(grad, 0.0)
  out = fn(features[:0], np.zeros((0, 3, 4), np.float32), None)
  assert out.shape == (0, 3, 2, 3, 2)


@pytest.mark.parametrize("op", sorted(OPS))
def test_feature_gradient_is_bitwise_reproducible(op):
  features, boxes, indices = _inputs(4)
  boxes = np.concatenate([boxes] * 8)  # many bins share cells
  indices = np.concatenate([indices] * 8)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(OPS[op](f, boxes, indices) ** 2)))
  np.testing.assert_array_equal(grad(features), grad(features))


def test_bf16_features_keep_their_dtype():
  features, boxes, indices = _inputs()
  for fn in OPS.values():
    out = fn(features.astype(jnp.bfloat16), boxes, indices)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      out.astype(np.float32), fn(features, boxes, indices), rtol=2e-2, atol=2e-2
    )


def test_einsum_ps_roi_align_has_no_gather_or_scatter():
  features, boxes, indices = _inputs()

  def loss(f, b, impl, order):
    options = dict(box_indices=indices, impl=impl, channel_order=order)
    return jnp.sum(roipool_jax.ps_roi_align(f, b, (2, 3), **options) ** 2)

  for order in ("channel_major", "bin_major"):
    for impl, expect in (("einsum", False), ("gather", True)):  # the check can fail
      grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=(2, 3))
      text = grad.lower(features, boxes, impl, order).as_text()
      assert (("gather" in text) or ("scatter" in text)) == expect, (impl, order)


def _map_sized_fusions(fn, features) -> int:
  """Fusions of the compiled program's entry that write as many elements as the map: copies
  of it, or buffers of its size (a zero-filled gradient accumulator, a transposed gradient).
  Scatters into such a buffer update it in place and are not counted."""
  text = jax.jit(fn).lower(features).compile().as_text()
  lines = text[text.index("ENTRY") :].splitlines()
  entry = [line for line in lines if "scatter" not in line.split(" = ")[0]]  # by name
  shapes = [re.search(r"= [a-z0-9]+\[([0-9,]*)\]\S* fusion\(", line) for line in entry]
  sizes = [math.prod(int(d) for d in m.group(1).split(",") if d) for m in shapes if m]
  return sizes.count(features.size)


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align gather"])
def test_bin_major_maps_are_read_and_take_their_gradient_in_place(op):
  """No copy of a bin-major map forward; backward only the gradient's own buffer (one
  fusion, its zero fill). A channel-major map shows what the check catches: ps_roi_align
  copies it transposed, and both transpose their gradient back."""
  features, boxes, indices = _inputs()
  counts = {}
  for suffix in ("", " bin-major"):
    fn = functools.partial(OPS[op + suffix], b=boxes, i=indices)
    grad = jax.grad(lambda f, fn=fn: jnp.sum(fn(f) ** 2))
    counts[suffix] = (_map_sized_fusions(fn, features), _map_sized_fusions(grad, features))
  assert counts[" bin-major"] == (0, 1), counts
  forward, backward = counts[""]
  lanes = op == "ps_roi_pool" and position_sensitive.reads_lanes_in_place()
  assert backward > 1 and forward == (0 if lanes else 1), counts


@pytest.mark.parametrize("lanes", [False, True])
def test_channel_major_ps_roi_pool_reads_its_map_copied_or_in_place_with_the_same_bits(
  monkeypatch, lanes
):
  """Both tables of a channel-major map (the CPU vendor picks one): the transposed copy (one
  map-sized fusion forward) or the map read in place (none), and the same outputs and
  gradients bit for bit, on CPU (the same sums in the same order)."""
  features, boxes, indices = _inputs(5)
  fn = functools.partial(OPS["ps_roi_pool"], b=boxes, i=indices)
  loss = lambda f: jnp.sum(jnp.sin(fn(f)))  # noqa: E731
  expected = (np.asarray(fn(features)), np.asarray(jax.grad(loss)(features)))
  monkeypatch.setattr(position_sensitive, "reads_lanes_in_place", lambda: lanes)
  assert _map_sized_fusions(fn, features) == (0 if lanes else 1)
  np.testing.assert_array_equal(fn(features), expected[0])
  np.testing.assert_array_equal(jax.grad(loss)(features), expected[1])
  reference_out = reference.ps_roi_pool(features, boxes, indices, (2, 3), 1.0, "channel_major")
  np.testing.assert_allclose(fn(features), reference_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: roipool_jax.ps_roi_pool(np.ones((1, 4, 4, 5)), np.ones((1, 4)), 2), "multiple of"),
    (lambda: roipool_jax.ps_roi_align(np.ones((1, 4, 4, 8)), np.ones((1, 4)), (3, 1)), r"3 \* 1"),
    (lambda: roipool_jax.ps_roi_pool(np.ones((4, 4, 4)), np.ones((1, 4)), 2), "features"),
    (lambda: roipool_jax.ps_roi_align(np.ones((1, 4, 4, 4)), np.ones((1, 5)), 2), "boxes"),
    (lambda: roipool_jax.ps_roi_align(np.ones((1, 4, 4, 4)), np.ones((1, 4)), 0), "output_size"),
    (
      lambda: roipool_jax.ps_roi_pool(np.ones((1, 4, 4, 4)), np.ones((1, 4)), 2, spatial_scale=0),
      "spatial_scale",
    ),
  ],
)
def test_bad_arguments_raise_naming_them(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_integer_features_are_rejected():
  with pytest.raises(TypeError, match="features"):
    roipool_jax.ps_roi_pool(np.ones((1, 4, 4, 4), np.int32), np.ones((1, 4)), 2)
