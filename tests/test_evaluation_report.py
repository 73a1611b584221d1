"""Mask-scoring report (correlations, AP with box scores) and visualisation."""

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image
from pycocotools.coco import COCO

from msrcnn_jax.evaluation.coco_evaluator import CocoEvaluator
from msrcnn_jax.evaluation.mask_scoring_report import (
    actual_mask_ious, mask_scoring_report)
from msrcnn_jax.evaluation.visualize import (
    draw_detections, save_visualization)

CAT_IDS = (1, 2)
SIZE = 16  # GT squares are SIZE x SIZE; a det shifted by d has IoU (S-d)/(S+d)


def _rle(h, w, x, y, bw, bh):
  m = np.zeros((h, w), np.uint8)
  m[y:y + bh, x:x + bw] = 1
  e = mask_util.encode(np.asfortranarray(m))
  return {'size': e['size'], 'counts': e['counts'].decode()}


def _coco(images, anns):
  coco = COCO()
  coco.dataset = dict(
      images=images, categories=[dict(id=c, name=f'c{c}') for c in CAT_IDS],
      annotations=[dict(a, id=i + 1, iscrowd=0) for i, a in enumerate(anns)])
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _square_ann(image_id, x, y, cat=1):
  s = SIZE
  return dict(image_id=image_id, category_id=cat, bbox=[x, y, s, s],
              area=float(s * s),
              segmentation=[[x, y, x + s, y, x + s, y + s, x, y + s]])


def _record(image_id, h, w, dets, mask_iou):
  """dets: (x, y, label, box score) squares of SIZE at (x, y)."""
  k = len(dets)
  boxes = np.asarray([[x, y, x + SIZE, y + SIZE] for x, y, _, _ in dets],
                     np.float32).reshape(k, 4)
  scores = np.asarray([d[3] for d in dets], np.float32)
  mask_iou = np.asarray(mask_iou, np.float32)
  return dict(image_id=image_id, file_name=f'{image_id}.png',
              ori_shape=(h, w), boxes=boxes, scores=scores,
              labels=np.asarray([d[2] for d in dets], np.int32),
              mask_iou=mask_iou, mask_scores=scores * mask_iou,
              masks=[_rle(h, w, x, y, SIZE, SIZE) for x, y, _, _ in dets])


SHIFTS = (0, 2, 4, 6, 8)
CORNERS = ((4, 4), (40, 4), (4, 40), (40, 40), (70, 20))


def _shifted_case(pred_fn):
  """5 GT squares; detections shifted by SHIFTS; one unmatched class-2 det."""
  coco = _coco([dict(id=1, file_name='1.png', height=100, width=100)],
               [_square_ann(1, x, y) for x, y in CORNERS])
  want = np.asarray([(SIZE - d) / (SIZE + d) for d in SHIFTS])
  box_scores = (0.6, 0.9, 0.5, 0.8, 0.7)
  dets = [(x + d, y, 0, s) for (x, y), d, s in zip(CORNERS, SHIFTS,
                                                   box_scores)]
  dets.append((70, 70, 1, 0.95))  # category 2 has no GT: unmatched
  rec = _record(1, 100, 100, dets, list(pred_fn(want)) + [0.9])
  return coco, rec, want


def test_actual_iou_and_perfect_correlation(tmp_path):
  coco, rec, want = _shifted_case(lambda iou: iou)
  ious = actual_mask_ious(coco, [rec], CAT_IDS)[0]
  np.testing.assert_allclose(ious, list(want) + [0.0], rtol=1e-12)
  summary, log = mask_scoring_report(coco, [rec], CAT_IDS,
                                     output_dir=str(tmp_path))
  assert summary['num_detections'] == 6 and summary['num_matched'] == 5
  np.testing.assert_allclose(summary['pearson_maskiou'], 1.0, atol=1e-6)
  np.testing.assert_allclose(summary['spearman_maskiou'], 1.0, atol=1e-12)
  # Box-score ranks (2, 5, 1, 4, 3) vs IoU ranks (5, 4, 3, 2, 1):
  # sum d^2 = 22, rho = 1 - 6 * 22 / (5 * 24) = -0.1.
  np.testing.assert_allclose(summary['spearman_boxscore'], -0.1, atol=1e-12)
  np.testing.assert_allclose(summary['maskiou_mae'], 0.0, atol=1e-6)
  assert 'Pearson 1.000' in log and '5 matched' in log
  saved = json.loads((tmp_path / 'mask_scoring_report.json').read_text())
  assert saved['num_matched'] == 5 and saved['log'] == log
  png = tmp_path / 'mask_scoring_scatter.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert Image.open(png).size[0] > 100


