"""``python -m roipool_jax``: the article's worked example, step by step.

Reproduces "Understanding Region of Interest (RoI Pooling)" (the article this
library starts from): a 512x512x3 image, a VGG16 feature map of 16x16x512
(scale 1/32), one RoI at (x=296, y=192) of width 200 and height 145, 3x3 RoI
max pooling. Every number printed comes from the library's own bin geometry
and ``roi_pool``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src.roi_pool import pool_bins, roi_pool

IMAGE, MAP, CHANNELS, SCALE, OUT = 512, 16, 512, 1 / 32, 3
X, Y, W, H = 296.0, 192.0, 200.0, 145.0


def _bins(box, quantization):
  flat = boxes_lib.flatten_boxes(box, None, 1)
  b = pool_bins(flat, (OUT, OUT), SCALE, quantization, (MAP, MAP))
  rows = list(
    zip(np.asarray(b.row_start[0]).tolist(), np.asarray(b.row_end[0]).tolist(), strict=True)
  )
  cols = list(
    zip(np.asarray(b.col_start[0]).tolist(), np.asarray(b.col_end[0]).tolist(), strict=True)
  )
  return rows, cols


def _grid(rows, cols, true_box, span):
  """ASCII picture of the map around the RoI: bins numbered 1..9."""
  x1, y1, x2, y2 = true_box
  label = {}
  for i, (r0, r1) in enumerate(rows):
    for j, (c0, c1) in enumerate(cols):
      for r in range(r0, r1):
        for c in range(c0, c1):
          label.setdefault((r, c), str(i * OUT + j + 1))
  (r_lo, r_hi), (c_lo, c_hi) = span
  lines = ["      " + "".join(f"{c:>3}" for c in range(c_lo, c_hi))]
  for r in range(r_lo, r_hi):
    cells = []
    for c in range(c_lo, c_hi):
      covered = c + 1 > x1 and c < x2 and r + 1 > y1 and r < y2
      cells.append(label.get((r, c), "x" if covered else "."))
    lines.append(f"  {r:>3} " + "".join(f"{s:>3}" for s in cells))
  return "\n".join(lines)


def main() -> None:
  print("RoI pooling, worked example (Fast R-CNN, VGG16)")
  print("=" * 60)
  print(
    f"image {IMAGE}x{IMAGE}x3 -> VGG16 conv5 feature map {MAP}x{MAP}x{CHANNELS} "
    f"(scale 1/{round(1 / SCALE)}: {IMAGE}/{round(1 / SCALE)} = {MAP})"
  )
  print(
    f"RoI: top-left (x={X:.0f}, y={Y:.0f}), width {W:.0f}, height {H:.0f}"
    f"  -> box (x1, y1, x2, y2) = ({X:.0f}, {Y:.0f}, {X + W:.0f}, {Y + H:.0f})"
  )
  print("\nOn the feature map (divide by 32):")
  floored = {}
  for name, value in (("x", X), ("y", Y), ("width", W), ("height", H)):
    floored[name] = int(np.floor(value * SCALE))
    print(f"  {name:>6}: {value:.0f}/32 = {value * SCALE:.2f}  -> floor {floored[name]}")
  qx, qy, qw, qh = floored["x"], floored["y"], floored["width"], floored["height"]

  box = jnp.array([[X, Y, X + W, Y + H]])
  true_cells = (X * SCALE, Y * SCALE, (X + W) * SCALE, (Y + H) * SCALE)
  span = ((4, 13), (7, MAP))
  rows, cols = _bins(box, "floor")
  print(f'\nquantization="floor" (the article): RoI at x={qx}, y={qy}, {qw} wide, {qh} high;')
  print(
    f"3x3 bins of {rows[0][1] - rows[0][0]} row x {cols[0][1] - cols[0][0]} columns "
    f"({qh} // {OUT} = {qh // OUT}, {qw} // {OUT} = {qw // OUT}). Rows {rows}, columns {cols}."
  )
  print("Cells by bin (1..9); x = covered by the true RoI but never read; . = outside:")
  print(_grid(rows, cols, true_cells, span))
  print("Row 9 is inside the quantized RoI but no bin reads it: the lost bottom row.")

  true_area = W * H * SCALE**2
  quantized_area = qw * qh
  pooled_area = OUT * OUT * (rows[0][1] - rows[0][0]) * (cols[0][1] - cols[0][0])
  overlap_w = min(true_cells[2], qx + qw) - max(true_cells[0], qx)
  overlap_h = min(true_cells[3], qy + qh) - max(true_cells[1], qy)
  overlap = overlap_w * overlap_h
  print(
    f"\nArea in cells: true RoI {true_area:.2f}; quantized {quantized_area} "
    f"(lost {true_area - overlap:.2f}, gained {quantized_area - overlap:.2f}); "
    f"read by the 3x3 bins {pooled_area}."
  )

  features = jax.random.normal(jax.random.key(0), (1, MAP, MAP, CHANNELS))
  features = jax.nn.relu(features)  # conv5 features are post-ReLU
  pooled = roi_pool(features, box, OUT, spatial_scale=SCALE, quantization="floor")
  print(
    f"\nroi_pool(features {features.shape}, box, {OUT}, spatial_scale=1/32, "
    f'quantization="floor") -> {pooled.shape[1:]} per RoI'
  )
  print("channel 0 of the map around the RoI (rows 6-9, columns 9-14):")
  print(np.array2string(np.asarray(features[0, 6:10, 9:15, 0]), precision=2, suppress_small=True))
  print("channel 0 of the pooled 3x3 output (max of each 1x2 bin; row 9 never read):")
  print(np.array2string(np.asarray(pooled[0, :, :, 0]), precision=2, suppress_small=True))

  rows_r, cols_r = _bins(box, "round")
  print('\nquantization="round" (default; torchvision / Caffe): corners are rounded, not floored:')
  scaled = np.asarray(boxes_lib.scale_coords(box, SCALE))[0]
  corners = np.asarray(boxes_lib.round_half_away(scaled)).astype(int)
  print(
    "  "
    + ", ".join(
      f"{n} = round({v:.2f}) = {c}"
      for n, v, c in zip(("x1", "y1", "x2", "y2"), scaled, corners, strict=True)
    )
    + " (inclusive)"
  )
  roi_w, roi_h = corners[2] - corners[0] + 1, corners[3] - corners[1] + 1
  print(
    f"  RoI {roi_w} cells wide, {roi_h} high; bins of {roi_w}/{OUT} = {roi_w / OUT:.2f} columns "
    f"and {roi_h}/{OUT} = {roi_h / OUT:.2f} rows, edges floored/"
  )
  print(f"  ceiled so neighbours may share a column. Rows {rows_r}, columns {cols_r}")
  print("  (column 16 lies off the 16-wide map and is clipped; a shared cell shows its first bin):")
  print(_grid(rows_r, cols_r, true_cells, span))
  print("  Every covered cell is read (nothing lost), but whole cells are: row 11 and column 9")
  print("  lie partly outside the true box (gained). roi_align samples the exact box instead.")
  pooled_r = roi_pool(features, box, OUT, spatial_scale=SCALE)
  print("channel 0 of the pooled output:")
  print(np.array2string(np.asarray(pooled_r[0, :, :, 0]), precision=2, suppress_small=True))
