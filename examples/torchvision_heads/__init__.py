"""torchvision's Faster/Mask R-CNN RoI heads (``RoIHeads`` with FPN) in Flax, on roipool_jax.

- :mod:`.heads`: the Linen modules, named as torchvision's ``state_dict``;
- :mod:`.postprocess`: box coding, NMS, detections and mask pasting with static shapes;
- :mod:`.losses`: ``fastrcnn_loss`` and ``maskrcnn_loss``;
- :mod:`.convert`: a torchvision ``state_dict`` to Flax parameters;
- :mod:`.torch_reference`: torchvision's side, for the fixture, the notebook and the benchmark
  (the only module that imports torch).
"""
