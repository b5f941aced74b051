"""The benchmark suite runs end to end (tiny shapes) and writes its three reports."""

import inspect
import json
import time

import numpy as np
import pytest

import roipool_jax
from benchmarks import common
from benchmarks import run as suite
from tests.quick import some


@pytest.mark.parametrize("only", some(["VGG16", None]))
def test_quick_suite_writes_markdown_json_and_plot(only, tmp_path):
  # Every config once; the first-call column (a second compile of each op) for one config.
  select = ["--only", only] if only else ["--no-first-call"]
  argv = ["--quick", "--repeats", "1", "--dtypes", "float32", "--out", str(tmp_path), *select]
  rows = suite.main(argv)
  ops = {r["op"] for r in rows}
  if only:
    assert [r["config"] for r in rows] == [c.name for c in suite.CONFIGS if only in c.name]
  else:
    assert ops == {
      "roi_pool",
      "roi_align",
      "roi_warp",
      "multi_scale",
      "ps_roi_pool",
      "ps_roi_align",
      "roi_align_rotated",
      "riroi_align_rotated",
      "bezier_align",
      "precise_roi_pool",
      "deform_roi_pool",
    }
    for r in rows:
      if r["op"] in suite.BASELINE_OPS:  # their reference, plain JAX, always runs
        assert r["torch_fwd_ms"] > 0, r["config"]
    assert len(rows) == len(suite.CONFIGS)
  for r in rows:
    assert r["jax_fwd_ms"] > 0 and r["jax_fwd_bwd_ms"] > 0
    assert r["floor_fwd_ms"] > 0 and r["floor_fwd_bwd_ms"] == 2 * r["floor_fwd_ms"]
    assert 0 < r["jax_peak_mb"] < 64  # tiny shapes: nothing near a per-box copy
    assert (r["first_call_s"] > 0) if only else (r["first_call_s"] is None)
  reports = {p.suffix for p in tmp_path.iterdir()}
  assert {".md", ".json", ".png"} <= reports
  saved = json.loads(next(tmp_path.glob("*.json")).read_text())
  assert saved["bandwidth_gb_s"] > 0 and len(saved["rows"]) == len(rows)
  table = next(tmp_path.glob("*.md")).read_text()
  assert all(r["config"] in table for r in rows)


@pytest.mark.parametrize("op", suite.BASELINE_OPS)
def test_plain_jax_baselines_compute_what_the_library_computes(op):
  # A timing against a reference is only fair if the reference computes the same thing.
  config = next(c for c in suite.CONFIGS if c.op == op).quick()
  features, boxes, indices = suite.make_inputs(config, np.float32)
  ours = suite.jax_op(config, indices, "auto")(features, boxes)
  theirs = suite.baseline_op(config, indices)(features, boxes)
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-4, atol=1e-4)


def test_rounds_keep_each_best_median(tmp_path):
  argv = ["--quick", "--repeats", "1", "--rounds", "2", "--dtypes", "float32"]
  argv += ["--only", "VGG16", "--no-first-call", "--out", str(tmp_path)]
  (row,) = suite.main(argv)
  for key in suite.TIMES:
    rounds = [t for t in row["rounds_ms"][key] if t is not None]  # None: no torchvision
    assert len(row["rounds_ms"][key]) == 2 and row[key] == min(rounds, default=None), key
  assert row["jax_fwd_ms"] > 0 and row["jax_fwd_bwd_ms"] > 0
  assert "best of 2 rounds" in next(tmp_path.glob("*.md")).read_text()


def test_median_ms_times_only_after_its_warm_up(monkeypatch):
  monkeypatch.setattr(common, "WARM_UP_S", 0.05)
  calls = []

  def fn():  # slow until 0.05 s after its first call, then fast: only fast calls are timed
    calls.append(time.perf_counter())
    time.sleep(0.02 if calls[-1] - calls[0] < 0.05 else 0.001)

  ms = common.median_ms(fn, 3)
  assert len(calls) >= common.WARM_UP_CALLS + 3 and calls[-3] - calls[0] >= 0.05
  assert ms < 10, ms


def test_keep_best_skips_missing_times():
  row = dict(jax_fwd_ms=3.0, jax_fwd_bwd_ms=5.0, torch_fwd_ms=None, torch_fwd_bwd_ms=9.0)
  suite.keep_best(
    row, dict(jax_fwd_ms=2.0, jax_fwd_bwd_ms=6.0, torch_fwd_ms=4.0, torch_fwd_bwd_ms=None)
  )
  assert (row["jax_fwd_ms"], row["jax_fwd_bwd_ms"]) == (2.0, 5.0)
  assert (row["torch_fwd_ms"], row["torch_fwd_bwd_ms"]) == (4.0, 9.0)
  assert row["rounds_ms"]["torch_fwd_bwd_ms"] == [9.0, None]


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_bin_major_rows_compute_what_torchvision_computes(op):
  # Their map goes to torchvision unchanged and to roipool_jax reordered: a fair row only if
  # the reordered map is the same score maps, giving the channel-major row's results.
  ours, theirs = (
    next(c for c in suite.CONFIGS if c.op == op and c.channel_order == order).quick()
    for order in ("bin_major", "channel_major")
  )
  features, boxes, indices = suite.make_inputs(ours, np.float32)
  reordered = suite.bin_major(features, ours)
  assert not np.array_equal(reordered, features)
  np.testing.assert_array_equal(
    suite.jax_op(ours, indices, "gather")(reordered, boxes),
    suite.jax_op(theirs, indices, "gather")(features, boxes),
  )


def test_every_op_that_takes_impl_gets_the_one_asked_for(monkeypatch):
  # `--impl einsum` must time the einsum path of every op that has one, not `auto`'s pick.
  seen = {}
  for config in suite.CONFIGS:
    fn = getattr(roipool_jax, {"multi_scale": "multi_scale_roi_align"}.get(config.op, config.op))
    if "impl" not in inspect.signature(fn).parameters:
      continue

    def record(*args, _op=config.op, **kwargs):
      seen[_op] = kwargs.get("impl")

    monkeypatch.setattr(roipool_jax, fn.__name__, record)
    suite.jax_op(config, None, "einsum")(None, None)
    monkeypatch.undo()
  assert seen and set(seen.values()) == {"einsum"}, seen
  assert "roi_pool" in seen
