"""COCO evaluation: record conversion (spec §2.8) and mmdetection's metrics."""

import contextlib
import copy
import io
import json
import os

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import load_results
from msrcnn_jax.config import COCO_CATEGORY_IDS
from msrcnn_jax.evaluation.coco_evaluator import (
    CocoEvaluator, evaluate_coco, records_to_coco_results)

MMDET_KEYS = {f'{m}_{k}' for m in ('bbox', 'segm') for k in (
    'mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l', 'mAP_copypaste')}
CAT_IDS = (1, 3, 7)  # labels 0, 1, 2


def _rect(x, y, w, h):
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _tiny_gt():
  """3 images, 3 categories; polygon, compressed and uncompressed RLE GT."""
  images = [dict(id=1, file_name='a.png', height=40, width=50),
            dict(id=2, file_name='b.png', height=60, width=45),
            dict(id=5, file_name='c.png', height=120, width=110)]
  anns = []

  def add(image_id, cat, segm, iscrowd=0):
    h = next(i['height'] for i in images if i['id'] == image_id)
    w = next(i['width'] for i in images if i['id'] == image_id)
    if isinstance(segm, list):
      rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm['counts'], list):
      rle = mask_util.frPyObjects(segm, h, w)
    else:
      rle = segm
    anns.append(dict(
        id=len(anns) + 1, image_id=image_id, category_id=cat,
        segmentation=segm, area=float(mask_util.area(rle)),
        bbox=[float(v) for v in mask_util.toBbox(rle)], iscrowd=iscrowd))

  add(1, 1, _rect(2, 3, 10, 12))
  add(1, 3, [[20, 5, 40, 8, 35, 30, 22, 25]])  # quadrilateral
  m = np.zeros((40, 50), np.uint8)
  m[25:38, 5:18] = 1
  m[30:33, 8:12] = 0  # hole
  rle = mask_util.encode(np.asfortranarray(m))
  rle['counts'] = rle['counts'].decode()
  add(1, 1, rle)  # compressed RLE
  add(2, 7, _rect(4, 4, 30, 40))  # medium
  add(2, 3, _rect(36, 50, 6, 6))
  crowd = np.zeros((60, 45), np.uint8)
  crowd[0:3, 0:45] = 1
  counts, prev, run = [], 0, 0
  for v in crowd.flatten(order='F'):
    if v != prev:
      counts.append(run)
      run, prev = 0, v
    run += 1
  counts.append(run)
  add(2, 1, {'size': [60, 45], 'counts': counts}, iscrowd=1)  # raw RLE
  add(5, 1, _rect(5, 10, 100, 100))  # large
  add(5, 7, _rect(60, 2, 20, 6))
  dataset = dict(images=images, annotations=anns, categories=[
      dict(id=c, name=f'c{c}') for c in CAT_IDS])
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _gt_records(coco):
  """The non-crowd GT as detections with score 1, as inference records."""
  records = []
  for img in coco.dataset['images']:
    anns = [a for a in coco.imgToAnns[img['id']] if not a['iscrowd']]
    boxes, labels, masks = [], [], []
    for a in anns:
      x, y, w, h = a['bbox']
      boxes.append([x, y, x + w, y + h])
      labels.append(CAT_IDS.index(a['category_id']))
      m = coco.annToMask(a)
      rle = mask_util.encode(np.asfortranarray(m))
      masks.append({'size': rle['size'], 'counts': rle['counts'].decode()})
    k = len(anns)
    records.append(dict(
        image_id=img['id'], file_name=img['file_name'],
        ori_shape=(img['height'], img['width']),
        boxes=np.asarray(boxes, np.float32).reshape(k, 4),
        scores=np.ones(k, np.float32), labels=np.asarray(labels, np.int32),
        mask_iou=np.ones(k, np.float32), mask_scores=np.ones(k, np.float32),
        masks=masks))
  return records