def test_anticorrelated_maskiou():
  coco, rec, _ = _shifted_case(lambda iou: 1.0 - iou)
  summary, _ = mask_scoring_report(coco, [rec], CAT_IDS)
  np.testing.assert_allclose(summary['pearson_maskiou'], -1.0, atol=1e-6)
  np.testing.assert_allclose(summary['spearman_maskiou'], -1.0, atol=1e-12)


def test_mask_scores_beat_box_scores_on_constructed_case():
  """A: box 0.9, mask IoU 11/21; B: box 0.8, perfect mask; one GT.

  Box-score ranking puts A first: A is the TP at IoU 0.5 only, B at
  0.55..0.95 after an FP, AP = (1 + 9 * 0.5) / 10 = 0.55. MaskIoU 0.5 / 1.0
  gives mask scores 0.45 / 0.8, B first, AP = 1.
  """
  coco = _coco([dict(id=3, file_name='3.png', height=50, width=60)],
               [_square_ann(3, 10, 10)])
  rec = _record(3, 50, 60, [(15, 10, 0, 0.9), (10, 10, 0, 0.8)], [0.5, 1.0])
  summary, log = mask_scoring_report(coco, [rec], CAT_IDS)
  assert summary['segm_mAP'] == 1.0
  assert summary['segm_mAP_boxscore'] == 0.55
  assert summary['segm_mAP_50_boxscore'] == 1.0
  assert summary['segm_mAP_75_boxscore'] == 0.5
  assert summary['segm_mAP_gain'] == 0.45
  assert '+0.450' in log


def test_evaluator_writes_report_beside_metrics(tmp_path):
  coco, rec, _ = _shifted_case(lambda iou: 0.5 * iou + 0.3)
  ev = CocoEvaluator(coco, CAT_IDS, output_dir=str(tmp_path),
                     print_table=False)
  ev.add([rec])
  metrics = ev.evaluate()
  summary, _ = mask_scoring_report(
      ev.coco_gt, [rec], ev.category_ids, output_dir=ev.output_dir,
      metrics=metrics, img_ids=ev.img_ids())
  assert summary['segm_mAP'] == metrics['segm_mAP']
  np.testing.assert_allclose(summary['pearson_maskiou'], 1.0, atol=1e-6)
  names = {p.name for p in tmp_path.iterdir()}
  assert {'metrics.json', 'results.bbox.json', 'results.segm.json',
          'mask_scoring_report.json', 'mask_scoring_scatter.png'} <= names


def test_draw_detections_changes_mask_pixels(tmp_path):
  image = np.full((60, 80, 3), 100, np.uint8)
  rec = _record(1, 60, 80, [(30, 30, 0, 0.9), (5, 40, 1, 0.1)], [0.8, 0.7])
  out = draw_detections(image, rec, ('cat', 'dog'), score_thr=0.3)
  assert out.shape == image.shape and out.dtype == np.uint8
  assert np.any(out[38, 38] != 100)  # inside the drawn mask
  assert np.all(out[50, 12] == 100)  # inside the mask below score_thr
  assert np.all(out[5, 75] == 100)   # background
  path = tmp_path / 'vis' / 'a.png'
  drawn = save_visualization(str(path), image, rec, ('cat', 'dog'))
  np.testing.assert_array_equal(np.asarray(Image.open(path)), drawn)
  rgba = np.concatenate([image, np.zeros((60, 80, 1), np.uint8)], axis=2)
  np.testing.assert_array_equal(
      draw_detections(rgba, rec, ('cat', 'dog'), score_thr=0.3), out)
