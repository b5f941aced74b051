"""torchvision ``RoIHeads`` ``state_dict`` to the Flax parameters of :class:`heads.RoIHeads`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _linear(weight, bias):
  return {"kernel": np.asarray(weight).T, "bias": np.asarray(bias)}


def _conv(weight, bias):
  """``[out, in, kh, kw]`` (cross-correlation, as Flax) to ``[kh, kw, in, out]``."""
  return {"kernel": np.asarray(weight).transpose(2, 3, 1, 0), "bias": np.asarray(bias)}


def _conv_transpose(weight, bias):
  """``[in, out, kh, kw]`` to ``[kh, kw, in, out]``, spatially flipped.

  torch's transposed convolution is the adjoint of a convolution, which flips the kernel;
  ``nn.ConvTranspose(transpose_kernel=False)`` does not.
  """
  kernel = np.asarray(weight).transpose(2, 3, 0, 1)[::-1, ::-1]
  return {"kernel": np.ascontiguousarray(kernel), "bias": np.asarray(bias)}


def params_from_state_dict(state: Mapping[str, object]) -> dict:
  """Flax ``{"params": ...}`` for :class:`heads.RoIHeads` from torchvision's ``RoIHeads``.

  Accepts ``RoIHeads.state_dict()`` (tensors or arrays) or a whole ``MaskRCNN``/``FasterRCNN``
  ``state_dict`` (its ``roi_heads.`` entries are used). ``fc6``'s rows are reordered from
  torch's flattened ``(C, 7, 7)`` to the ``(7, 7, C)`` of NHWC pooled features.

  Raises:
    KeyError: a weight the heads need is missing (named).
  """
  state = {k: _numpy(v) for k, v in state.items()}
  if any(k.startswith("roi_heads.") for k in state):
    state = {k[len("roi_heads.") :]: v for k, v in state.items() if k.startswith("roi_heads.")}

  def get(name):
    if name not in state:
      raise KeyError(f"state_dict has no {name!r}; keys: {sorted(state)[:8]}...")
    return state[name]

  fc6 = get("box_head.fc6.weight")
  channels = fc6.shape[1] // 49
  fc6 = fc6.reshape(fc6.shape[0], channels, 7, 7).transpose(2, 3, 1, 0).reshape(-1, fc6.shape[0])
  params = {
    "box_head": {
      "fc6": {"kernel": fc6, "bias": get("box_head.fc6.bias")},
      "fc7": _linear(get("box_head.fc7.weight"), get("box_head.fc7.bias")),
    },
    "box_predictor": {
      name: _linear(get(f"box_predictor.{name}.weight"), get(f"box_predictor.{name}.bias"))
      for name in ("cls_score", "bbox_pred")
    },
  }
  if "mask_predictor.conv5_mask.weight" in state:
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("mask_head.")})
    params["mask_head"] = {
      str(i): _conv(get(f"mask_head.{i}.0.weight"), get(f"mask_head.{i}.0.bias")) for i in layers
    }
    params["mask_predictor"] = {
      "conv5_mask": _conv_transpose(
        get("mask_predictor.conv5_mask.weight"), get("mask_predictor.conv5_mask.bias")
      ),
      "mask_fcn_logits": _conv(
        get("mask_predictor.mask_fcn_logits.weight"), get("mask_predictor.mask_fcn_logits.bias")
      ),
    }
  return {"params": params}


def _numpy(value):
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)
