"""The examples: Fast R-CNN trains (loss falls; its data-parallel step equals one device), and
box refinement through precise_roi_pool reaches its target."""

import io

import numpy as np
import pytest

from examples import fast_rcnn as example
from examples import refine_box
from tests.devices import run_on_cpu_devices
from tests.quick import some


@pytest.mark.parametrize("pool", some(["align", "pool", "deform"]))
def test_loss_falls_on_a_tiny_run(pool):
  _, history = example.train(steps=40, pool=pool, batch=4, log_every=1, out=io.StringIO())
  losses = [loss for _, loss, _ in history]
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


@pytest.mark.slow
def test_deform_head_learns_offsets():
  params, _ = example.train(steps=20, pool="deform", batch=4, log_every=5, out=io.StringIO())
  offsets = params["params"]["DeformRoIPool_0"]["offset_fc3"]["kernel"]
  assert np.abs(np.asarray(offsets)).max() > 0  # starts at zero; training moves it
  assert 0.0 <= example.evaluate(example.FastRCNN(pool="deform"), params, batches=1) <= 1.0


def test_box_refinement_reaches_the_target_only_with_precise_roi_pool():
  boxes = refine_box.refine(steps=60)
  assert refine_box.iou(boxes[0], refine_box.TARGET) < 0.25
  assert refine_box.iou(boxes[-1], refine_box.TARGET) > 0.99
  assert np.all(refine_box.mean_gradient(refine_box.roipool_jax.precise_roi_pool) != 0)
  np.testing.assert_array_equal(refine_box.mean_gradient(refine_box.roipool_jax.roi_pool), 0.0)


def test_decode_inverts_encode():
  rng = np.random.default_rng(0)
  lo = rng.uniform(0, 40, (2, 5, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(2, 20, (2, 5, 2))], -1)
  lo = rng.uniform(0, 40, (2, 5, 2))
  gt = np.concatenate([lo, lo + rng.uniform(2, 20, (2, 5, 2))], -1)
  np.testing.assert_allclose(example.decode(boxes, example.encode(boxes, gt)), gt, atol=1e-9)
  np.testing.assert_allclose(example.decode(boxes, np.zeros_like(boxes)), boxes)


def test_detect_finds_the_shapes_after_training():
  params, _ = example.train(steps=150, batch=8, log_every=50, out=io.StringIO())
  rng = np.random.default_rng(123)
  images, proposals, labels, _ = example.make_batch(rng, 8)
  model = example.FastRCNN()
  detections = example.detect(model, params, images, proposals, min_score=0.5)
  assert len(detections) == 8
  found = 0
  for b, (boxes, classes, scores) in enumerate(detections):
    assert boxes.shape == (len(classes), 4) and scores.shape == classes.shape
    assert np.all(scores >= 0.5) and np.all((classes >= 1) & (classes < example.CLASSES))
    assert np.all(boxes >= 0) and np.all(boxes <= example.IMAGE)
    found += len(set(classes.tolist()) & set(labels[b][labels[b] > 0].tolist()))
  assert found >= 8  # of about 13 (image, class) pairs: most shapes found with the right class


SHARDED = """
import io
import jax, numpy as np
from jax.sharding import Mesh
assert len(jax.devices()) == 8, jax.devices()
from examples import fast_rcnn as ex

from tests.quick import some
mesh = Mesh(np.array(jax.devices()), ("data",))
single, h1 = ex.train(steps=3, batch=8, log_every=1, out=io.StringIO())
sharded, h2 = ex.train(steps=3, batch=8, log_every=1, mesh=mesh, out=io.StringIO())
for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
np.testing.assert_allclose([l for _, l, _ in h1], [l for _, l, _ in h2], rtol=1e-4)
print("sharded == single")
"""


def test_data_parallel_step_on_8_devices_equals_one_device():
  assert "sharded == single" in run_on_cpu_devices(SHARDED)
