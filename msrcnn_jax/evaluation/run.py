"""Inference over an evaluation split + COCO metrics + mask-scoring report.

``evaluate_model`` is what ``python -m msrcnn_jax.evaluate`` and the
periodic/final evaluation of ``train.py`` run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tqdm

from msrcnn_jax import config as config_lib
from msrcnn_jax.data import pipeline
from msrcnn_jax.evaluation import mask_scoring_report
from msrcnn_jax.evaluation.coco_evaluator import CocoEvaluator
from msrcnn_jax.evaluation.coco_evaluator import load_results
from msrcnn_jax.evaluation.coco_evaluator import write_json
from msrcnn_jax.inference import Predictor
from msrcnn_jax.ops.masks import encode_rle


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


def keep_known_labels(record: dict[str, Any], num_categories: int
                      ) -> tuple[dict[str, Any], int]:
  """Drops the detections whose label has no category in the dataset.

  Labels index the dataset's sorted category ids (as the data pipeline
  assigns them in training), so a model with more classes than the dataset
  has categories (e.g. a COCO-80 model on the 3-category synthetic set) can
  predict labels ``>= num_categories`` that name no category; they are not
  evaluated.

  Args:
    record: a per-image record (``postprocess`` module docstring).
    num_categories: number of categories of the evaluated dataset.

  Returns:
    (the record with only labels ``< num_categories``, number dropped).
  """
  labels = np.asarray(record['labels'])
  keep = labels < num_categories
  if keep.all():
    return record, 0
  out = dict(record)
  for k in ('boxes', 'scores', 'labels', 'mask_iou', 'mask_scores'):
    if k in record:
      out[k] = np.asarray(record[k])[keep]
  if 'masks' in record:
    out['masks'] = [m for m, k in zip(record['masks'], keep) if k]
  return out, int((~keep).sum())


def coco_ground_truth(source) -> Any:
  """The pycocotools ``COCO`` of a source: its own, or built from records.

  Sources without annotation files (the synthetic one) are turned into an
  in-memory COCO dataset from their exact instance masks.
  """
  if getattr(source, 'coco', None) is not None:
    return source.coco
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  cat_ids = list(source.cat_ids)
  images, anns = [], []
  for i in range(len(source)):
    r = source[i]
    images.append(dict(id=int(r['image_id']), file_name=r['file_name'],
                       height=int(r['height']), width=int(r['width'])))
    for m, b, l in zip(r['masks'], r['boxes'], r['labels']):
      rle = encode_rle(m)
      x1, y1, x2, y2 = (float(v) for v in b)
      anns.append(dict(id=len(anns) + 1, image_id=int(r['image_id']),
                       category_id=int(cat_ids[int(l)]),
                       bbox=[x1, y1, x2 - x1, y2 - y1],
                       area=float(m.sum()), iscrowd=0, segmentation=rle))
  cats = [dict(id=int(c), name=str(n)) for c, n in
          zip(cat_ids, getattr(source, 'class_names', cat_ids))]
  coco = COCO()
  coco.dataset = dict(images=images, annotations=anns, categories=cats)
  with contextlib.redirect_stdout(io.StringIO()):   # 'creating index...'
    coco.createIndex()
  return coco


def evaluate_model(config: ml_collections.ConfigDict, variables: dict,
                   output_dir: str, source=None, max_images: int = 0,
                   batch_size: int | None = None, progress: bool = True,
                   predictor: Predictor | None = None, keep_records: int = 0
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Inference + COCO evaluation + mask-scoring report over a split.

  Records are not kept: each batch's detections are appended to the results
  files (``<output_dir>/results.{bbox,segm}.json``, mmdetection's format,
  renamed into place when complete) and to the mask-scoring report's
  per-detection numbers as they arrive; COCOeval then reads the files.

  Args:
    config: the full config; ``config.data`` selects the evaluation source.
    variables: model variables.
    output_dir: where results files, ``metrics.json`` and the report go.
    source: records to evaluate (default: the config's evaluation split).
    max_images: evaluate only the first N images (0 = all).
    batch_size: images per batch (default ``config.test.batch_size``).
    progress: show a progress bar.
    predictor: reuse a compiled predictor.
    keep_records: also return the first N per-image records (e.g. to draw
      them); 0 keeps none.

  Returns:
    (metrics dict with mmdetection's key names and ``mask_scoring`` summary
    (for a model without a MaskIoU head only its ``note``),
    the first ``keep_records`` per-image records as evaluated: detections
    whose label is not a category of the dataset are dropped, see
    ``keep_known_labels``).
  """
  if source is None:
    source = pipeline.build_source(config, train=False)
  if max_images:
    source = _Subset(source, max_images)
  coco_gt = coco_ground_truth(source.source if isinstance(source, _Subset)
                              else source)
  cat_ids = list(getattr(source.source if isinstance(source, _Subset)
                         else source, 'cat_ids', config.data.category_ids))
  own_predictor = predictor is None
  predictor = predictor or Predictor(config, variables)
  # The whole split in this process, also when it is one host of several
  # (train.py evaluates on process 0 only).
  batches = pipeline.make_eval_iterator(
      config, source, batch_size_per_host=batch_size, process_index=0,
      process_count=1)
  evaluator = CocoEvaluator(coco_gt, cat_ids, output_dir=output_dir,
                            prefix='results')
  # Mask R-CNN (no MaskIoU head): the segm scores are the box scores, so
  # there is nothing to report but that.
  scoring = (mask_scoring_report.MaskScoringAccumulator(coco_gt, cat_ids)
             if config_lib.has_mask_iou_head(config) else None)
  num_classes = config.model.num_classes
  if num_classes > len(cat_ids):
    logging.warning(
        'The model has %d classes but the dataset only %d categories; '
        'detections with labels >= %d are not evaluated.', num_classes,
        len(cat_ids), len(cat_ids))
  records, dropped, done = [], 0, False
  bar = tqdm.tqdm(total=len(source), disable=not progress, unit='img',
                  desc='evaluate')
  try:
    for rec in predictor.predict_batches(batches):
      rec, n = keep_known_labels(rec, len(cat_ids))
      dropped += n
      if len(records) < keep_records:
        records.append(rec)
      evaluator.add([rec])
      if scoring is not None:
        scoring.add(rec)
      bar.update(1)
    done = True
  finally:
    if not done:
      evaluator.reset()   # no partial results files left behind
    bar.close()
    batches.close()
    if own_predictor:
      predictor.close()   # its post-processing worker processes
  logging.info('evaluation host/device seconds: %s',
               {k: round(v, 2) for k, v in predictor.timings.items()})
  if dropped:
    logging.warning('%d detections with labels outside the dataset\'s %d '
                    'categories dropped.', dropped, len(cat_ids))
  metrics = evaluator.evaluate()
  if scoring is None:
    summary, log = mask_scoring_report.no_mask_iou_head_report(output_dir)
  else:
    summary, log = scoring.report(
        load_results(evaluator.results_path('segm')), output_dir=output_dir,
        metrics=metrics, img_ids=evaluator.img_ids())
  tqdm.tqdm.write(log)     # once, above any progress bar
  metrics['mask_scoring'] = summary
  if output_dir:
    # Keeps what the evaluator wrote there (coco_stats, num_images).
    path = os.path.join(output_dir, 'metrics.json')
    payload = {}
    if os.path.isfile(path):
      with open(path) as f:
        payload = json.load(f)
    payload.update(metrics)
    write_json(path, payload)
  return metrics, records