def _perturb(records, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for rec in records:
    rec = copy.deepcopy(rec)
    k = len(rec['labels'])
    h, w = rec['ori_shape']
    rec['boxes'] = rec['boxes'] + rng.uniform(-3, 3, (k, 4)).astype(np.float32)
    rec['scores'] = rng.uniform(0.3, 1.0, k).astype(np.float32)
    rec['mask_iou'] = rng.uniform(0.2, 1.0, k).astype(np.float32)
    rec['mask_scores'] = rec['scores'] * rec['mask_iou']
    masks = []
    for rle in rec['masks']:
      m = mask_util.decode(rle)
      m = np.roll(m, rng.randint(-2, 3), axis=int(rng.randint(2)))
      e = mask_util.encode(np.asfortranarray(m))
      masks.append({'size': e['size'], 'counts': e['counts'].decode()})
    # One false positive per image: a box and mask in a corner.
    fp = np.zeros((h, w), np.uint8)
    fp[:8, -8:] = 1
    e = mask_util.encode(np.asfortranarray(fp))
    masks.append({'size': e['size'], 'counts': e['counts'].decode()})
    rec['masks'] = masks
    rec['boxes'] = np.concatenate(
        [rec['boxes'], np.asarray([[w - 8, 0, w, 8]], np.float32)])
    rec['scores'] = np.append(rec['scores'], np.float32(0.95))
    rec['mask_iou'] = np.append(rec['mask_iou'], np.float32(0.5))
    rec['mask_scores'] = np.append(rec['mask_scores'], np.float32(0.475))
    rec['labels'] = np.append(rec['labels'], 0).astype(np.int32)
    out.append(rec)
  return out


def _direct_pycocotools(coco, path, iou_type):
  """Plain pycocotools on a result file (segm: 'bbox' popped as mmdet)."""
  with open(path) as f:
    preds = json.load(f)
  if iou_type == 'segm':
    for p in preds:
      p.pop('bbox')
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(coco, coco.loadRes(preds), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def _check_against_direct(coco, metrics, out_dir):
  for metric in ('bbox', 'segm'):
    stats = _direct_pycocotools(
        coco, os.path.join(out_dir, f'results.{metric}.json'), metric)
    for i, k in enumerate(('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m',
                           'mAP_l')):
      assert metrics[f'{metric}_{k}'] == float(f'{stats[i]:.3f}'), k


def test_gt_as_predictions_is_perfect(tmp_path):
  coco = _tiny_gt()
  ev = CocoEvaluator(coco, CAT_IDS, output_dir=str(tmp_path),
                     print_table=False)
  recs = _gt_records(coco)
  ev.add(recs[:2])
  ev.add(recs[2:])
  metrics = ev.evaluate()
  assert set(metrics) == MMDET_KEYS
  for metric in ('bbox', 'segm'):
    for k in ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l'):
      assert metrics[f'{metric}_{k}'] == 1.0, (metric, k)
    assert metrics[f'{metric}_mAP_copypaste'] == ' '.join(['1.000'] * 6)
  _check_against_direct(coco, metrics, str(tmp_path))
  with open(tmp_path / 'metrics.json') as f:
    saved = json.load(f)
  assert saved['bbox_mAP'] == 1.0 and len(saved['coco_stats']['segm']) == 12
  assert saved['num_images'] == 3


def test_perturbed_matches_pycocotools(tmp_path, capsys):
  coco = _tiny_gt()
  ev = CocoEvaluator(coco, CAT_IDS, output_dir=str(tmp_path))
  ev.add(_perturb(_gt_records(coco)))
  metrics = ev.evaluate()
  assert 'Average Precision  (AP) @[ IoU=0.50:0.95' in capsys.readouterr().out
  assert metrics['bbox_mAP'] < 1.0 and metrics['segm_mAP'] < 1.0
  assert metrics['segm_mAP'] > 0.0
  _check_against_direct(coco, metrics, str(tmp_path))
  # segm entries carry the mask score, bbox entries the box score.
  with open(tmp_path / 'results.segm.json') as f:
    segm = json.load(f)
  with open(tmp_path / 'results.bbox.json') as f:
    bbox = json.load(f)
  assert len(segm) == len(bbox) == 7 + 3
  assert [s['bbox'] for s in segm] == [b['bbox'] for b in bbox]
  assert all(s['score'] < b['score'] for s, b in zip(segm, bbox))


def test_empty_results_do_not_crash():
  coco = _tiny_gt()
  metrics = evaluate_coco(coco, [], [], print_table=False)
  assert set(metrics) == MMDET_KEYS
  assert metrics['bbox_mAP'] == 0.0 and metrics['segm_mAP'] == 0.0
  # No GT of that area range (pycocotools says -1) stays -1.
  ev = CocoEvaluator(coco, CAT_IDS, print_table=False, metrics=('bbox',))
  ev.add([dict(image_id=1, boxes=np.zeros((0, 4), np.float32),
               scores=np.zeros(0, np.float32), labels=np.zeros(0, np.int32))])
  m = ev.evaluate()
  assert m['bbox_mAP'] == 0.0 and m['bbox_mAP_l'] == -1.0
  assert m['bbox_mAP_m'] == -1.0


def test_fixture_results_roundtrip():
  """mmdetection's results.json -> records -> the same COCO entries."""
  ref = load_results('r50_caffe_tiny')
  image_ids = {'chelsea.png': 1, 'coffee.png': 2}
  for e in ref:
    assert COCO_CATEGORY_IDS[e['label']] == e['category_id']
  records = []
  for name, img_id in image_ids.items():
    ents = [e for e in ref if e['image'] == name]
    order = np.argsort([-e['score'] for e in ents], kind='stable')
    ents = [ents[i] for i in order]
    boxes = np.asarray(
        [[x, y, x + w, y + h] for x, y, w, h in (e['bbox'] for e in ents)],
        np.float32)
    scores = np.asarray([e['score'] for e in ents], np.float32)
    mask_scores = np.asarray([e['mask_score'] for e in ents], np.float32)
    records.append(dict(
        image_id=img_id, file_name=name,
        ori_shape=tuple(ents[0]['segmentation']['size']), boxes=boxes,
        scores=scores, labels=np.asarray([e['label'] for e in ents]),
        mask_iou=mask_scores / scores, mask_scores=mask_scores,
        masks=[dict(e['segmentation']) for e in ents]))
  bbox, segm = records_to_coco_results(records, COCO_CATEGORY_IDS)
  assert len(bbox) == len(segm) == len(ref)

  def key(e):
    return (e['image_id'], e['category_id'])

  # Per (image, category) the sequences are identical; that is all COCOeval
  # sees (mmdetection writes label-major, the fixture file score order).
  for img_name, img_id in image_ids.items():
    for cat in sorted({e['category_id'] for e in ref}):
      want = [e for e in ref if e['image'] == img_name
              and e['category_id'] == cat]
      got_b = [e for e in bbox if key(e) == (img_id, cat)]
      got_s = [e for e in segm if key(e) == (img_id, cat)]
      assert [e['bbox'] for e in got_b] == [e['bbox'] for e in want]
      assert [e['score'] for e in got_b] == [e['score'] for e in want]
      assert [e['bbox'] for e in got_s] == [e['bbox'] for e in want]
      assert [e['score'] for e in got_s] == [e['mask_score'] for e in want]
      assert [e['segmentation'] for e in got_s] == [
          e['segmentation'] for e in want]
  # Label-major within an image, as CocoDataset._segm2json.
  labels = [COCO_CATEGORY_IDS.index(e['category_id']) for e in bbox
            if e['image_id'] == 1]
  assert labels == sorted(labels)
