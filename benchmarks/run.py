"""The benchmark suite: every op on standard detector configs, side by side
with torchvision and with the memory-bandwidth floor.

    python benchmarks/run.py                  # all configs, float32 and bfloat16
    python benchmarks/run.py --only P2 --dtypes float32 --repeats 10
    python benchmarks/run.py --rounds 3       # each time the best of 3 rounds' medians
    python benchmarks/run.py --quick          # tiny shapes: checks the suite runs

For each config and dtype it times, after compilation and a warm-up (at
least 2 calls and 0.3 s: ``common.median_ms``), the median of ``--repeats``
runs of the jitted forward and of forward+backward
(the output and its gradient with respect to the features, both returned, as
a training step needs both; torchvision has no box gradient). With
``--rounds R`` the whole suite is timed R times over, and each time reported
is the smallest of its R medians: on a shared machine, load comes in spells
of seconds that can slow every run of one median, but rarely the same row in
every round, minutes apart. Both implementations get the same treatment. When
torch/torchvision are importable, the same op runs on the same data in the
same process (NCHW; CUDA when JAX runs on a GPU and torch sees one). It also reports:

* ``floor``: the bytes that must move (features read once and the output
  written once; for forward+backward also the cotangent read and the feature
  gradient written) divided by the memory bandwidth measured in the same run
  (``y = x + 1`` over 256 MB), and how many times the floor each
  implementation takes;
* ``first call s``: the first eager forward call, compilation included
  (after ``jax.clear_caches()``; what a user waits in a notebook);
* ``peak MB``: the peak memory of the compiled JAX forward+backward (XLA's
  memory analysis: arguments, outputs and temporaries), next to the
  ``K * H * W * C`` elements a per-box copy of the map would take.

Results go to ``--out`` (default ``benchmarks/results``) as ``<backend>.md``,
``<backend>.json`` and ``<backend>.png``; the markdown is also printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import baselines  # noqa: E402
from common import (  # noqa: E402
  copy_bandwidth,
  machine,
  median_ms,
  peak_bytes,
  proposals,
  scaled_boxes,
)

import roipool_jax  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  # "roi_pool" | "roi_align" | "roi_warp" | "multi_scale" | "ps_roi_pool" | "ps_roi_align" |
  # "roi_align_rotated" | "riroi_align_rotated" | "bezier_align" | "precise_roi_pool" |
  # "deform_roi_pool"
  op: str
  shape: tuple[int, int, int, int]  # (N, H, W, C) of the (finest) map
  rois: int
  output: int
  scale: float  # of the finest map
  sampling_ratio: int = 2
  aligned: bool = True
  box_px: tuple[float, float] = (16.0, 1.0)  # min side in px, max side / image
  levels: int = 1  # pyramid levels (multi_scale), each half the previous
  max_px: float | None = None  # max side in px (instead of box_px[1] * image)
  box_factor: float | None = None  # all boxes this many times the image, centred in it
  torch: bool = True  # also time torchvision (False: its cost would dominate the run)
  # ps_* ops: the map's channel order; torchvision gets the same map in its own order
  channel_order: str = "channel_major"

  def quick(self):
    n, h, w, c = self.shape
    bins = self.output**2 if self.op.startswith("ps_") else 1  # C = C_out * oh * ow
    return dataclasses.replace(
      self,
      shape=(n, max(h // 4, 4), max(w // 4, 4), max(c // bins // 16, 4) * bins),
      rois=max(self.rois // 16, 4),
      box_px=(min(self.box_px[0], 16.0), self.box_px[1]),
    )


CONFIGS = [
  Config("Fast R-CNN VGG16, roi_pool", "roi_pool", (2, 38, 63, 512), 128, 7, 1 / 16),
  Config(
    "RPN proposals 16-700 px, roi_align adaptive",
    "roi_align",
    (2, 50, 84, 256),
    1000,
    7,
    1 / 16,
    sampling_ratio=-1,
    max_px=700.0,
  ),
  Config("article 512x512, roi_pool 3x3", "roi_pool", (1, 16, 16, 512), 2000, 3, 1 / 32),
  Config("FPN P2 box head, roi_align", "roi_align", (1, 200, 304, 256), 512, 7, 1 / 4),
  Config("FPN P2 mask head 14x14, roi_align", "roi_align", (1, 200, 304, 256), 512, 14, 1 / 4),
  Config(
    "adaptive, large boxes, roi_align",
    "roi_align",
    (2, 50, 84, 256),
    512,
    7,
    1 / 16,
    sampling_ratio=-1,
    box_px=(200.0, 1.0),
  ),
  # R-FCN (ResNet-101, PASCAL VOC): 21 classes x 7 x 7 position-sensitive score maps, in
  # torchvision's channel order, then bin-major (each bin's 21 channels contiguous).
  *(
    Config(
      f"R-FCN {layout} score maps, {op}",
      op,
      (1, 38, 63, 21 * 49),
      300,
      7,
      1 / 16,
      sampling_ratio=-1 if op == "ps_roi_align" else 2,
      channel_order=order,
    )
    for layout, order in (("21x7x7", "channel_major"), ("bin-major", "bin_major"))
    for op in ("ps_roi_pool", "ps_roi_align")
  ),
  # Oriented text / aerial boxes; the reference is a plain JAX gather (no torchvision op).
  Config(
    "rotated boxes (P3), roi_align_rotated",
    "roi_align_rotated",
    (1, 100, 152, 256),
    512,
    7,
    1 / 8,
  ),
  # ReDet: rotation-equivariant P3 features, 32 groups of 8 orientations.
  Config(
    "ReDet (P3), riroi_align_rotated", "riroi_align_rotated", (1, 100, 152, 256), 512, 7, 1 / 8
  ),
  # ABCNet: curved text regions, each bounded by two cubic Bezier curves.
  Config("curved text (P3), bezier_align", "bezier_align", (1, 100, 152, 256), 512, 7, 1 / 8),
  # IoU-Net's refinement pools P3-like features; no torchvision op: plain JAX references.
  Config("IoU-Net (P3), precise_roi_pool", "precise_roi_pool", (1, 100, 152, 256), 512, 7, 1 / 8),
  Config("deformable (P3), deform_roi_pool", "deform_roi_pool", (1, 100, 152, 256), 512, 7, 1 / 8),
  Config("FPN P2, roi_warp (14x14 warp)", "roi_warp", (1, 200, 304, 256), 512, 7, 1 / 4),
  Config(
    "MultiScaleRoIAlign P2-P5, 1000 RoIs",
    "multi_scale",
    (1, 200, 304, 256),
    1000,
    7,
    1 / 4,
    aligned=False,
    levels=4,
  ),
  # Cost bounded by the map: boxes 10x the map cost about what map-sized ones do.
  *[
    Config(
      f"boxes {factor}x the map, {op}{' adaptive' if op == 'roi_align' else ''}",
      op,
      (2, 64, 64, 256),
      256,
      7,
      1 / 8,
      sampling_ratio=-1,
      box_factor=float(factor),
      # torchvision's adaptive grid samples every pixel of such a box: minutes per call.
      torch=not (op == "roi_align" and factor > 1),
    )
    for op in ("roi_pool", "roi_align")
    for factor in (1, 10)
  ],
]


# ------------------------------------------------------------------ inputs and ops


def make_inputs(config: Config, dtype, seed=0):
  """Post-ReLU features (one map, or a pyramid list), boxes [K, 4], indices [K]."""
  n, h, w, c = config.shape
  shapes = [(n, -(-h // 2**i), -(-w // 2**i), c) for i in range(config.levels)]
  # NumPy, not jax.random: every new shape would compile a sampler (seconds in --quick).
  noise = np.random.default_rng([seed, 1])
  maps = [
    jnp.asarray(np.maximum(noise.standard_normal(s, np.float32), 0).astype(dtype)) for s in shapes
  ]
  rng = np.random.default_rng(seed)
  image_h, image_w = h / config.scale, w / config.scale
  if config.box_factor is not None:
    boxes, indices = scaled_boxes(rng, config.rois, n, image_h, image_w, config.box_factor)
  else:
    min_px, factor = config.box_px
    boxes, indices = proposals(
      rng, config.rois, n, image_h, image_w, min_px, factor, max_size=config.max_px
    )
  if config.op.endswith("roi_align_rotated"):  # the same boxes as (cx, cy, w, h, angle), turned
    centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    angle = rng.uniform(-90, 90, (len(boxes), 1)).astype(np.float32)
    boxes = np.concatenate([centre, size, angle], axis=1)
  if config.op == "bezier_align":  # the boxes' top and bottom edges, bent by up to 20%
    t = np.array([0, 1 / 3, 2 / 3, 1], np.float32)
    xs = boxes[:, :1] + t * (boxes[:, 2:3] - boxes[:, :1])
    bend = rng.uniform(-0.2, 0.2, (len(boxes), 8)) * (boxes[:, 3:4] - boxes[:, 1:2])
    top = np.stack([xs, boxes[:, 1:2] + bend[:, :4]], -1)
    bottom = np.stack([xs, boxes[:, 3:4] + bend[:, 4:]], -1)[:, ::-1]  # right to left
    boxes = np.concatenate([top, bottom], 1).reshape(len(boxes), 16).astype(np.float32)
  return (maps if config.levels > 1 else maps[0]), jnp.asarray(boxes), jnp.asarray(indices)


def jax_op(config: Config, indices, impl: str):
  """``features -> [K, out, out, C]`` with the boxes as the second argument."""
  size, scale, index = config.output, config.scale, indices
  if config.op == "roi_pool":
    return lambda f, b: roipool_jax.roi_pool(
      f, b, size, spatial_scale=scale, box_indices=index, impl=impl
    )
  if config.op == "roi_align":
    return lambda f, b: roipool_jax.roi_align(
      f,
      b,
      size,
      spatial_scale=scale,
      sampling_ratio=config.sampling_ratio,
      aligned=config.aligned,
      box_indices=index,
      impl=impl,
    )
  if config.op == "ps_roi_pool":
    return lambda f, b: roipool_jax.ps_roi_pool(
      f, b, size, spatial_scale=scale, box_indices=index, channel_order=config.channel_order
    )
  if config.op == "ps_roi_align":
    return lambda f, b: roipool_jax.ps_roi_align(
      f,
      b,
      size,
      spatial_scale=scale,
      sampling_ratio=config.sampling_ratio,
      box_indices=index,
      impl=impl,
      channel_order=config.channel_order,
    )
  if config.op == "roi_align_rotated":
    return lambda f, b: roipool_jax.roi_align_rotated(
      f, b, size, spatial_scale=scale, sampling_ratio=config.sampling_ratio, box_indices=index
    )
  if config.op == "riroi_align_rotated":
    return lambda f, b: roipool_jax.riroi_align_rotated(
      f,
      b,
      size,
      num_orientations=ORIENTATIONS,
      spatial_scale=scale,
      sampling_ratio=config.sampling_ratio,
      box_indices=index,
    )
  if config.op == "bezier_align":
    return lambda f, b: roipool_jax.bezier_align(
      f, b, size, spatial_scale=scale, sampling_ratio=config.sampling_ratio, box_indices=index
    )
  if config.op == "precise_roi_pool":
    return lambda f, b: roipool_jax.precise_roi_pool(
      f, b, size, spatial_scale=scale, box_indices=index, impl=impl
    )
  if config.op == "deform_roi_pool":
    offsets = deform_offsets(config)
    return lambda f, b: roipool_jax.deform_roi_pool(
      f,
      b,
      offsets,
      size,
      spatial_scale=scale,
      sampling_ratio=config.sampling_ratio,
      box_indices=index,
    )
  if config.op == "roi_warp":
    return lambda f, b: roipool_jax.roi_warp(
      f, b, size, spatial_scale=scale, box_indices=index, impl=impl
    )
  image = (round(config.shape[1] / scale), round(config.shape[2] / scale))
  return lambda f, b: roipool_jax.multi_scale_roi_align(
    f,
    b,
    size,
    image_size=image,
    sampling_ratio=config.sampling_ratio,
    aligned=config.aligned,
    box_indices=index,
    impl=impl,
  )


# Ops timed against a plain JAX formulation (:mod:`baselines`) instead of torchvision.
BASELINE_OPS = (
  "roi_align_rotated",
  "riroi_align_rotated",
  "bezier_align",
  "precise_roi_pool",
  "deform_roi_pool",
)
# Orientation channels per group of the riroi_align_rotated config (ReDet's 8).
ORIENTATIONS = 8


def deform_offsets(config: Config):
  """Fixed learned-looking offsets ``[K, out, out, 2]`` for ``deform_roi_pool``."""
  shape = (config.rois, config.output, config.output, 2)
  return jnp.asarray(np.random.default_rng(1).normal(0.0, 0.5, shape), jnp.float32)


def first_call_s(config, features, boxes, indices, impl):
  """Seconds of the first eager forward call, compilation included (what a user waits)."""
  jax.clear_caches()
  op = jax_op(config, indices, impl)
  start = time.perf_counter()
  jax.block_until_ready(op(features, boxes))
  return time.perf_counter() - start


def _time_jitted(op, features, boxes, repeats):
  """Median ms of ``jit(op)`` and of its jitted forward+backward (the output and the feature
  gradient), that compiled forward+backward with its cotangent, and the output."""
  fwd = jax.jit(op)
  out = fwd(features, boxes)
  # The cotangent is an argument, as in a training step: a closed-over array would be
  # compiled into the program as a constant, which XLA:CPU reads more slowly.
  cot = jnp.ones(out.shape, out.dtype)

  # The output and the feature gradient, as a training step (and torchvision's
  # forward+backward) computes both: with the gradient alone, XLA would drop the forward
  # of every op whose backward does not read the output.
  @jax.jit
  def fwd_bwd(f, b, c):
    out, vjp = jax.vjp(lambda f: op(f, b), f)
    return out, vjp(c)[0]

  times = dict(
    fwd_ms=median_ms(lambda: jax.block_until_ready(fwd(features, boxes)), repeats),
    fwd_bwd_ms=median_ms(lambda: jax.block_until_ready(fwd_bwd(features, boxes, cot)), repeats),
  )
  return times, (fwd_bwd, cot), out


def bench_jax(config, features, boxes, indices, impl, repeats, first_call=True):
  first = first_call_s(config, features, boxes, indices, impl) if first_call else None
  times, (fwd_bwd, cot), out = _time_jitted(jax_op(config, indices, impl), features, boxes, repeats)
  return dict(
    **times,
    peak_mb=(peak_bytes(fwd_bwd, features, boxes, cot) or 0) / 2**20,
    out_bytes=out.nbytes,
    first_call_s=first,
  )


def baseline_op(config, indices):
  """``features, boxes -> [K, out, out, C]``: the plain JAX formulation (:mod:`baselines`) of
  an op torchvision lacks, or None."""
  size, scale, ratio = config.output, config.scale, config.sampling_ratio
  if config.op == "roi_align_rotated":
    return lambda f, b: baselines.roi_align_rotated(f, b, indices, size, scale, ratio)
  if config.op == "riroi_align_rotated":
    return lambda f, b: baselines.riroi_align_rotated(
      f, b, indices, size, scale, ratio, ORIENTATIONS
    )
  if config.op == "bezier_align":
    return lambda f, b: baselines.bezier_align(f, b, indices, size, scale, ratio)
  if config.op == "precise_roi_pool":
    return lambda f, b: baselines.precise_roi_pool(f, b, indices, size, scale)
  if config.op == "deform_roi_pool":
    offsets = deform_offsets(config)
    return lambda f, b: baselines.deform_roi_pool(f, b, offsets, indices, size, scale, ratio, 0.1)
  return None


def bench_baseline(config, features, boxes, indices, repeats):
  """The plain JAX formulation of an op torchvision lacks, jitted, or None."""
  op = baseline_op(config, indices)
  return None if op is None else _time_jitted(op, features, boxes, repeats)[0]


def bench_torch(config, features, boxes, indices, dtype, repeats):
  """torchvision's forward and forward+backward on the same data, or None."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  tdtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}[
    dtype
  ]
  maps = features if isinstance(features, list) else [features]
  xs = [
    torch.tensor(np.asarray(m.astype(jnp.float32)))
    .permute(0, 3, 1, 2)
    .contiguous()
    .to(device, tdtype)
    for m in maps
  ]
  idx = torch.tensor(np.asarray(indices), dtype=torch.float32)[:, None]
  rois = torch.cat([idx, torch.tensor(np.asarray(boxes))], 1).to(device, tdtype)
  size, scale = config.output, config.scale
  if config.op == "roi_pool":

    def op(xs):
      return torchvision.ops.roi_pool(xs[0], rois, size, scale)
  elif config.op == "roi_align":

    def op(xs):
      return torchvision.ops.roi_align(
        xs[0], rois, size, scale, config.sampling_ratio, config.aligned
      )
  elif config.op == "ps_roi_pool":

    def op(xs):
      return torchvision.ops.ps_roi_pool(xs[0], rois, size, scale)
  elif config.op == "ps_roi_align":

    def op(xs):
      return torchvision.ops.ps_roi_align(xs[0], rois, size, scale, config.sampling_ratio)
  elif config.op == "multi_scale":
    names = [str(i) for i in range(len(xs))]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, size, config.sampling_ratio)
    n = config.shape[0]
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(n)]
    image = (round(config.shape[1] / scale), round(config.shape[2] / scale))

    def op(xs):
      return pooler(dict(zip(names, xs, strict=True)), per_image, [image] * n)
  else:
    return None  # torchvision has no roi_warp

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def fwd():
    with torch.no_grad():
      op(xs)
    sync()

  def fwd_bwd():
    inputs = [x.detach().requires_grad_(True) for x in xs]
    y = op(inputs)
    y.backward(torch.ones_like(y))
    sync()

  try:
    return dict(fwd_ms=median_ms(fwd, repeats), fwd_bwd_ms=median_ms(fwd_bwd, repeats))
  except RuntimeError as error:  # e.g. a dtype the kernel does not support
    print(f"  torchvision: {str(error).splitlines()[0]}", file=sys.stderr)
    return None


