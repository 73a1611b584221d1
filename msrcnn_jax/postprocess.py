"""Device outputs -> host records: paste masks to the original image, RLE.

The jitted detector returns fixed-size arrays (``MaskScoringRCNN.__call__``);
this module keeps the valid rows of each image, pastes the 28x28 masks onto
the original-size canvas exactly as mmdetection's ``_do_paste_mask`` (spec
§2.7, threshold >= 0.5) and RLE-encodes them. Two ways, same RLE strings:

- on the device (``paste_on_device`` then ``encode_on_device``, jitted
  steps after the detector that leave its outputs as they are): masks
  pasted on a static
  canvas (the batch's largest original size rounded up to
  ``CANVAS_MULTIPLE``), turned into bit-packed run boundaries and
  compacted to their nonzero bytes, a fixed ``(capacity,)`` list per image
  (``capacity = K x canvas width``: 5 bytes per entry, 320 KB per image
  for 100 detections on a 640-wide canvas, the size of the 28x28 float32
  logits it replaces). The host only turns run boundaries into RLE strings
  (``ops.masks.rles_from_transitions``). An image with more nonzero bytes
  than the capacity is pasted on the host instead.
- on the host (``paste_masks``' box regions, RLE from the region's columns
  only), from the logits: used when the outputs carry no device-pasted
  masks.

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

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msrcnn_jax.ops.masks import compact_bytes
from msrcnn_jax.ops.masks import paste_mask_region
from msrcnn_jax.ops.masks import paste_masks_jnp
from msrcnn_jax.ops.masks import region_boundaries
from msrcnn_jax.ops.masks import rle_transitions_jnp
from msrcnn_jax.ops.masks import rles_from_boundaries
from msrcnn_jax.ops.masks import rles_from_transitions

# Device canvases are the batch's largest original (h, w) rounded up to this
# (bounds the number of compiled paste programs; a multiple of 8 for
# bit packing).
CANVAS_MULTIPLE = 64
# Larger canvases are pasted on the host (device memory: K x H x W floats).
MAX_DEVICE_CANVAS_PIXELS = 1600 * 1600
DEVICE_MASK_KEYS = ('rle_index', 'rle_value', 'rle_count')


def sigmoid(x: np.ndarray) -> np.ndarray:
  """float32 logistic function, stable for large |x|."""
  x = np.asarray(x, np.float32)
  return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))),
                  np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x)))).astype(
                      np.float32)


def canvas_size(ori_shapes) -> tuple[int, int] | None:
  """Static device canvas (H, W) for a batch's ``(B, 2)`` original sizes.

  The largest h and w rounded up to ``CANVAS_MULTIPLE``; None when that is
  more than ``MAX_DEVICE_CANVAS_PIXELS`` (paste on the host).
  """
  hw = np.asarray(ori_shapes).reshape(-1, 2).max(0)
  h, w = (int(-(-int(v) // CANVAS_MULTIPLE) * CANVAS_MULTIPLE) for v in hw)
  return None if h * w > MAX_DEVICE_CANVAS_PIXELS else (h, w)


def paste_on_device(outputs: dict[str, Any], ori_shape: jnp.ndarray,
                    canvas_hw: tuple[int, int], mask_thr: float = 0.5
                    ) -> jnp.ndarray:
  """Jit-able: the detector's masks pasted on a static canvas.

  Args:
    outputs: the detector's output dict (``mask_logits (B, K, m, m)``,
      ``paste_boxes`` or ``boxes (B, K, 4)`` original pixels, ``valid``).
    ori_shape: ``(B, 2)`` int32 original (h, w), each <= ``canvas_hw``.
    canvas_hw: static (H, W), multiples of 8 (``canvas_size``).
    mask_thr: binarisation threshold (>=).

  Returns:
    ``(B, K, H, W)`` bool, mmdetection's pasted masks (``paste_masks_jnp``)
    in the top-left ``ori_shape`` of the canvas; invalid detections empty.
    Run ``encode_on_device`` on it as a separate program (fused into one,
    XLA:CPU recomputes the paste for each consumer: 10x slower).
  """
  logits = outputs['mask_logits'].astype(jnp.float32)
  e = jnp.exp(-jnp.abs(logits))
  probs = jnp.where(logits >= 0, 1 / (1 + e), e / (1 + e))
  probs = probs * outputs['valid'][..., None, None]
  # Materialised: fused into the paste's gathers, the sigmoid would be
  # recomputed per canvas pixel.
  probs = jax.lax.optimization_barrier(probs)
  boxes = outputs.get('paste_boxes', outputs['boxes']).astype(jnp.float32)
  return jax.vmap(
      lambda p, b, hw: paste_masks_jnp(p, b, canvas_hw, mask_thr, valid_hw=hw)
  )(probs, boxes, ori_shape.astype(jnp.int32))


def encode_on_device(masks: jnp.ndarray, ori_shape: jnp.ndarray
                     ) -> dict[str, jnp.ndarray]:
  """Jit-able: pasted masks -> a fixed-size list of packed run boundaries.

  Args:
    masks: ``(B, K, H, W)`` bool from ``paste_on_device``.
    ori_shape: ``(B, 2)`` int32 original (h, w).

  Returns:
    ``rle_index (B, C) int32``, ``rle_value (B, C) uint8``, ``rle_count (B,)
    int32`` with ``C = K * W``: per image the nonzero bytes of
    ``rle_transitions_jnp`` (``compact_bytes``); a count above C means the
    list is cut short (that image is pasted on the host).
  """
  capacity = masks.shape[1] * masks.shape[3]
  ori_shape = ori_shape.astype(jnp.int32)
  per_image = [compact_bytes(rle_transitions_jnp(masks[b], ori_shape[b]),
                             capacity) for b in range(masks.shape[0])]
  idx, val, count = (jnp.stack(v) for v in zip(*per_image))
  return dict(rle_index=idx, rle_value=val, rle_count=count)


def outputs_to_records(outputs: dict[str, Any],
                       metas: Sequence[dict[str, Any]],
                       mask_thr: float = 0.5,
                       timings: dict[str, float] | None = None
                       ) -> list[dict[str, Any]]:
  """Converts a batch of detector outputs into per-image records.

  Args:
    outputs: the detector's output dict (numpy or jax arrays), batch-major,
      optionally with ``paste_on_device``'s keys and the ``canvas_hw`` they
      were computed on. An image's masks come from those keys when present
      and complete, else from ``mask_logits`` pasted on the host.
    metas: one dict per batch entry with ``image_id``, ``file_name`` and
      ``ori_shape`` (h, w); entries past ``len(metas)`` (batch padding) are
      dropped.
    mask_thr: binarisation threshold of the pasted probabilities (>=).
    timings: if given, CPU seconds of this thread are added under
      ``'paste'`` (host pasting) and ``'rle'`` (RLE strings).

  Returns:
    One record per meta (see the module docstring).

  Raises:
    KeyError: an image needs host pasting and ``mask_logits`` is absent.
  """
  out = {k: np.asarray(outputs[k]) for k in (
      'boxes', 'scores', 'labels', 'valid', 'mask_iou', 'mask_scores')}
  paste = np.asarray(outputs.get('paste_boxes', out['boxes']))
  on_device = all(k in outputs for k in DEVICE_MASK_KEYS)
  timings = {} if timings is None else timings
  records = []
  for b, meta in enumerate(metas):
    keep = np.nonzero(out['valid'][b])[0]
    h, w = (int(v) for v in meta['ori_shape'][:2])
    t = time.thread_time()
    if on_device and outputs['rle_count'][b] <= outputs['rle_index'].shape[1]:
      n = int(outputs['rle_count'][b])
      rles = rles_from_transitions(
          outputs['rle_index'][b, :n], outputs['rle_value'][b, :n],
          tuple(outputs['canvas_hw'])[::-1], (h, w),
          int(keep[-1]) + 1 if len(keep) else 0)
      masks = [rles[i] for i in keep]
      timings['rle'] = timings.get('rle', 0.) + time.thread_time() - t
    else:
      # paste_masks, kept to each box's region: the RLE only reads that.
      probs = sigmoid(np.asarray(outputs['mask_logits'][b])[keep])
      regions = [paste_mask_region(p, box, (h, w)) for p, box in
                 zip(probs, paste[b, keep].astype(np.float32))]
      t1 = time.thread_time()
      masks = rles_from_boundaries(
          [region_boundaries(v >= mask_thr, (r[0], r[2]), (h, w))
           for v, r in regions], (h, w))
      timings['paste'] = timings.get('paste', 0.) + t1 - t
      timings['rle'] = timings.get('rle', 0.) + time.thread_time() - t1
    records.append(dict(
        image_id=meta.get('image_id', b),
        file_name=meta.get('file_name', ''),
        ori_shape=(h, w),
        boxes=out['boxes'][b, keep].astype(np.float32),
        scores=out['scores'][b, keep].astype(np.float32),
        labels=out['labels'][b, keep].astype(np.int64),
        mask_iou=out['mask_iou'][b, keep].astype(np.float32),
        mask_scores=out['mask_scores'][b, keep].astype(np.float32),
        masks=masks,
    ))
  return records


def host_records(outputs: dict[str, Any], metas: Sequence[dict[str, Any]],
                 mask_thr: float = 0.5
                 ) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """``outputs_to_records`` plus its CPU timings (a worker-process job).

  Returns:
    (records, CPU seconds: ``paste``, ``rle`` and ``postprocess``, the
    whole call).
  """
  timings: dict[str, float] = {}
  t = time.thread_time()
  records = outputs_to_records(outputs, metas, mask_thr, timings)
  timings['postprocess'] = time.thread_time() - t
  return records, timings


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
