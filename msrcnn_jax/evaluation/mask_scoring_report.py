"""How well the predicted MaskIoU ranks masks, and what it gains in segm AP.

Mask Scoring R-CNN replaces the segm score ``box_score`` by ``box_score *
MaskIoU`` (spec §2.5, §2.8). This report measures, on detections matched to
ground truth, how the predicted MaskIoU and the box score correlate with the
actual mask IoU, and recomputes segm AP with box scores, so that
``segm_mAP`` (mask score, what mmdetection reports) can be compared with
``segm_mAP_boxscore`` (what plain Mask R-CNN scoring would give).

Actual IoU of a detection: the maximum mask IoU (``pycocotools.mask.iou``
on RLEs, non-crowd mode) with the non-crowd ground-truth instances of the same
category in the same image; 0 if there is none. A detection counts as
*matched* when that IoU is > 0; correlations and errors use matched
detections only (unmatched ones have no meaningful target; the MaskIoU head is
trained only on positives, spec §3.4).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from scipy import stats as sp_stats

from msrcnn_jax.evaluation.coco_evaluator import (
    evaluate_coco, label_major_order, records_to_coco_results, write_json)

REPORT_JSON = 'mask_scoring_report.json'
SCATTER_PNG = 'mask_scoring_scatter.png'
MATCHED_DEFINITION = (
    'actual IoU = max mask IoU (pycocotools.mask.iou, RLE) with a non-crowd GT '
    'instance of the same category in the image; matched if actual IoU > 0')


def actual_mask_ious(coco_gt: COCO, records: Sequence[Dict[str, Any]],
                     category_ids: Sequence[int]) -> List[np.ndarray]:
  """Actual mask IoU of every detection.

  Args:
    coco_gt: ground truth (polygons or RLE; crowd instances are skipped).
    records: per-image detection records (see ``coco_evaluator``); uses
      ``image_id``, ``labels`` and ``masks`` (RLE of the original image size).
    category_ids: label -> COCO category id.

  Returns:
    One float64 array ``(K,)`` per record: max IoU with a same-category
    non-crowd GT mask, 0 where the image has none.
  """
  out = []
  for rec in records:
    labels = np.asarray(rec['labels']).reshape(-1).astype(np.int64)
    ious = np.zeros(len(labels), np.float64)
    anns = [a for a in coco_gt.imgToAnns.get(int(rec['image_id']), [])
            if not a.get('iscrowd', 0)]
    for label in np.unique(labels):
      cat = int(category_ids[int(label)])
      gts = [coco_gt.annToRLE(a) for a in anns if a['category_id'] == cat]
      if not gts:
        continue
      idx = np.nonzero(labels == label)[0]
      dts = [rec['masks'][i] for i in idx]
      iou = mask_util.iou(dts, gts, [0] * len(gts))
      ious[idx] = np.asarray(iou, np.float64).reshape(len(idx), -1).max(1)
    out.append(ious)
  return out


def _corr(x: np.ndarray, y: np.ndarray) -> Tuple[Optional[float],
                                                 Optional[float]]:
  """(Pearson, Spearman) or None where undefined (< 2 points, constant)."""
  if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None, None
  pearson = float(sp_stats.pearsonr(x, y)[0])
  spearman = float(sp_stats.spearmanr(x, y)[0])
  return pearson, spearman


def _calibration(actual: np.ndarray, pred: np.ndarray,
                 num_bins: int = 10) -> List[Dict[str, Any]]:
  """Mean predicted MaskIoU per actual-IoU bin [i/n, (i+1)/n)."""
  bins = np.minimum((actual * num_bins).astype(np.int64), num_bins - 1)
  rows = []
  for b in range(num_bins):
    sel = bins == b
    rows.append({'actual_iou_bin': [b / num_bins, (b + 1) / num_bins],
                 'count': int(sel.sum()),
                 'mean_pred_mask_iou': float(pred[sel].mean()) if sel.any()
                                       else None})
  return rows


def _save_scatter(path: str, actual: np.ndarray, pred: np.ndarray,
                  box_score: np.ndarray, summary: Dict[str, Any],
                  max_points: int = 20000) -> None:
  """Two panels: predicted MaskIoU and box score against actual IoU."""
  # Figure + Agg canvas directly: no pyplot, the global backend is untouched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  if len(actual) > max_points:
    sel = np.random.RandomState(0).choice(len(actual), max_points,
                                          replace=False)
    actual, pred, box_score = actual[sel], pred[sel], box_score[sel]
  fig = Figure(figsize=(10, 4.6), dpi=100)
  FigureCanvasAgg(fig)

  def fmt(v):
    return 'n/a' if v is None else f'{v:.3f}'

  for i, (y, name, key) in enumerate((
      (pred, 'predicted MaskIoU', 'maskiou'),
      (box_score, 'box score', 'boxscore'))):
    ax = fig.add_subplot(1, 2, i + 1)
    small = len(actual) < 2000
    ax.scatter(actual, y, s=16 if small else 3, alpha=0.8 if small else 0.3,
               edgecolors='none')
    ax.plot([0, 1], [0, 1], 'k--', linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(min(0.0, float(y.min()) if len(y) else 0.0),
                max(1.0, float(y.max()) if len(y) else 1.0))
    ax.set_xlabel('actual mask IoU')
    ax.set_ylabel(name)
    ax.set_title(f'{name}: Pearson {fmt(summary["pearson_" + key])}, '
                 f'Spearman {fmt(summary["spearman_" + key])}', fontsize=9)
  fig.suptitle(f'{summary["num_matched"]} matched detections', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, format='png')


class MaskScoringAccumulator:
  """What the report needs, gathered one record at a time.

  Per detection it keeps 4 float64 numbers (actual IoU, predicted MaskIoU,
  box score, mask score, in record order) and the box score in results-file
  order (``label_major_order``), not the masks: the actual IoU is computed
  in :meth:`add`, and the box-score segm AP of :meth:`report` re-scores the
  segm results (read back from the file by the caller).
  """

  def __init__(self, coco_gt: COCO, category_ids: Sequence[int]):
    self.coco_gt = coco_gt
    self.category_ids = tuple(int(c) for c in category_ids)
    self._columns: Dict[str, List[np.ndarray]] = {
        k: [] for k in ('actual', 'mask_iou', 'scores', 'mask_scores',
                        'entry_scores')}
    self._image_ids: set = set()

  def add(self, record: Dict[str, Any]) -> None:
    """One per-image record (``coco_evaluator`` docstring) with
    ``scores``, ``labels``, ``mask_iou``, ``mask_scores`` and ``masks``."""
    self._image_ids.add(int(record['image_id']))
    cols = self._columns
    cols['actual'].append(actual_mask_ious(self.coco_gt, [record],
                                           self.category_ids)[0])
    for key in ('mask_iou', 'scores', 'mask_scores'):
      cols[key].append(np.asarray(record[key], np.float64).reshape(-1))
    cols['entry_scores'].append(
        np.asarray(record['scores'], np.float32).reshape(-1)[
            label_major_order(record)])

  def _column(self, key: str) -> np.ndarray:
    parts = self._columns[key]
    return np.concatenate(parts) if parts else np.zeros(0)

  def report(self, segm_results: List[Dict[str, Any]],
             output_dir: Optional[str] = None,
             metrics: Optional[Dict[str, Any]] = None,
             img_ids: Optional[Sequence[int]] = None
             ) -> Tuple[Dict[str, Any], str]:
    """The report (see :func:`mask_scoring_report`) of everything added.

    Args:
      segm_results: the segm results of the added records in file order
        (``records_to_coco_results``, or the results file read back); used
        up: their scores are replaced by the box scores.
      output_dir, metrics, img_ids: as :func:`mask_scoring_report`.
    """
    if img_ids is None:
      img_ids = sorted(self._image_ids)
    items = ('mAP', 'mAP_50', 'mAP_75')
    if metrics is None or any(f'segm_{k}' not in metrics for k in items):
      metrics = evaluate_coco(self.coco_gt, None, segm_results,
                              metrics=('segm',), print_table=False,
                              img_ids=img_ids)
    entry_scores = self._column('entry_scores')
    if len(entry_scores) != len(segm_results):
      raise ValueError(f'{len(segm_results)} segm results for '
                       f'{len(entry_scores)} added detections')
    for entry, score in zip(segm_results, entry_scores.tolist()):
      entry['score'] = score
    box_metrics = evaluate_coco(self.coco_gt, None, segm_results,
                                metrics=('segm',), print_table=False,
                                img_ids=img_ids, copy_results=False)
    actual = self._column('actual')
    pred, box = self._column('mask_iou'), self._column('scores')
    mscore = self._column('mask_scores')
    return _summarize(actual, pred, box, mscore, metrics, box_metrics,
                      output_dir)


def mask_scoring_report(
    coco_gt: COCO,
    records: Sequence[Dict[str, Any]],
    category_ids: Sequence[int],
    output_dir: Optional[str] = None,
    metrics: Optional[Dict[str, Any]] = None,
    img_ids: Optional[Sequence[int]] = None,
) -> Tuple[Dict[str, Any], str]:
  """Correlations of MaskIoU / box score with the actual IoU; AP comparison.

  Args:
    coco_gt: ground truth.
    records: per-image records (``coco_evaluator`` docstring) with
      ``scores``, ``labels``, ``mask_iou``, ``mask_scores`` and ``masks``.
    category_ids: label -> COCO category id.
    output_dir: if given, writes ``mask_scoring_report.json`` and
      ``mask_scoring_scatter.png`` there (beside ``metrics.json``).
    metrics: an existing ``evaluate_coco`` result holding ``segm_mAP*``
      (mask-score AP); recomputed when missing.
    img_ids: images to evaluate; default the images of ``records``.

  Returns:
    ``(summary, log)``: ``summary`` has ``num_detections``, ``num_matched``,
    ``pearson_/spearman_`` + ``maskiou`` (predicted MaskIoU), ``boxscore``
    and ``maskscore`` (None where undefined), ``maskiou_mae``,
    ``mean_actual_iou``, ``mean_pred_mask_iou``, ``segm_mAP``,
    ``segm_mAP_50``, ``segm_mAP_75``, the same with ``_boxscore``,
    ``segm_mAP_gain`` (mask minus box score), ``calibration`` and
    ``matched_definition``; ``log`` is one paragraph for the log.
  """
  records = list(records)
  acc = MaskScoringAccumulator(coco_gt, category_ids)
  for rec in records:
    acc.add(rec)
  _, segm = records_to_coco_results(records, category_ids)
  return acc.report(segm, output_dir=output_dir, metrics=metrics,
                    img_ids=img_ids)


NO_MASK_IOU_HEAD = (
    "no MaskIoU head (Mask R-CNN, model.roi_head.type='StandardRoIHead'): "
    'segm results are scored by box scores (mask_iou = 1), so there is no '
    'mask-scoring report')


def no_mask_iou_head_report(output_dir: Optional[str] = None
                            ) -> Tuple[Dict[str, Any], str]:
  """The report of a model without a MaskIoU head: ``({'note': ...},
  log)``; writes ``mask_scoring_report.json`` with the note (no scatter
  plot) when ``output_dir`` is given."""
  summary = {'note': NO_MASK_IOU_HEAD}
  log = f'Mask scoring: {NO_MASK_IOU_HEAD}.'
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, REPORT_JSON), dict(summary, log=log))
  return summary, log


def _summarize(actual: np.ndarray, pred: np.ndarray, box: np.ndarray,
               mscore: np.ndarray, metrics: Dict[str, Any],
               box_metrics: Dict[str, Any], output_dir: Optional[str]
               ) -> Tuple[Dict[str, Any], str]:
  """The summary and log line from per-detection columns (record order)
  and the segm metrics with mask scores / box scores."""
  matched = actual > 0
  a, p, b, m = actual[matched], pred[matched], box[matched], mscore[matched]
  s: Dict[str, Any] = {'num_detections': int(len(actual)),
                       'num_matched': int(matched.sum())}
  for key, x in (('maskiou', p), ('boxscore', b), ('maskscore', m)):
    s[f'pearson_{key}'], s[f'spearman_{key}'] = _corr(x, a)
  s['maskiou_mae'] = float(np.abs(p - a).mean()) if len(a) else None
  s['mean_actual_iou'] = float(a.mean()) if len(a) else None
  s['mean_pred_mask_iou'] = float(p.mean()) if len(a) else None

  for k in ('mAP', 'mAP_50', 'mAP_75'):
    s[f'segm_{k}'] = metrics[f'segm_{k}']
    s[f'segm_{k}_boxscore'] = box_metrics[f'segm_{k}']
  s['segm_mAP_gain'] = round(s['segm_mAP'] - s['segm_mAP_boxscore'], 3)
  s['calibration'] = _calibration(a, p)
  s['matched_definition'] = MATCHED_DEFINITION

  def fmt(v):
    return 'n/a' if v is None else f'{v:.3f}'

  log = (
      f'Mask scoring over {s["num_detections"]} detections '
      f'({s["num_matched"]} matched to a same-class GT mask, IoU > 0): '
      f'predicted MaskIoU vs actual mask IoU Pearson '
      f'{fmt(s["pearson_maskiou"])} / Spearman {fmt(s["spearman_maskiou"])} '
      f'(mean abs error {fmt(s["maskiou_mae"])}); box score vs actual IoU '
      f'Pearson {fmt(s["pearson_boxscore"])} / Spearman '
      f'{fmt(s["spearman_boxscore"])}. Segm mAP with mask scores '
      f'{s["segm_mAP"]:.3f} vs {s["segm_mAP_boxscore"]:.3f} with box scores '
      f'({s["segm_mAP_gain"]:+.3f}).')
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, REPORT_JSON), dict(s, log=log))
    _save_scatter(os.path.join(output_dir, SCATTER_PNG), a, p, b, s)
  return s, log
