"""torchvision's Mask R-CNN RoI heads ported to Flax (examples/torchvision_heads) give
torchvision's answers: eval outputs and detections, pasted masks, training losses and their
gradients (tests/fixtures/torchvision_roi_heads.npz, tools/make_roi_heads_fixture.py), plus the
static-shape postprocess against a plain NumPy port of torchvision's loops."""

import doctest

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.torchvision_heads import convert, heads, losses, postprocess
from tests.fixtures_io import load_cases

SMALL = dict(num_classes=5, representation_size=32, mask_layers=(8,) * 4, mask_dim_reduced=8)


@pytest.fixture(scope="module")
def fixture():
  out = load_cases("torchvision_roi_heads.npz")  # {section: {name: array}}
  inputs = out["inputs"]
  out["features"] = [jnp.asarray(inputs[f"level{i}"], jnp.float32) for i in range(4)]
  out["image_size"] = tuple(int(x) for x in inputs["image_shapes"].max(0))
  out["params"] = convert.params_from_state_dict(out["weights"])
  return out


@pytest.fixture(scope="module")
def detections(fixture):
  model = heads.RoIHeads(**SMALL)
  run = jax.jit(lambda p, f, b, s: model.apply(p, f, b, s, image_size=fixture["image_size"]))
  inputs = fixture["inputs"]
  return run(fixture["params"], fixture["features"], inputs["proposals"], inputs["image_shapes"])


def test_pooled_features_logits_and_deltas_match_torchvision(fixture):
  model, ev, inputs = heads.RoIHeads(**SMALL), fixture["eval"], fixture["inputs"]
  size = fixture["image_size"]
  pooled = model.apply(
    fixture["params"], fixture["features"], inputs["proposals"], 7, size, method=model.pool
  )
  np.testing.assert_allclose(pooled, ev["box_pooled"], atol=1e-5)
  logits, deltas = jax.jit(
    lambda p, f, b: model.apply(p, f, b, image_size=size, method=model.box_outputs)
  )(fixture["params"], fixture["features"], inputs["proposals"])
  np.testing.assert_allclose(logits.reshape(-1, 5), ev["class_logits"], atol=1e-5)
  np.testing.assert_allclose(deltas.reshape(-1, 20), ev["box_regression"], atol=1e-5)


def test_detections_match_torchvision(fixture, detections):
  ev = fixture["eval"]
  np.testing.assert_array_equal(detections.valid.sum(-1), ev["count"])
  np.testing.assert_array_equal(detections.labels, ev["labels"])
  np.testing.assert_allclose(detections.boxes, ev["boxes"], atol=1e-3)
  np.testing.assert_allclose(detections.scores, ev["scores"], atol=1e-5)
  clamped = ev["boxes"][..., 2] - ev["boxes"][..., 0] > 0.5 * 640  # the class whose dw is clamped
  assert clamped.any()


def test_padded_detections_match_torchvision_below_the_limit(fixture):
  expected, inputs = fixture["eval_600"], fixture["inputs"]
  model = heads.RoIHeads(**SMALL, detections_per_img=600, masks=False)
  found = jax.jit(lambda p, f, b, s: model.apply(p, f, b, s, image_size=fixture["image_size"]))(
    fixture["params"], fixture["features"], inputs["proposals"], inputs["image_shapes"]
  )
  assert (expected["count"] < 600).all()
  np.testing.assert_array_equal(found.valid.sum(-1), expected["count"])
  np.testing.assert_array_equal(found.labels, expected["labels"])  # padding: label 0
  np.testing.assert_allclose(found.boxes, expected["boxes"], atol=1e-3)
  np.testing.assert_allclose(found.scores, expected["scores"], atol=1e-5)


