"""Generation with free attention masks (DESIGN.md §4): sampling, map capture, mask post-processing, shards.

Modules (imported on demand; importing this package pulls in neither diffusers nor transformers):

* ``models``: :func:`~freeatm_fast.generate.models.load_pipeline` (SD 1.x/2.x from a folder or hub id, or the
  offline ``tiny-random`` pipeline) and :func:`~freeatm_fast.generate.models.set_scheduler` (DDIM / DPM-Solver++).
* ``capture``: :class:`~freeatm_fast.generate.capture.MapCapture`, which routes every cross-attention layer of a UNet
  through ``freeatm_kernels.cross_attention_with_maps`` and keeps one accumulator per resolution.
* ``aggregate``: :func:`~freeatm_fast.generate.aggregate.aggregate`, the recipe from per-resolution maps to soft and
  binary masks, boxes, areas, scores and patch importance.
* ``prompts``: object words and their token spans.
"""