def bin_major(features, config: Config):
  """A channel-major ``[N, H, W, C_out * P]`` map's channels in bin-major order, ``p * C_out
  + c`` holding channel ``c * P + p`` (see :func:`roipool_jax.ps_roi_pool`)."""
  bins = config.output**2
  n, h, w, c = features.shape
  return jnp.swapaxes(features.reshape(n, h, w, c // bins, bins), 3, 4).reshape(n, h, w, c)


def run_config(config, dtype, impl, repeats, bandwidth, first_call=True):
  features, boxes, indices = make_inputs(config, dtype)
  ours_features = bin_major(features, config) if config.channel_order == "bin_major" else features
  ours = bench_jax(config, ours_features, boxes, indices, impl, repeats, first_call)
  if config.op in BASELINE_OPS:
    theirs = bench_baseline(config, features, boxes, indices, repeats)
  elif config.torch:
    theirs = bench_torch(config, features, boxes, indices, dtype, repeats)
  else:
    theirs = None
  maps = features if isinstance(features, list) else [features]
  feature_bytes = sum(m.nbytes for m in maps)
  floor_fwd = 1e3 * (feature_bytes + ours["out_bytes"]) / bandwidth
  n, h, w, c = config.shape
  return dict(
    config=config.name,
    op=config.op,
    dtype=jnp.dtype(dtype).name,
    impl=impl,
    features=[list(m.shape) for m in maps],
    rois=config.rois,
    output=config.output,
    jax_fwd_ms=ours["fwd_ms"],
    jax_fwd_bwd_ms=ours["fwd_bwd_ms"],
    torch_fwd_ms=theirs and theirs["fwd_ms"],
    torch_fwd_bwd_ms=theirs and theirs["fwd_bwd_ms"],
    floor_fwd_ms=floor_fwd,
    floor_fwd_bwd_ms=2 * floor_fwd,
    jax_peak_mb=ours["peak_mb"],
    first_call_s=ours["first_call_s"],
    per_box_copy_mb=config.rois * h * w * c * jnp.dtype(dtype).itemsize / 2**20,
  )


TIMES = ("jax_fwd_ms", "jax_fwd_bwd_ms", "torch_fwd_ms", "torch_fwd_bwd_ms")


def keep_best(row: dict, again: dict) -> None:
  """Folds a later round's timing of the same row into ``row``: each time becomes the
  smaller of the two medians, and ``row["rounds_ms"]`` lists every round's."""
  history = row.setdefault("rounds_ms", {key: [row[key]] for key in TIMES})
  for key in TIMES:
    history[key].append(again[key])
    if again[key] is not None and (row[key] is None or again[key] < row[key]):
      row[key] = again[key]


# ------------------------------------------------------------------ reports


def _ms(value):
  return "n/a" if value is None else (f"{value:.1f}" if value >= 1 else f"{value:.2f}")


def _seconds(value):
  return "n/a" if value is None else f"{value:.2f}"


def _times(value, reference):
  return "n/a" if value is None or reference is None else f"{reference / value:.1f}x"


def markdown(rows, header):
  lines = [
    header,
    "",
    "ref: torchvision in the same process; for the ops torchvision lacks "
    f"({', '.join(f'`{op}`' for op in BASELINE_OPS)}), a plain JAX formulation (autodiff; "
    "samples gathered, or dense einsums for `precise_roi_pool`; `benchmarks/baselines.py`).",
    "",
    "| config | dtype | jax fwd ms | ref fwd ms | speed-up | jax fwd+bwd ms | ref fwd+bwd ms "
    "| speed-up | floor fwd / fwd+bwd ms | jax / floor (fwd, fwd+bwd) | jax peak MB (K*H*W*C MB) "
    "| first call s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['config']} | {r['dtype']} | {_ms(r['jax_fwd_ms'])} | {_ms(r['torch_fwd_ms'])} | "
      f"**{_times(r['jax_fwd_ms'], r['torch_fwd_ms'])}** | {_ms(r['jax_fwd_bwd_ms'])} | "
      f"{_ms(r['torch_fwd_bwd_ms'])} | **{_times(r['jax_fwd_bwd_ms'], r['torch_fwd_bwd_ms'])}** | "
      f"{_ms(r['floor_fwd_ms'])} / {_ms(r['floor_fwd_bwd_ms'])} | "
      f"{r['jax_fwd_ms'] / r['floor_fwd_ms']:.1f}, "
      f"{r['jax_fwd_bwd_ms'] / r['floor_fwd_bwd_ms']:.1f} | "
      f"{r['jax_peak_mb']:.1f} ({r['per_box_copy_mb']:.0f}) | {_seconds(r['first_call_s'])} |"
    )
  lines += ["", *cost_bound(rows)]
  return "\n".join(lines) + "\n"


def cost_bound(rows):
  """Lines comparing boxes 10x the map with map-sized boxes (same op and dtype)."""
  lines = []
  for big in rows:
    if not big["config"].startswith("boxes 10x"):
      continue
    name = big["config"].replace("boxes 10x", "boxes 1x")
    small = [r for r in rows if r["config"] == name and r["dtype"] == big["dtype"]]
    if small:
      fwd = big["jax_fwd_ms"] / small[0]["jax_fwd_ms"]
      both = big["jax_fwd_bwd_ms"] / small[0]["jax_fwd_bwd_ms"]
      label = big["config"].split(", ", 1)[1]
      lines.append(
        f"Cost of boxes 10x the map / map-sized boxes, {label} ({big['dtype']}): "
        f"forward {fwd:.1f}x, forward+backward {both:.1f}x."
      )
  return lines


def plot(rows, path, title):
  try:
    import matplotlib
  except ImportError:
    print("matplotlib is not installed: no plot", file=sys.stderr)
    return

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dtypes = sorted({r["dtype"] for r in rows}, reverse=True)
  fig, axes = plt.subplots(len(dtypes), 1, figsize=(13, 5.2 * len(dtypes)), squeeze=False)
  series = [
    ("jax_fwd_ms", "roipool_jax fwd", "tab:blue", ""),
    ("torch_fwd_ms", "torchvision fwd", "tab:orange", ""),
    ("jax_fwd_bwd_ms", "roipool_jax fwd+bwd", "tab:blue", "//"),
    ("torch_fwd_bwd_ms", "torchvision fwd+bwd", "tab:orange", "//"),
  ]
  for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
    subset = [r for r in rows if r["dtype"] == dtype]
    x = np.arange(len(subset))
    for s, (key, label, colour, hatch) in enumerate(series):
      values = [r[key] or 0 for r in subset]
      ax.bar(x + (s - 1.5) * 0.2, values, 0.2, label=label, color=colour, hatch=hatch, alpha=0.85)
    for floor_key, offset in (("floor_fwd_ms", -0.2), ("floor_fwd_bwd_ms", 0.2)):
      ax.hlines([r[floor_key] for r in subset], x + offset - 0.2, x + offset + 0.2, color="k", lw=2)
    ax.plot([], [], color="k", lw=2, label="memory floor")
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    labels = [r["config"].replace(", ", "\n", 1) for r in subset]
    ax.set_xticks(x, labels, fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_title(f"{title}, {dtype}")
    ax.legend(fontsize=8, ncol=5, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--rounds", type=int, default=1, help="time the suite this many times; keep each best median"
  )
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument(
    "--impl",
    default="auto",
    choices=["auto", "gather", "einsum"],
    help="the implementation of the ops that take impl= (the others have one)",
  )
  parser.add_argument("--only", help="run the configs whose name contains this")
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
  parser.add_argument(
    "--no-first-call",
    dest="first_call",
    action="store_false",
    help="skip the first-call column (it clears JAX's caches and compiles every op once more)",
  )
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)

  configs = [c for c in CONFIGS if not args.only or args.only.lower() in c.name.lower()]
  if args.quick:
    configs = [c.quick() for c in configs]
  bandwidth = copy_bandwidth(32 if args.quick else 256)
  rows = []
  for r in range(args.rounds):
    first_call = args.first_call and r == 0  # compile times: measured once
    i = 0
    for name in args.dtypes:
      dtype = jnp.dtype(name).type
      for config in configs:
        print(f"{config.name} ({name}), round {r + 1} ...", file=sys.stderr, flush=True)
        row = run_config(config, dtype, args.impl, args.repeats, bandwidth, first_call)
        if r == 0:
          rows.append(row)
        else:
          keep_best(rows[i], row)
        i += 1

  where = machine()
  rounds = f", best of {args.rounds} rounds" if args.rounds > 1 else ""
  header = (
    f"roipool_jax {roipool_jax.__version__} on {where}, impl={args.impl}; median of "
    f"{args.repeats} after compilation{rounds}; measured copy bandwidth "
    f"{bandwidth / 1e9:.1f} GB/s"
  )
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / jax.default_backend()
  table = markdown(rows, header)
  print(table)
  stem.with_suffix(".md").write_text(table)
  stem.with_suffix(".json").write_text(
    json.dumps(dict(machine=where, bandwidth_gb_s=bandwidth / 1e9, rows=rows), indent=1)
  )
  plot(rows, stem.with_suffix(".png"), f"roipool_jax vs torchvision, {where}")
  return rows


if __name__ == "__main__":
  main()