def test_masks_match_torchvision_before_and_after_pasting(fixture, detections):
  ev, inputs = fixture["eval"], fixture["inputs"]
  np.testing.assert_allclose(detections.masks, ev["masks"], atol=1e-4)
  model = heads.RoIHeads(**SMALL)
  pooled = model.apply(  # torchvision's detections (ours differ by float rounding, ~1e-5 px)
    fixture["params"],
    fixture["features"],
    ev["boxes"],
    14,
    fixture["image_size"],
    method=model.pool,
  )
  np.testing.assert_allclose(pooled, ev["mask_pooled"], atol=1e-5)
  for i in range(2):
    original = tuple(int(x) for x in inputs["original_sizes"][i])
    boxes = postprocess.resize_boxes(detections.boxes[i], inputs["image_shapes"][i], original)
    np.testing.assert_allclose(boxes, ev["original_boxes"][i], atol=1e-3)
    pasted = jax.jit(postprocess.paste_masks_in_image, static_argnums=2)(
      detections.masks[i], boxes, original
    )
    expected = ev[f"pasted_{i}"]
    assert pasted.shape == expected.shape
    np.testing.assert_allclose(pasted, expected, atol=1e-4)


def test_training_losses_and_weight_gradients_match_torchvision(fixture):
  train, inputs = fixture["train"], fixture["inputs"]
  model = heads.RoIHeads(**SMALL)
  samples = losses.Samples(
    *(
      jnp.asarray(train[k])
      for k in ("sampled_proposals", "labels", "matched_idxs", "regression_targets")
    )
  )
  gt_masks = [jnp.asarray(inputs[f"gt_masks_{i}"]) for i in range(2)]

  def total(params, features, samples, gt_masks):
    out = model.apply(
      params, features, samples, gt_masks, image_size=fixture["image_size"], method=model.losses
    )
    return sum(out.values()), out

  loss_and_grad = jax.jit(jax.value_and_grad(total, has_aux=True))
  (_, out), grads = loss_and_grad(fixture["params"], fixture["features"], samples, gt_masks)
  assert sorted(out) == ["loss_box_reg", "loss_classifier", "loss_mask"]
  for name, value in out.items():
    np.testing.assert_allclose(value, train[name], atol=1e-5, err_msg=name)
  expected = convert.params_from_state_dict(
    {k[len("grad.") :]: v for k, v in train.items() if k.startswith("grad.")}
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grads, expected)
  for i in range(2):  # torchvision's regression targets are box encodings of the matched boxes
    matched = inputs[f"gt_boxes_{i}"][train["matched_idxs"][i]]
    encoded = postprocess.encode_boxes(matched, train["sampled_proposals"][i])
    np.testing.assert_allclose(encoded, train["regression_targets"][i], atol=1e-5)


def test_zero_size_padding_proposals_change_nothing(fixture, detections):
  inputs, size = fixture["inputs"], fixture["image_size"]
  padded = np.concatenate([inputs["proposals"], np.zeros((2, 8, 4), np.float32)], 1)
  model = heads.RoIHeads(**SMALL, masks=False)
  found = model.apply(
    fixture["params"], fixture["features"], padded, inputs["image_shapes"], image_size=size
  )
  np.testing.assert_array_equal(found.labels, detections.labels)
  np.testing.assert_allclose(found.boxes, detections.boxes, atol=1e-4)


def test_mask_branch_skips_chunks_without_detections(fixture):
  inputs, size = fixture["inputs"], fixture["image_size"]
  model = heads.RoIHeads(**SMALL, detections_per_img=600, mask_chunk=64)
  found = jax.jit(lambda p, f, b, s: model.apply(p, f, b, s, image_size=size))(
    fixture["params"], fixture["features"], inputs["proposals"], inputs["image_shapes"]
  )
  valid = np.asarray(found.valid)
  assert valid.any() and not valid.all(axis=1).any()  # chunks of detections, mixed and empty
  logits = model.apply(
    fixture["params"], fixture["features"], found.boxes, image_size=size, method=model.mask_logits
  )
  dense = postprocess.select_class_masks(logits, found.labels)
  np.testing.assert_allclose(np.asarray(found.masks)[valid], np.asarray(dense)[valid], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(found.masks)[~valid], 0.0)


