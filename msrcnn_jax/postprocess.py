"""Device outputs -> host records: paste masks to the original image, RLE.

The jitted detector returns fixed-size arrays (``MaskScoringRCNN.__call__``);
this module keeps the valid rows of each image, pastes the 28x28 masks onto
the original-size canvas exactly as mmdetection's ``_do_paste_mask`` (spec
§2.7, threshold >= 0.5) and RLE-encodes them.

A record (one image) is a dict:
  ``image_id`` int, ``file_name`` str, ``ori_shape`` (h, w),
  ``boxes (K, 4)`` float32 x1,y1,x2,y2 in original pixels,
  ``scores (K,)`` box scores, ``labels (K,)`` int 0..79,
  ``mask_iou (K,)`` predicted MaskIoU of the label,
  ``mask_scores (K,)`` = scores * mask_iou,
  ``masks`` list of K RLE dicts ``{'size': [h, w], 'counts': str}``,
ordered by descending box score, K <= 100.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from msrcnn_jax.ops.masks import encode_rle, paste_masks


def sigmoid(x: np.ndarray) -> np.ndarray:
  """float32 logistic function, stable for large |x|."""
  x = np.asarray(x, np.float32)
  return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))),
                  np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x)))).astype(
                      np.float32)


def outputs_to_records(outputs: dict[str, Any],
                       metas: Sequence[dict[str, Any]],
                       mask_thr: float = 0.5) -> list[dict[str, Any]]:
  """Converts a batch of detector outputs into per-image records.

  Args:
    outputs: the detector's output dict (numpy or jax arrays), batch-major.
    metas: one dict per batch entry with ``image_id``, ``file_name`` and
      ``ori_shape`` (h, w); entries past ``len(metas)`` (batch padding) are
      dropped.
    mask_thr: binarisation threshold of the pasted probabilities (>=).

  Returns:
    One record per meta (see the module docstring).
  """
  out = {k: np.asarray(outputs[k]) for k in (
      'boxes', 'scores', 'labels', 'valid', 'mask_logits', 'mask_iou',
      'mask_scores')}
  paste = np.asarray(outputs.get('paste_boxes', out['boxes']))
  records = []
  for b, meta in enumerate(metas):
    keep = np.nonzero(out['valid'][b])[0]
    h, w = (int(v) for v in meta['ori_shape'][:2])
    boxes = out['boxes'][b, keep].astype(np.float32)
    probs = sigmoid(out['mask_logits'][b, keep])
    bitmaps = paste_masks(probs, paste[b, keep].astype(np.float32), (h, w),
                          threshold=mask_thr)
    records.append(dict(
        image_id=meta.get('image_id', b),
        file_name=meta.get('file_name', ''),
        ori_shape=(h, w),
        boxes=boxes,
        scores=out['scores'][b, keep].astype(np.float32),
        labels=out['labels'][b, keep].astype(np.int64),
        mask_iou=out['mask_iou'][b, keep].astype(np.float32),
        mask_scores=out['mask_scores'][b, keep].astype(np.float32),
        masks=[encode_rle(np.asarray(m, bool)) for m in bitmaps],
    ))
  return records


def records_to_prediction_json(records: Sequence[dict[str, Any]],
                               category_ids: Sequence[int]) -> list[dict]:
  """The ``predict`` output format: one dict per detection.

  Keys: ``image`` (file name), ``label`` (0..79), ``category_id``,
  ``bbox`` [x, y, w, h] original pixels, ``score`` (box score), ``mask_iou``,
  ``mask_score`` (score x mask_iou), ``segmentation`` (RLE).
  """
  entries = []
  for rec in records:
    for i in range(len(rec['scores'])):
      x1, y1, x2, y2 = (float(v) for v in rec['boxes'][i])
      label = int(rec['labels'][i])
      entries.append(dict(
          image=rec['file_name'], label=label,
          category_id=int(category_ids[label]),
          bbox=[x1, y1, x2 - x1, y2 - y1],
          score=float(rec['scores'][i]),
          mask_iou=float(rec['mask_iou'][i]),
          mask_score=float(rec['mask_scores'][i]),
          segmentation=rec['masks'][i]))
  return entries
