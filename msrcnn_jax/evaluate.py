r"""COCO evaluation of a converted or trained checkpoint.

  python -m msrcnn_jax.evaluate --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --checkpoint ckpt/ms_rcnn_r50_caffe_fpn_1x_coco --coco-dir /data/coco \
      [--split val2017] [--max-images N] [--batch-size 1] --output metrics.json

Runs inference over the split (progress bar), writes the COCO results files
(bbox entries scored by the box score, segm entries by the mask score, as
mmdetection 2.x does) and ``metrics.json`` with mmdetection's key names
(``bbox_mAP``, ``bbox_mAP_50``, ..., ``segm_mAP_l``), prints pycocotools'
table, and writes the mask-scoring report (``mask_scoring_report.json`` and
a scatter PNG) beside ``metrics.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from msrcnn_jax.data import pipeline
from msrcnn_jax.evaluation.coco_evaluator import CocoEvaluator
from msrcnn_jax.inference import Predictor


class _Subset:
  """The first ``n`` records of a source (``--max-images``)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]

  def image_sizes(self):
    return pipeline.image_sizes(self.source)[:self.n]


def coco_ground_truth(source) -> Any:
  """The pycocotools ``COCO`` of a source: its own, or built from records.

  Sources without annotation files (the synthetic one) are turned into an
  in-memory COCO dataset from their exact instance masks.
  """
  if getattr(source, 'coco', None) is not None:
    return source.coco
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  cat_ids = list(source.cat_ids)
  images, anns = [], []
  for i in range(len(source)):
    r = source[i]
    images.append(dict(id=int(r['image_id']), file_name=r['file_name'],
                       height=int(r['height']), width=int(r['width'])))
    for m, b, l in zip(r['masks'], r['boxes'], r['labels']):
      rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
      rle['counts'] = rle['counts'].decode('ascii')
      x1, y1, x2, y2 = (float(v) for v in b)
      anns.append(dict(id=len(anns) + 1, image_id=int(r['image_id']),
                       category_id=int(cat_ids[int(l)]),
                       bbox=[x1, y1, x2 - x1, y2 - y1],
                       area=float(m.sum()), iscrowd=0, segmentation=rle))
  cats = [dict(id=int(c), name=str(n)) for c, n in
          zip(cat_ids, getattr(source, 'class_names', cat_ids))]
  coco = COCO()
  coco.dataset = dict(images=images, annotations=anns, categories=cats)
  coco.createIndex()
  return coco


def evaluate_model(config: ml_collections.ConfigDict, variables: dict,
                   output_dir: str, source=None, max_images: int = 0,
                   batch_size: int | None = None, progress: bool = True,
                   predictor: Predictor | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Inference + COCO evaluation + mask-scoring report over a split.

  Args:
    config: the full config; ``config.data`` selects the evaluation source.
    variables: model variables.
    output_dir: where results files, ``metrics.json`` and the report go.
    source: records to evaluate (default: the config's evaluation split).
    max_images: evaluate only the first N images (0 = all).
    batch_size: images per batch (default ``config.test.batch_size``).
    progress: show a progress bar.
    predictor: reuse a compiled predictor.

  Returns:
    (metrics dict with mmdetection's key names and ``mask_scoring`` summary,
    the per-image records).
  """
  if source is None:
    source = pipeline.build_source(config, train=False)
  if max_images:
    source = _Subset(source, max_images)
  coco_gt = coco_ground_truth(source.source if isinstance(source, _Subset)
                              else source)
  cat_ids = list(getattr(source.source if isinstance(source, _Subset)
                         else source, 'cat_ids', config.data.category_ids))
  predictor = predictor or Predictor(config, variables)
  batches = pipeline.make_eval_iterator(
      config, source, batch_size_per_host=batch_size)
  evaluator = CocoEvaluator(coco_gt, cat_ids, output_dir=output_dir,
                            prefix='results')
  records = []
  bar = tqdm.tqdm(total=len(source), disable=not progress, unit='img',
                  desc='evaluate')
  try:
    for rec in predictor.predict_batches(batches):
      records.append(rec)
      evaluator.add([rec])
      bar.update(1)
  finally:
    bar.close()
    batches.close()
  metrics = evaluator.evaluate()
  summary, log = evaluator.mask_scoring_report()
  logging.info('%s', log)
  print(log)
  metrics['mask_scoring'] = summary
  if output_dir:
    _write_json(os.path.join(output_dir, 'metrics.json'), metrics)
  return metrics, records


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Model config file (configs/<name>.py).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Converted or trained checkpoint directory.')
_COCO_DIR = flags.DEFINE_string('coco-dir', None, 'Local COCO directory.')
_SPLIT = flags.DEFINE_string('split', 'val2017', 'Split to evaluate.')
_MAX_IMAGES = flags.DEFINE_integer('max-images', 0, '0 = the whole split.')
_BATCH_SIZE = flags.DEFINE_integer('batch-size', 1, 'Images per batch.')
_OUTPUT = flags.DEFINE_string('output', 'metrics.json', 'Metrics JSON path.')


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  if config is None or not _CHECKPOINT.value or not _COCO_DIR.value:
    raise app.UsageError('--config, --checkpoint and --coco-dir are required.')
  from msrcnn_jax.convert.checkpoint_io import load_variables  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.modeling.build import check_variables  # pylint: disable=g-import-not-at-top
  variables, _ = load_variables(_CHECKPOINT.value)
  check_variables(config, variables, source=_CHECKPOINT.value)
  with config.unlocked():
    config.data.source = 'coco'
    config.data.coco_dir = _COCO_DIR.value
    config.data.val_split = _SPLIT.value
  output_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  os.makedirs(output_dir, exist_ok=True)
  metrics, _ = evaluate_model(config, variables, output_dir,
                              max_images=_MAX_IMAGES.value,
                              batch_size=_BATCH_SIZE.value)
  if os.path.abspath(_OUTPUT.value) != os.path.join(output_dir,
                                                    'metrics.json'):
    _write_json(_OUTPUT.value, metrics)
  print(json.dumps({k: v for k, v in metrics.items()
                    if k.endswith(('mAP', '_50', '_75', '_s', '_m', '_l'))}))


if __name__ == '__main__':
  app.run(main)