def test_converter_accepts_a_whole_model_and_names_what_is_missing(fixture):
  whole = {f"roi_heads.{k}": v for k, v in fixture["weights"].items()}
  whole["backbone.body.conv1.weight"] = np.zeros((1,))
  converted = convert.params_from_state_dict(whole)
  jax.tree.map(np.testing.assert_array_equal, converted, fixture["params"])
  box_only = {k: v for k, v in fixture["weights"].items() if k.startswith("box_")}
  assert set(convert.params_from_state_dict(box_only)["params"]) == {"box_head", "box_predictor"}
  with pytest.raises(KeyError, match="box_head.fc7.weight"):
    convert.params_from_state_dict({k: v for k, v in box_only.items() if "fc7.weight" not in k})


def test_faster_rcnn_heads_without_masks(fixture):
  box_only = {k: v for k, v in fixture["weights"].items() if k.startswith("box_")}
  model = heads.RoIHeads(**SMALL, masks=False)
  inputs = fixture["inputs"]
  found = model.apply(
    convert.params_from_state_dict(box_only),
    fixture["features"],
    inputs["proposals"],
    inputs["image_shapes"],
    image_size=fixture["image_size"],
  )
  assert found.masks is None
  np.testing.assert_array_equal(found.labels, fixture["eval"]["labels"])


def test_heads_docstring_example_runs():
  assert doctest.testmod(heads, raise_on_error=True).attempted > 0


# The static-shape postprocess against torchvision's loops, written out in NumPy.


def _np_decode(deltas, boxes, weights=postprocess.BOX_CODER_WEIGHTS):
  wx, wy, ww, wh = weights
  d = deltas.reshape(len(deltas), deltas.shape[1] // 4, 4)
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
  dw = np.minimum(d[..., 2] / ww, postprocess.BBOX_XFORM_CLIP)
  dh = np.minimum(d[..., 3] / wh, postprocess.BBOX_XFORM_CLIP)
  pcx, pcy = d[..., 0] / wx * w[:, None] + cx[:, None], d[..., 1] / wy * h[:, None] + cy[:, None]
  pw, ph = np.exp(dw) * w[:, None], np.exp(dh) * h[:, None]
  return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], -1)


def _np_iou(a, b):
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
  return w * h / (area(a) + area(b) - w * h)


def _np_postprocess(logits, deltas, proposals, image_shape, score_thresh, nms_thresh, limit):
  """One image, as ``RoIHeads.postprocess_detections``: lists in, lists out."""
  h, w = image_shape
  boxes = np.clip(_np_decode(deltas, proposals), 0, [w, h, w, h])
  e = np.exp(logits - logits.max(-1, keepdims=True))
  scores = e / e.sum(-1, keepdims=True)
  candidates = []  # proposal-major, background dropped
  for p in range(len(proposals)):
    for c in range(1, logits.shape[1]):
      b = boxes[p, c]
      if scores[p, c] > score_thresh and min(b[2] - b[0], b[3] - b[1]) >= 1e-2:
        candidates.append((scores[p, c], b, c))
  candidates.sort(key=lambda t: -t[0])  # stable
  kept = []
  for score, box, label in candidates:
    if all(lab != label or _np_iou(k, box) <= nms_thresh for _, k, lab in kept):
      kept.append((score, box, label))
  return kept[:limit]


