r"""Run a converted or trained MS R-CNN on images.

  python -m msrcnn_jax.predict --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ckpt/ms_rcnn_r50_caffe_fpn_1x_coco --output results.json \
      [--vis-dir vis/] [--batch-size 2] image1.jpg image2.png ...

Writes a JSON list with one entry per detection: ``image`` (file name),
``label`` (0..79), ``category_id``, ``bbox`` [x, y, w, h] in original pixels,
``score`` (box score), ``mask_iou`` (predicted MaskIoU), ``mask_score``
(score x mask_iou) and ``segmentation`` (COCO RLE at the original size).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from msrcnn_jax.data import image_io
from msrcnn_jax.data import transforms
from msrcnn_jax.modeling.detector import MaskScoringRCNN
from msrcnn_jax import postprocess

_BATCH_KEYS = ('image', 'img_shape', 'pad_shape', 'scale_factor')


class Predictor:
  """A jitted detector: one compiled program per (batch, bucket) shape.

  Args:
    config: the model config (``model``, ``test`` and ``data`` are read).
    variables: ``{'params': ..., 'batch_stats': ...}``.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict):
    self.config = config
    self.model = MaskScoringRCNN(config)
    self.variables = variables

    def forward(variables, image, img_shape, pad_shape, scale_factor):
      return self.model.apply(variables, image, img_shape, pad_shape,
                              scale_factor)
    self._forward = jax.jit(forward)

  def predict_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Detector outputs (numpy) for a padded batch (keys as the pipeline's)."""
    out = self._forward(self.variables, *(batch[k] for k in _BATCH_KEYS))
    return jax.device_get(out)

  def predict_batches(self, batches: Iterable[dict[str, Any]]
                      ) -> Iterator[dict[str, Any]]:
    """Records of every valid image of every batch, in order.

    Each batch holds the arrays of ``_BATCH_KEYS`` plus ``ori_shape``,
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
    bucket and runs ``paths``. Returns one record per path, in order."""
    items = []
    for i, path in enumerate(paths):
      img = image_io.read_image(path)
      item = transforms.preprocess_test(img, self.config.data)
      item['image_id'] = i
      item['file_name'] = os.path.basename(path)
      items.append(item)
    records: dict[int, dict] = {}
    bar = tqdm.tqdm(total=len(items), disable=not progress, unit='img',
                    desc='predict')
    for batch in batch_by_bucket(items, batch_size, self.config.data):
      for rec in self.predict_batches([batch]):
        records[rec['image_id']] = rec
        bar.update(1)
    bar.close()
    return [records[i] for i in range(len(items))]


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
          image=np.stack([transforms.pad_to(it['image'], bucket)
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


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Model config file (configs/<name>.py).')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Converted or trained checkpoint directory.')
_OUTPUT = flags.DEFINE_string('output', 'results.json', 'Output JSON file.')
_VIS_DIR = flags.DEFINE_string(
    'vis_dir', None, 'If set, write a PNG per image with masks, boxes, '
    'class names and both scores.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 1, 'Images per batch.')
_VIS_THR = flags.DEFINE_float('vis_score_thr', 0.3,
                              'Box score threshold for the pictures.')


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError('Give at least one image path.')
  config = _CONFIG.value
  if config is None or _CHECKPOINT.value is None:
    raise app.UsageError('--config and --checkpoint are required.')
  from msrcnn_jax.convert.checkpoint_io import load_variables
  from msrcnn_jax.modeling.build import check_variables
  variables, meta = load_variables(_CHECKPOINT.value)
  check_variables(config, variables, source=_CHECKPOINT.value)
  logging.info('Loaded %s (%s)', _CHECKPOINT.value, meta.get('config_name'))
  predictor = Predictor(config, variables)
  records = predictor.predict_images(paths, batch_size=_BATCH_SIZE.value)
  entries = postprocess.records_to_prediction_json(
      records, config.data.category_ids)
  out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  os.makedirs(out_dir, exist_ok=True)
  tmp = _OUTPUT.value + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(entries, f)
  os.replace(tmp, _OUTPUT.value)
  print(f'{len(entries)} detections on {len(paths)} images -> '
        f'{_OUTPUT.value}')
  if _VIS_DIR.value:
    from msrcnn_jax.evaluation import visualize
    os.makedirs(_VIS_DIR.value, exist_ok=True)
    for path, rec in zip(paths, records):
      rgb = image_io.read_image(path)[..., ::-1]
      name = os.path.splitext(os.path.basename(path))[0] + '.png'
      visualize.save_visualization(
          os.path.join(_VIS_DIR.value, name), rgb, rec,
          class_names=config.data.class_names, score_thr=_VIS_THR.value)
    print(f'pictures -> {_VIS_DIR.value}')


if __name__ == '__main__':
  app.run(main)
