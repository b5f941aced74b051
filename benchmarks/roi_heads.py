"""Mask R-CNN's RoI stage end to end: the Flax port (examples/torchvision_heads) against
torchvision, in one process, on the same inputs and weights.

torchvision's ``maskrcnn_resnet50_fpn`` sizes (256-channel FPN, 1024-wide box head, four
256-channel mask convolutions, 91 classes), 2 images with 1000 proposals each, with two sets of
seeded weights: as initialised (few scores pass the 0.05 threshold: few detections), and with
eight classes favoured so that each image gives the full 100 detections, as a trained COCO
model does. Timed, after a warm-up (``common.median_ms``), as the median of ``--repeats`` calls:

- ``heads``: box branch, detections (decode, clip, threshold, per-class NMS, top 100) and the
  mask branch on the detections: ``RoIHeads.forward`` in eval mode;
- ``heads + paste``: the same, then the transform's postprocess (boxes resized to the original
  images, masks pasted into them).

The script also checks that both give the same detections. Run from the repo root (needs
torch): ``python benchmarks/roi_heads.py``. Writes ``benchmarks/results/roi_heads_cpu.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402
from examples.torchvision_heads import convert, heads, postprocess  # noqa: E402
from examples.torchvision_heads import torch_reference as ref  # noqa: E402

IMAGE_SHAPES = [(800, 1216), (800, 1067)]
ORIGINAL_SIZES = [(480, 730), (600, 800)]


def measure(sizes, busy, proposal_count, repeats):
  """``(rows, same detections, max box error, detection counts, first call s)``."""
  rng = np.random.default_rng(0)
  torch_heads = ref.build_roi_heads(**sizes)
  if busy:  # eight classes favoured: about 0.1 each, so every proposal gives 8 candidates
    with torch.no_grad():
      torch_heads.box_predictor.cls_score.bias[1:9] += 4.5
  features, proposals = ref.make_inputs(rng, IMAGE_SHAPES, sizes["channels"], proposal_count)
  model = heads.RoIHeads(
    num_classes=sizes["num_classes"],
    representation_size=sizes["representation_size"],
    mask_layers=sizes["mask_layers"],
    mask_dim_reduced=sizes["dim_reduced"],
  )
  params = convert.params_from_state_dict(torch_heads.state_dict())
  image_size = tuple(max(s[i] for s in IMAGE_SHAPES) for i in range(2))
  shapes = np.array(IMAGE_SHAPES)

  @jax.jit
  def run_heads(params, features, proposals, shapes):
    return model.apply(params, features, proposals, shapes, image_size=image_size)

  @jax.jit
  def run_all(params, features, proposals, shapes):
    found = run_heads(params, features, proposals, shapes)
    pasted = []
    for i, original in enumerate(ORIGINAL_SIZES):
      boxes = postprocess.resize_boxes(found.boxes[i], shapes[i], original)
      pasted.append(postprocess.paste_masks_in_image(found.masks[i], boxes, original))
    return found, pasted

  args_jax = (params, [jax.device_put(f) for f in features], proposals, shapes)
  start = time.perf_counter()
  found = jax.block_until_ready(run_heads(*args_jax))
  first_call = time.perf_counter() - start
  jax.block_until_ready(run_all(*args_jax))

  torch_args = ref.torch_inputs(features, proposals)  # converted once, as jax's are placed once

  def torch_heads_only():
    with torch.no_grad():
      return torch_heads(*torch_args, IMAGE_SHAPES)[0]

  def torch_all():
    return ref.paste(torch_heads_only(), IMAGE_SHAPES, ORIGINAL_SIZES)

  expected = torch_heads_only()
  same = all(
    int(found.valid[i].sum()) == len(r["labels"])
    and np.array_equal(np.asarray(found.labels[i, : len(r["labels"])]), r["labels"].numpy())
    for i, r in enumerate(expected)
  )
  box_error = max(
    float(np.abs(np.asarray(found.boxes[i, : len(r["boxes"])]) - r["boxes"].numpy()).max())
    for i, r in enumerate(expected)
  )

  rows = []
  for name, ours, theirs in [
    ("heads", lambda: jax.block_until_ready(run_heads(*args_jax)), torch_heads_only),
    ("heads + paste", lambda: jax.block_until_ready(run_all(*args_jax)), torch_all),
  ]:
    jax_ms = common.median_ms(ours, repeats)
    torch_ms = common.median_ms(theirs, repeats)
    rows.append((name, jax_ms, torch_ms))

  counts = [len(r["labels"]) for r in expected]
  return rows, same, box_error, counts, first_call


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--proposals", type=int, default=1000)
  parser.add_argument("--small", action="store_true", help="narrow layers (a smoke test)")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = parser.parse_args(argv)
  sizes = ref.SMALL if args.small else ref.FULL

  machine = common.machine()
  lines = [
    f"Mask R-CNN RoI heads, {'narrow' if args.small else 'maskrcnn_resnet50_fpn'} sizes: "
    f"2 images ({IMAGE_SHAPES[0][0]}x{IMAGE_SHAPES[0][1]} and {IMAGE_SHAPES[1][0]}x"
    f"{IMAGE_SHAPES[1][1]}), {args.proposals} proposals each, {sizes['num_classes']} classes. "
    f"{machine}; torch {torch.__version__}, {torch.get_num_threads()} "
    f"torch threads; median of {args.repeats}.",
    "",
    "| weights | detections | stage | roipool_jax (jit) | torchvision | speed-up |",
    "|---|---|---|---|---|---|",
  ]
  notes = []
  for busy in (False, True):
    rows, same, box_error, counts, first_call = measure(sizes, busy, args.proposals, args.repeats)
    weights = "8 classes favoured" if busy else "as initialised"
    found = " + ".join(str(c) for c in counts)
    for n, a, b in rows:
      lines.append(f"| {weights} | {found} | {n} | {a:.0f} ms | {b:.0f} ms | {b / a:.2f}x |")
    notes.append(
      f"{weights}: same detections as torchvision: {'yes' if same else 'NO'} (labels and "
      f"counts; boxes within {box_error:.1e} px); first call (compile + run) {first_call:.1f} s."
    )
  lines += ["", *notes]
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.small:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roi_heads_cpu.md").write_text(text)


if __name__ == "__main__":
  main()
