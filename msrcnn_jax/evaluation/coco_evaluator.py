"""COCO bbox / segm evaluation as mmdetection v2's ``CocoDataset`` does it.

Detections arrive as host-side per-image records (numpy), one per image,
produced by the inference code::

  {'image_id': int, 'file_name': str, 'ori_shape': (h, w),
   'boxes': (K, 4) float32 x1, y1, x2, y2 in ORIGINAL image pixels,
   'scores': (K,) float32 box score, 'labels': (K,) int 0..N-1,
   'mask_iou': (K,) float32 predicted MaskIoU of the label,
   'mask_scores': (K,) float32 = scores * mask_iou,
   'masks': list of K RLE dicts {'size': [h, w], 'counts': str}}

Only valid detections are present (no padding rows), K <= 100.

Conversion follows ``CocoDataset._segm2json`` (spec §2.8): bbox entries are
scored with the box score, segm entries with the mask score (that is the only
place Mask Scoring R-CNN changes the COCO numbers). Evaluation follows
``CocoDataset.evaluate_det_segm`` of mmdetection 2.28: ``maxDets = [100, 300,
1000]``, the ``bbox`` key is dropped from segm results before ``loadRes`` (so
small/medium/large use the mask area), metrics are
``float(f'{stats[i]:.3f}')`` under the names ``{metric}_mAP``, ``_mAP_50``,
``_mAP_75``, ``_mAP_s``, ``_mAP_m``, ``_mAP_l`` plus ``{metric}_mAP_copypaste``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# mmdetection's mapping of metric item -> index into COCOeval.stats.
COCO_METRIC_NAMES = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')
# CocoDataset.evaluate's default proposal_nums, used as params.maxDets.
MMDET_MAX_DETS = (100, 300, 1000)


def _xyxy2xywh(box: np.ndarray) -> List[float]:
  """CocoDataset.xyxy2xywh: float32 corners -> Python floats, w/h in double."""
  b = np.asarray(box, dtype=np.float32).tolist()
  return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def _rle_for_json(rle: Dict[str, Any]) -> Dict[str, Any]:
  counts = rle['counts']
  if isinstance(counts, bytes):
    counts = counts.decode()
  return {'size': [int(s) for s in rle['size']], 'counts': counts}


def label_major_order(record: Dict[str, Any]) -> np.ndarray:
  """Indices of a record's detections in results-file order, ``(K,)`` int64.

  ``CocoDataset._segm2json`` writes an image's detections label by label and,
  within a label, in the record's order (descending score): a stable sort
  of ``labels``.
  """
  labels = np.asarray(record['labels']).reshape(-1).astype(np.int64)
  return np.argsort(labels, kind='stable')


def records_to_coco_results(
    records: Iterable[Dict[str, Any]],
    category_ids: Sequence[int],
    segm_score_key: str = 'mask_scores',
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
  """Per-image detection records -> COCO result lists (``_segm2json``).

  Args:
    records: per-image dicts as in the module docstring. Records without
      ``masks`` contribute bbox entries only.
    category_ids: label ``i`` -> COCO ``category_id`` ``category_ids[i]``.
    segm_score_key: record key used as the segm score; ``'mask_scores'``
      (mmdetection v2 for MS R-CNN, default) or ``'scores'`` (the box score,
      as a detector without mask scoring would report).

  Returns:
    ``(bbox_results, segm_results)``: lists of dicts. bbox entries are
    ``{'image_id', 'bbox': [x, y, w, h], 'score': box score, 'category_id'}``;
    segm entries add ``'segmentation'`` (RLE, ``counts`` as str) and carry the
    mask score. Like mmdetection, entries are label-major within an image
    and keep the record order (descending score) within a label.
  """
  bbox_results, segm_results = [], []
  for rec in records:
    image_id = int(rec['image_id'])
    boxes = np.asarray(rec['boxes'], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(rec['scores'], dtype=np.float32).reshape(-1)
    labels = np.asarray(rec['labels']).reshape(-1).astype(np.int64)
    masks = rec.get('masks')
    segm_scores = None
    if masks is not None:
      segm_scores = np.asarray(rec[segm_score_key], dtype=np.float32)
      segm_scores = segm_scores.reshape(-1)
    # Stable: within a label the record order is kept (spec §2.8).
    for i in label_major_order(rec):
      cat = int(category_ids[int(labels[i])])
      xywh = _xyxy2xywh(boxes[i])
      bbox_results.append({
          'image_id': image_id, 'bbox': xywh, 'score': float(scores[i]),
          'category_id': cat})
      if masks is not None:
        segm_results.append({
            'image_id': image_id, 'bbox': list(xywh),
            'score': float(segm_scores[i]), 'category_id': cat,
            'segmentation': _rle_for_json(masks[i])})
  return bbox_results, segm_results


def _empty_results(coco_gt: COCO) -> COCO:
  """A results COCO with no annotations (``loadRes([])`` raises IndexError)."""
  res = COCO()
  res.dataset = {
      'images': list(coco_gt.dataset.get('images', [])),
      'categories': copy.deepcopy(coco_gt.dataset.get('categories', [])),
      'annotations': []}
  with contextlib.redirect_stdout(io.StringIO()):
    res.createIndex()
  return res


def run_cocoeval(
    coco_gt: COCO, results: List[Dict[str, Any]], iou_type: str,
    img_ids: Optional[Sequence[int]] = None,
    cat_ids: Optional[Sequence[int]] = None,
    copy_results: bool = True,
) -> Tuple[COCOeval, str]:
  """evaluate/accumulate/summarize one iou type exactly as mmdetection.

  Args:
    coco_gt: ground truth.
    results: COCO result dicts.
    iou_type: ``'bbox'`` or ``'segm'``.
    img_ids: images to evaluate; default every image of ``coco_gt``.
    cat_ids: categories; default every category of ``coco_gt``.
    copy_results: deep-copy ``results`` first; False lets ``loadRes``
      modify them (adds ``area``, ``id``...; segm drops ``bbox``), for
      lists read from a file only for this (no second copy in memory).

  Returns:
    ``(cocoeval, summary_text)`` with ``cocoeval.stats`` (12,) filled.
  """
  preds = copy.deepcopy(results) if copy_results else results
  if iou_type == 'segm':
    # mmdet >= 2.12: drop 'bbox' so loadRes uses the mask area for s/m/l.
    for p in preds:
      p.pop('bbox', None)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_dt = coco_gt.loadRes(preds) if preds else _empty_results(coco_gt)
  ev = COCOeval(coco_gt, coco_dt, iou_type)
  ev.params.catIds = list(cat_ids) if cat_ids is not None else (
      coco_gt.getCatIds())
  ev.params.imgIds = list(img_ids) if img_ids is not None else (
      coco_gt.getImgIds())
  ev.params.maxDets = list(MMDET_MAX_DETS)
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev, buf.getvalue()


def evaluate_coco(
    coco_gt: COCO,
    bbox_results: Optional[List[Dict[str, Any]]],
    segm_results: Optional[List[Dict[str, Any]]],
    metrics: Sequence[str] = ('bbox', 'segm'),
    print_table: bool = True,
    img_ids: Optional[Sequence[int]] = None,
    cat_ids: Optional[Sequence[int]] = None,
    stats_out: Optional[Dict[str, List[float]]] = None,
    copy_results: bool = True,
) -> Dict[str, Any]:
  """COCO metrics with mmdetection v2's key names and rounding.

  Args:
    coco_gt: ground truth.
    bbox_results, segm_results: from :func:`records_to_coco_results`.
    metrics: subset of ``('bbox', 'segm')``.
    print_table: print the standard COCOeval summary for each metric.
    img_ids, cat_ids: restrict the evaluation (default: all of ``coco_gt``,
      as mmdetection's ``self.img_ids`` / ``self.cat_ids``).
    stats_out: if given, receives ``{metric: list of the 12 raw stats}``.
    copy_results: see :func:`run_cocoeval`.

  Returns:
    ``{'bbox_mAP': float, 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s',
    'bbox_mAP_m', 'bbox_mAP_l', 'bbox_mAP_copypaste': str, 'segm_...'}``,
    values ``float(f'{x:.3f}')``; -1.0 where pycocotools has no ground truth
    (e.g. no small objects). Empty results give pycocotools' values (0 AP)
    where mmdetection would log an error and stop.
  """
  out: Dict[str, Any] = {}
  for metric in metrics:
    if metric not in ('bbox', 'segm'):
      raise ValueError(f'unsupported metric {metric!r}')
    results = bbox_results if metric == 'bbox' else segm_results
    ev, text = run_cocoeval(coco_gt, list(results or []), metric,
                            img_ids=img_ids, cat_ids=cat_ids,
                            copy_results=copy_results)
    if print_table:   # the table, without pycocotools' progress chatter
      print(f'COCO {metric}:\n' + '\n'.join(
          line for line in text.splitlines()
          if line.lstrip().startswith(('Average Precision',
                                       'Average Recall'))))
    for i, item in enumerate(COCO_METRIC_NAMES):
      out[f'{metric}_{item}'] = float(f'{ev.stats[i]:.3f}')
    ap = ev.stats[:6]
    out[f'{metric}_mAP_copypaste'] = ' '.join(f'{a:.3f}' for a in ap)
    if stats_out is not None:
      stats_out[metric] = [float(s) for s in ev.stats]
  return out


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically (``path.tmp`` +
  rename); numpy scalars as floats."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


def load_results(path: str) -> List[Dict[str, Any]]:
  """A COCO results file (``loadRes``'s format: a JSON list of dicts)."""
  with open(path) as f:
    return json.load(f)


class JsonListWriter:
  """Writes a JSON list to a file a few items at a time.

  Items go to ``path + '.tmp'``; :meth:`close` ends the list and renames the
  file to ``path`` (atomic: a reader never sees a partial list at ``path``);
  :meth:`discard` removes it. The bytes equal ``json.dump(all_items, f)``.
  """

  def __init__(self, path: str):
    self.path = path
    self.count = 0
    self._file = open(path + '.tmp', 'w')
    self._file.write('[')

  def extend(self, items: Sequence[Any]) -> None:
    if not items:
      return
    # json.dumps(list) is '[' + ', '.join(items) + ']'.
    text = json.dumps(list(items))[1:-1]
    self._file.write(', ' + text if self.count else text)
    self.count += len(items)

  def close(self) -> None:
    self._file.write(']')
    self._file.close()
    os.replace(self.path + '.tmp', self.path)

  def discard(self) -> None:
    self._file.close()
    if os.path.exists(self.path + '.tmp'):
      os.remove(self.path + '.tmp')


class CocoEvaluator:
  """Streams per-image records to results files, then evaluates them.

  Usage::

    ev = CocoEvaluator(coco_gt, cfg.data.category_ids, output_dir=workdir)
    for batch_records in ...: ev.add(batch_records)
    metrics = ev.evaluate()

  :meth:`add` converts the records to COCO result entries at once and
  appends them to the results files; only the image ids seen are kept in
  memory, so memory does not grow with the records' masks (RLE strings).
  :meth:`evaluate` closes the files and runs COCOeval on them, one metric
  at a time.

  Files written to ``output_dir`` (a private temporary directory when None,
  removed with the evaluator): ``<prefix>.bbox.json``, ``<prefix>.segm.json``
  (mmdetection's ``results2json`` names and format, what
  ``COCO.loadRes`` reads; segm entries keep their ``bbox``; written as
  ``*.tmp`` and renamed when complete), and ``metrics.json`` (the metrics
  dict plus ``'coco_stats'``: the 12 raw COCOeval stats per metric, and
  ``'num_images'``).
  """

  def __init__(self, coco_gt: COCO, category_ids: Sequence[int],
               output_dir: Optional[str] = None, prefix: str = 'results',
               metrics: Sequence[str] = ('bbox', 'segm'),
               only_seen_images: bool = True, print_table: bool = True):
    """Args:

      coco_gt: ground truth.
      category_ids: label -> COCO category id.
      output_dir: where result and metric files go; None: a temporary
        directory (results files only), removed with the evaluator.
      prefix: result file prefix inside ``output_dir``.
      metrics: ``('bbox', 'segm')`` or a subset.
      only_seen_images: evaluate only the images that were added (records
        with K = 0 count as seen). On a full pass this equals mmdetection
        (every image is seen); on a partial pass it avoids counting the
        unseen images as misses.
      print_table: print the COCOeval summaries.
    """
    for metric in metrics:
      if metric not in ('bbox', 'segm'):
        raise ValueError(f'unsupported metric {metric!r}')
    self.coco_gt = coco_gt
    self.category_ids = tuple(int(c) for c in category_ids)
    self.output_dir = output_dir
    self._tmp_dir = None
    if not output_dir:
      self._tmp_dir = tempfile.TemporaryDirectory(prefix='coco_results_')
    self.results_dir = output_dir or self._tmp_dir.name
    self.prefix = prefix
    self.metrics = tuple(metrics)
    self.only_seen_images = only_seen_images
    self.print_table = print_table
    self._writers: Dict[str, JsonListWriter] = {}
    self._image_ids: set = set()
    self.metrics_result: Optional[Dict[str, Any]] = None

  def results_path(self, metric: str) -> str:
    """``<results_dir>/<prefix>.<metric>.json`` (complete after evaluate)."""
    return os.path.join(self.results_dir, f'{self.prefix}.{metric}.json')

  def add(self, records: Iterable[Dict[str, Any]]) -> None:
    """Appends per-image records (one dict per image) to the results files.

    Raises:
      RuntimeError: after :meth:`evaluate` (call :meth:`reset` first).
    """
    records = list(records)
    if self._writers is None:
      raise RuntimeError('CocoEvaluator.add after evaluate(); call reset()')
    if not self._writers:
      os.makedirs(self.results_dir, exist_ok=True)
      self._writers = {m: JsonListWriter(self.results_path(m))
                       for m in self.metrics}
    self._image_ids.update(int(r['image_id']) for r in records)
    bbox, segm = records_to_coco_results(records, self.category_ids)
    for metric, entries in (('bbox', bbox), ('segm', segm)):
      if metric in self._writers:
        self._writers[metric].extend(entries)

  update = add

  def reset(self) -> None:
    """Forgets everything added (unfinished results files are removed)."""
    for w in (self._writers or {}).values():
      w.discard()
    self._writers = {}
    self._image_ids = set()
    self.metrics_result = None

  def img_ids(self) -> Optional[List[int]]:
    """The image ids evaluated: those of the added records with
    ``only_seen_images``, else None (every image of the annotations)."""
    if not self.only_seen_images:
      return None
    return sorted(self._image_ids)

  def _close_files(self) -> None:
    if self._writers is None:
      return
    if not self._writers:   # nothing added: empty results files
      self._writers = {m: JsonListWriter(self.results_path(m))
                       for m in self.metrics}
    for w in self._writers.values():
      w.close()
    self._writers = None

  def evaluate(self) -> Dict[str, Any]:
    """Completes the results files, runs COCOeval on each; returns metrics.

    Writes ``metrics.json`` to ``output_dir`` when given.
    """
    self._close_files()
    img_ids = self.img_ids()
    stats: Dict[str, List[float]] = {}
    metrics: Dict[str, Any] = {}
    for metric in self.metrics:
      results = load_results(self.results_path(metric))
      metrics.update(evaluate_coco(
          self.coco_gt, results if metric == 'bbox' else None,
          results if metric == 'segm' else None, metrics=(metric,),
          print_table=self.print_table, img_ids=img_ids, stats_out=stats,
          copy_results=False))
      del results
    if self.output_dir:
      payload = dict(metrics)
      payload['coco_stats'] = stats
      payload['num_images'] = len(
          img_ids if img_ids is not None else self.coco_gt.getImgIds())
      write_json(os.path.join(self.output_dir, 'metrics.json'), payload)
    self.metrics_result = metrics
    return metrics
