"""Results streamed to disk give pycocotools' numbers on the whole list.

The evaluator appends each batch's COCO entries to the results files and
evaluates the files; the reference is the in-memory path (all records ->
``records_to_coco_results`` -> plain pycocotools ``COCOeval``) on a
generated set with crowd ground truth, images without ground truth or
without detections, 25 categories, tied scores and an image with more than
100 detections.
"""

import contextlib
import io
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msrcnn_jax.evaluation.coco_evaluator import (
    MMDET_MAX_DETS, CocoEvaluator, load_results, records_to_coco_results)
from msrcnn_jax.evaluation.mask_scoring_report import (
    MaskScoringAccumulator, mask_scoring_report)


def _rle(m):
  e = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
  return {'size': e['size'], 'counts': e['counts'].decode()}


def generated_set(seed=0, num_images=36, num_cats=25, many_dets=130):
  """(pycocotools COCO, category ids, per-image detection records).

  Image 9 has ``many_dets`` detections, the others 0 to 39."""
  rng = np.random.default_rng(seed)
  cat_ids = sorted(int(c) for c in rng.choice(np.arange(1, 91), num_cats,
                                              replace=False))
  images, anns, records = [], [], []
  for i in range(num_images):
    h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
    image_id = 7 + 3 * i
    images.append(dict(id=image_id, file_name=f'{i}.png', height=h, width=w))
    gts = []
    for _ in range(0 if i % 7 == 3 else int(rng.integers(1, 8))):
      m = np.zeros((h, w), bool)
      x0, y0 = int(rng.integers(0, w - 3)), int(rng.integers(0, h - 3))
      m[y0:int(rng.integers(y0 + 2, h + 1)),
        x0:int(rng.integers(x0 + 2, w + 1))] = True
      if rng.random() < 0.4:
        m[(m.nonzero()[0].mean().astype(int)):, :w // 2] = False
      if not m.any():
        continue
      label = int(rng.integers(num_cats))
      rle = _rle(m)
      anns.append(dict(
          id=len(anns) + 1, image_id=image_id, category_id=cat_ids[label],
          segmentation=rle, area=float(mask_util.area(rle)),
          bbox=[float(v) for v in mask_util.toBbox(rle)],
          iscrowd=int(rng.random() < 0.12)))
      gts.append((m, label))
    k = 0 if i % 11 == 5 else (many_dets if i == 9 else int(rng.integers(1, 40)))
    boxes, labels, masks = [], [], []
    for _ in range(k):
      if gts and rng.random() < 0.6:
        m, label = gts[int(rng.integers(len(gts)))]
        m = np.roll(m, int(rng.integers(-3, 4)), axis=int(rng.integers(2)))
      else:
        m, label = np.zeros((h, w), bool), int(rng.integers(num_cats))
        x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        m[y0:int(rng.integers(y0 + 1, h + 1)),
          x0:int(rng.integers(x0 + 1, w + 1))] = True
      ys, xs = m.nonzero()
      jitter = rng.normal(0, 1.5, 4) if len(xs) else np.zeros(4)
      box = ([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs)
             else [0, 0, 1, 1]) + jitter
      boxes.append(box)
      labels.append(label)
      masks.append(_rle(m))
    # Scores in 0.1 steps: many ties within and across images.
    scores = np.sort(np.round(rng.uniform(0.05, 1, k), 1))[::-1]
    mask_iou = np.round(rng.uniform(0.1, 1, k), 2).astype(np.float32)
    scores = scores.astype(np.float32)
    records.append(dict(
        image_id=image_id, file_name=f'{i}.png', ori_shape=(h, w),
        boxes=np.asarray(boxes, np.float32).reshape(k, 4), scores=scores,
        labels=np.asarray(labels, np.int32).reshape(k), mask_iou=mask_iou,
        mask_scores=scores * mask_iou, masks=masks))
  coco = COCO()
  coco.dataset = dict(images=images, annotations=anns, categories=[
      dict(id=c, name=f'c{c}') for c in cat_ids])
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  assert any(a['iscrowd'] for a in anns)
  return coco, cat_ids, records


def _pycocotools_stats(coco, results, iou_type, img_ids):
  preds = json.loads(json.dumps(results))
  if iou_type == 'segm':
    for p in preds:
      p.pop('bbox')
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(coco, coco.loadRes(preds), iou_type)
    ev.params.imgIds = img_ids
    ev.params.maxDets = list(MMDET_MAX_DETS)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return [float(s) for s in ev.stats]


@pytest.fixture(scope='module')
def generated():
  return generated_set()


def test_streamed_files_and_metrics_equal_the_in_memory_path(generated,
                                                              tmp_path):
  coco, cat_ids, records = generated
  ev = CocoEvaluator(coco, cat_ids, output_dir=str(tmp_path),
                     print_table=False)
  scoring = MaskScoringAccumulator(coco, cat_ids)
  start = 0
  for size in (3, 1, 5, 2, 11, 14):   # uneven batches, 36 images
    batch = records[start:start + size]
    ev.add(batch)
    for r in batch:
      scoring.add(r)
    start += size
    # Only the unfinished file exists while records arrive.
    assert not os.path.exists(tmp_path / 'results.segm.json')
    assert os.path.exists(tmp_path / 'results.segm.json.tmp')
  assert start == len(records)
  metrics = ev.evaluate()
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'metrics.json', 'results.bbox.json', 'results.segm.json']

  bbox, segm = records_to_coco_results(records, cat_ids)
  assert len(bbox) == sum(len(r['labels']) for r in records) > 700
  # Byte for byte what json.dump of the whole lists writes.
  for name, res in (('bbox', bbox), ('segm', segm)):
    assert (tmp_path / f'results.{name}.json').read_text() == json.dumps(res)
  img_ids = sorted(r['image_id'] for r in records)
  with open(tmp_path / 'metrics.json') as f:
    saved = json.load(f)
  for name, res in (('bbox', bbox), ('segm', segm)):
    want = _pycocotools_stats(coco, res, name, img_ids)
    assert saved['coco_stats'][name] == want, name
    assert metrics[f'{name}_mAP'] == float(f'{want[0]:.3f}')
  # The stats depend on the crowd / area / maxDets handling of this set.
  assert 0 < saved['coco_stats']['segm'][0] < 1
  assert saved['coco_stats']['bbox'][1] != saved['coco_stats']['bbox'][0]

  # Report from the file + compact numbers == report from the records.
  streamed, log = scoring.report(load_results(ev.results_path('segm')),
                                 metrics=metrics, img_ids=ev.img_ids())
  in_memory, log_mem = mask_scoring_report(coco, records, cat_ids)
  assert streamed == in_memory and log == log_mem
  _, segm_box = records_to_coco_results(records, cat_ids,
                                        segm_score_key='scores')
  box_stats = _pycocotools_stats(coco, segm_box, 'segm', img_ids)
  assert streamed['segm_mAP_boxscore'] == float(f'{box_stats[0]:.3f}')
  assert streamed['num_detections'] == len(segm)


def test_reset_leaves_no_partial_files_and_add_after_evaluate_fails(
    generated, tmp_path):
  coco, cat_ids, records = generated
  ev = CocoEvaluator(coco, cat_ids, output_dir=str(tmp_path),
                     print_table=False)
  ev.add(records[:4])
  ev.reset()   # what evaluate_model does when inference fails
  assert list(tmp_path.iterdir()) == []
  ev.add(records[:4])
  first = ev.evaluate()
  with pytest.raises(RuntimeError, match='reset'):
    ev.add(records[4:6])
  assert ev.evaluate() == first   # evaluates the same files again
  # Without output_dir the files live in a private temporary directory.
  ev = CocoEvaluator(coco, cat_ids, print_table=False, metrics=('bbox',))
  ev.add(records[:4])
  assert ev.evaluate()['bbox_mAP'] == first['bbox_mAP']
  tmp = ev.results_dir
  assert os.listdir(tmp) == ['results.bbox.json']
  del ev
  assert not os.path.exists(tmp)
