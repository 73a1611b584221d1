"""Batched, jitted inference: preprocessed images in, per-image records out.

``Predictor`` compiles the detector once per (batch size, bucket) shape and
turns its fixed-size outputs into host records (``postprocess``): boxes in
original pixels, box scores, labels, MaskIoU, mask scores and RLE masks.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from msrcnn_jax import postprocess
from msrcnn_jax.data import image_io
from msrcnn_jax.data import transforms

# The detector's inputs, in order (the pipeline's keys).
BATCH_KEYS = ('image', 'img_shape', 'pad_shape', 'scale_factor')


class Predictor:
  """A jitted detector: one compiled program per (batch, bucket) shape.

  Args:
    config: the model config (``model``, ``test`` and ``data`` are read).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    dtype: compute dtype of convolutions and dense layers (``bfloat16``
      runs them in bf16 on float32 variables; outputs stay float32).

  Attributes:
    forward: the jitted detector, ``forward(variables, image, img_shape,
      pad_shape, scale_factor) -> outputs`` (``MaskScoringRCNN.__call__``:
      fixed-size detections, mask logits, MaskIoU); what ``msrcnn_jax.export``
      serializes.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict,
               dtype: Any = 'float32'):
    # Imported here so that ``serving`` (exported programs) runs without it.
    from msrcnn_jax.modeling.detector import MaskScoringRCNN  # pylint: disable=g-import-not-at-top
    self.config = config
    self.model = MaskScoringRCNN(config, dtype=jax.numpy.dtype(dtype))
    self.variables = variables

    def forward(variables, image, img_shape, pad_shape, scale_factor):
      return self.model.apply(variables, image, img_shape, pad_shape,
                              scale_factor)
    self.forward = jax.jit(forward)

  def predict_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Detector outputs (numpy) for a padded batch (keys as the pipeline's)."""
    out = self.forward(self.variables, *(batch[k] for k in BATCH_KEYS))
    return jax.device_get(out)

  def predict_batches(self, batches: Iterable[dict[str, Any]]
                      ) -> Iterator[dict[str, Any]]:
    """Records of every valid image of every batch, in order.

    Each batch holds the arrays of ``BATCH_KEYS`` plus ``ori_shape``,
    ``image_id``, optional ``file_name`` (list) and ``valid`` (B,) flags.
    """
    thr = self.config.test.rcnn.mask_thr_binary
    for batch in batches:
      out = self.predict_batch(batch)
      n = len(batch['image'])
      valid = np.asarray(batch.get('valid', np.ones(n, bool)))
      names = batch.get('file_name', [''] * n)
      metas = [dict(image_id=int(batch['image_id'][i]) if 'image_id' in batch
                    else i, file_name=names[i],
                    ori_shape=tuple(batch['ori_shape'][i]))
               for i in range(n)]
      records = postprocess.outputs_to_records(out, metas, mask_thr=thr)
      for i, rec in enumerate(records):
        if valid[i]:
          yield rec

  def predict_images(self, paths: Sequence[str], batch_size: int = 1,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Reads, preprocesses (as mmdetection's test pipeline), batches by
    bucket and runs ``paths``. Returns one record per path, in order.

    Images are read as they are needed: a batch runs as soon as
    ``batch_size`` images of one bucket are waiting, so at most
    ``batch_size`` preprocessed images per bucket are held in memory
    (the records, with RLE masks, are kept for all).
    """
    records: dict[int, dict] = {}
    pending: dict[tuple, list] = {}
    bar = tqdm.tqdm(total=len(paths), disable=not progress, unit='img',
                    desc='predict')

    def run(group):
      for batch in batch_by_bucket(group, batch_size, self.config.data):
        for rec in self.predict_batches([batch]):
          records[rec['image_id']] = rec
          bar.update(1)

    try:
      for i, path in enumerate(paths):
        item = transforms.preprocess_test(image_io.imread(path),
                                          self.config.data)
        item['image_id'] = i
        item['file_name'] = os.path.basename(path)
        bucket = tuple(transforms.choose_bucket(item['pad_shape'],
                                                self.config.data.buckets))
        group = pending.setdefault(bucket, [])
        group.append(item)
        if len(group) == batch_size:
          run(pending.pop(bucket))
      for group in pending.values():
        run(group)
    finally:
      bar.close()
    return [records[i] for i in range(len(paths))]


def batch_by_bucket(items: Sequence[dict[str, Any]], batch_size: int,
                    data_cfg: ml_collections.ConfigDict
                    ) -> Iterator[dict[str, Any]]:
  """Groups preprocessed test items into fixed-shape batches.

  Items in the same shape bucket are batched together (order kept within a
  bucket); a short last batch is padded with copies of its first item and
  ``valid`` False.
  """
  groups: dict[tuple, list] = {}
  for item in items:
    bucket = transforms.choose_bucket(item['pad_shape'], data_cfg.buckets)
    groups.setdefault(tuple(bucket), []).append(item)
  for bucket, group in groups.items():
    for start in range(0, len(group), batch_size):
      chunk = group[start:start + batch_size]
      n = len(chunk)
      chunk = chunk + [chunk[0]] * (batch_size - n)
      batch = dict(
          image=np.stack([transforms.pad_image(it["image"], bucket)
                          for it in chunk]),
          img_shape=np.stack([it['img_shape'] for it in chunk]).astype(
              np.int32),
          pad_shape=np.stack([it['pad_shape'] for it in chunk]).astype(
              np.int32),
          scale_factor=np.stack([it['scale_factor'] for it in chunk]).astype(
              np.float32),
          ori_shape=np.stack([it['ori_shape'] for it in chunk]).astype(
              np.int32),
          image_id=np.asarray([it['image_id'] for it in chunk], np.int64),
          file_name=[it['file_name'] for it in chunk],
          valid=np.arange(batch_size) < n)
      yield batch