@hypothesis.given(
  seed=st.integers(0, 2**16),
  proposals=st.sampled_from([0, 1, 9, 40]),
  classes=st.sampled_from([2, 4]),
  limit=st.sampled_from([5, 100]),
  max_candidates=st.sampled_from([7, 4096]),
)
def test_postprocess_matches_torchvision_loops(seed, proposals, classes, limit, max_candidates):
  rng = np.random.default_rng(seed)
  lo = rng.uniform(-10, 90, (2, proposals, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.5, 40, (2, proposals, 2))], -1).astype(np.float32)
  logits = (3 * rng.standard_normal((2, proposals, classes))).astype(np.float32)
  deltas = rng.standard_normal((2, proposals, 4 * classes)).astype(np.float32)
  shapes = np.array([[80, 100], [60, 70]])
  found = postprocess.postprocess_detections(
    logits, deltas, boxes, shapes, detections_per_img=limit, max_candidates=max_candidates
  )
  for i in range(2):
    expected = _np_postprocess(
      logits[i].astype(np.float64),
      deltas[i].astype(np.float64),
      boxes[i].astype(np.float64),
      shapes[i],
      0.05,
      0.5,
      limit,
    )
    count = int(found.valid[i].sum())
    if max_candidates >= proposals * (classes - 1):
      assert count == len(expected)
    else:  # NMS saw the best max_candidates: its detections are the first of torchvision's
      assert count <= len(expected)
    assert not found.valid[i, count:].any()
    np.testing.assert_array_equal(found.labels[i, :count], [t[2] for t in expected[:count]])
    np.testing.assert_allclose(found.scores[i, :count], [t[0] for t in expected[:count]], atol=1e-5)
    np.testing.assert_allclose(
      found.boxes[i, :count].reshape(-1, 4),
      np.reshape([t[1] for t in expected[:count]], (-1, 4)),
      atol=1e-3,
    )
    np.testing.assert_array_equal(found.boxes[i, count:], 0.0)


def test_nms_suppresses_only_within_a_class_and_above_the_threshold():
  boxes = jnp.array(
    [[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10], [0, 0, 10, 20.1]], jnp.float32
  )
  scores = jnp.array([0.9, 0.8, 0.7, 0.6])
  labels = jnp.array([1, 1, 2, 1])
  index, found = postprocess.batched_nms(boxes, scores, labels, jnp.ones(4, bool), 0.5, 4)
  # box 1 overlaps box 0 (IoU 0.95) in its class; box 2: another class; box 3: IoU 10/20.1
  np.testing.assert_array_equal(index[: int(found.sum())], [0, 2, 3])
  index, found = postprocess.batched_nms(
    boxes, scores, labels, jnp.array([0, 1, 1, 1], bool), 0.5, 2
  )
  np.testing.assert_array_equal(index, [1, 2])  # invalid candidates are skipped; stops at 2
  assert found.all()


def test_decode_inverts_encode_and_clamps_the_size():
  rng = np.random.default_rng(1)
  lo = rng.uniform(0, 50, (6, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(1, 30, (6, 2))], -1).astype(np.float32)
  lo = rng.uniform(0, 50, (6, 2))
  target = np.concatenate([lo, lo + rng.uniform(1, 30, (6, 2))], -1).astype(np.float32)
  decoded = postprocess.decode_boxes(postprocess.encode_boxes(target, boxes), boxes)
  np.testing.assert_allclose(decoded[:, 0], target, rtol=1e-5, atol=1e-4)
  huge = postprocess.decode_boxes(
    jnp.array([[0.0, 0.0, 1e4, 1e4]]), jnp.array([[0.0, 0.0, 16, 16]])
  )
  np.testing.assert_allclose(huge[0, 0], [-492, -492, 508, 508], rtol=1e-5)  # 16 * 1000 / 16


def test_no_proposals_give_no_detections():
  model = heads.RoIHeads(**SMALL)
  levels = [jnp.ones((2, 64 // s, 64 // s, 8)) for s in (4, 8, 16, 32)]
  proposals, shapes = jnp.zeros((2, 0, 4)), jnp.array([[64, 64], [64, 64]])
  params = model.init(jax.random.key(0), levels, jnp.ones((2, 1, 4)), shapes, image_size=(64, 64))
  found = model.apply(params, levels, proposals, shapes, image_size=(64, 64))
  assert found.boxes.shape == (2, 100, 4) and found.masks.shape == (2, 100, 28, 28)
  assert not found.valid.any()
