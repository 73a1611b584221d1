r"""Evaluation throughput: images/s of ``evaluate_model`` end to end.

  python benchmarks/eval_throughput.py [--images 200] [--detections 100]
      [--batch-size 2] [--repeats 3] [--paste host|device]

Writes a COCO-format directory of ``--images`` JPEGs with COCO-like sizes
(640x480, 640x427, 480x640, 500x375, 640x640, 427x640, 612x612, 640x360)
and ~7 polygon instances each over the 80 COCO categories, then runs
``msrcnn_jax.evaluation.run.evaluate_model`` on it with the detector
replaced by synthetic outputs in its output format (``--detections`` valid
detections per image: the first ones jitter the ground-truth boxes, the
rest are random boxes; 28x28 mask logits of a smooth blob), so that the
host part is isolated: what the accelerator computes in the real detector
costs nothing here. Everything after the detector is the real code.

Prints the end-to-end images/s (wall) and the split into
- input: reading, resizing and padding images (the data pipeline);
- device: the detector stand-in plus, with ``--paste device``, the jitted
  paste program and the device->host copy;
- paste / RLE: host pasting at the original size and RLE encoding;
- COCOeval: bbox + segm pycocotools evaluation and the mask-scoring report;
and the host post-processing cost per image per core (CPU seconds of
paste + RLE + record assembly, all processes, divided by images): the
figure that caps evaluation at ``cores / cost`` images/s whatever the
accelerator. The minimum over ``--repeats`` runs is reported (this VM is
shared; the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import cv2
import jax
import numpy as np

from msrcnn_jax import postprocess
from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.data import coco as coco_lib
from msrcnn_jax.evaluation import coco_evaluator
from msrcnn_jax.evaluation import run as eval_run
from msrcnn_jax.inference import Predictor

COCO_LIKE_SIZES = ((480, 640), (427, 640), (640, 480), (375, 500),
                   (640, 640), (640, 427), (612, 612), (360, 640))


def _polygon(rng, h, w):
  """A random convex-ish polygon (COCO list-of-floats format) and its box."""
  cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
  rx = rng.uniform(0.03, 0.35) * w
  ry = rng.uniform(0.03, 0.35) * h
  t = np.sort(rng.uniform(0, 2 * np.pi, 12))
  xs = np.clip(cx + rx * np.cos(t) * rng.uniform(.7, 1, 12), 0, w - 1)
  ys = np.clip(cy + ry * np.sin(t) * rng.uniform(.7, 1, 12), 0, h - 1)
  poly = np.stack([xs, ys], 1).reshape(-1).tolist()
  box = [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
  return poly, box


def write_dataset(root: str, n: int, seed: int = 0) -> list[dict]:
  """COCO-format ``root/annotations/instances_val.json`` + ``root/val/``."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'val'), exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  cfg = ms_rcnn_config()
  cats = [dict(id=int(c), name=str(nm)) for c, nm in
          zip(cfg.data.category_ids, cfg.data.class_names)]
  images, anns = [], []
  for i in range(n):
    h, w = COCO_LIKE_SIZES[i % len(COCO_LIKE_SIZES)]
    img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    name = f'{i:06d}.jpg'
    for _ in range(int(rng.integers(3, 12))):
      poly, box = _polygon(rng, h, w)
      if box[2] < 2 or box[3] < 2:
        continue
      pts = np.asarray(poly, np.float32).reshape(-1, 2).astype(np.int32)
      cv2.fillPoly(img, [pts], tuple(int(v) for v in rng.integers(0, 255, 3)))
      anns.append(dict(id=len(anns) + 1, image_id=i + 1,
                       category_id=int(cats[rng.integers(0, 80)]['id']),
                       segmentation=[poly], bbox=box,
                       area=float(box[2] * box[3] * 0.7), iscrowd=0))
    cv2.imwrite(os.path.join(root, 'val', name), img)
    images.append(dict(id=i + 1, file_name=name, height=h, width=w))
  with open(os.path.join(root, 'annotations', 'instances_val.json'),
            'w') as f:
    json.dump(dict(images=images, annotations=anns, categories=cats), f)
  return images


def synthetic_outputs(batch, gt_by_image, num_dets: int, k: int,
                      cat2label) -> dict[str, np.ndarray]:
  """The detector's output dict (numpy) for a batch, from the image ids."""
  b = len(batch['image_id'])
  out = dict(boxes=np.zeros((b, k, 4), np.float32),
             scores=np.zeros((b, k), np.float32),
             labels=np.zeros((b, k), np.int32),
             valid=np.zeros((b, k), bool),
             mask_logits=np.zeros((b, k, 28, 28), np.float32),
             mask_iou=np.zeros((b, k), np.float32),
             mask_iou_all=np.zeros((b, k, 80), np.float32),
             mask_scores=np.zeros((b, k), np.float32))
  yy, xx = np.mgrid[0:28, 0:28].astype(np.float32) / 27 * 2 - 1
  for i in range(b):
    image_id = int(batch['image_id'][i])
    rng = np.random.default_rng(image_id)
    h, w = (int(v) for v in batch['ori_shape'][i])
    gts = gt_by_image.get(image_id, [])
    boxes, labels = [], []
    for a in gts:
      x, y, bw, bh = a['bbox']
      j = rng.normal(0, 0.05, 4) * [bw, bh, bw, bh]
      boxes.append([x + j[0], y + j[1], x + bw + j[2], y + bh + j[3]])
      labels.append(cat2label[a['category_id']])
    while len(boxes) < num_dets:
      bw = np.exp(rng.uniform(np.log(8), np.log(w)))
      bh = np.exp(rng.uniform(np.log(8), np.log(h)))
      x, y = rng.uniform(0, w - bw + 1e-3), rng.uniform(0, h - bh + 1e-3)
      boxes.append([x, y, x + bw, y + bh])
      labels.append(int(rng.integers(0, 80)))
    boxes = np.asarray(boxes[:num_dets], np.float32)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    n = len(boxes)
    ax = rng.uniform(.5, 1.2, (n, 1, 1))
    ay = rng.uniform(.5, 1.2, (n, 1, 1))
    blob = 1 - (xx / ax) ** 2 - (yy / ay) ** 2
    logits = 6 * blob + rng.normal(0, .5, (n, 28, 28))
    out['boxes'][i, :n] = boxes
    out['scores'][i, :n] = np.sort(rng.uniform(.05, 1, n))[::-1]
    out['labels'][i, :n] = labels[:num_dets]
    out['valid'][i, :n] = True
    out['mask_logits'][i, :n] = logits
    out['mask_iou'][i, :n] = rng.uniform(.2, 1, n)
    out['mask_scores'][i, :n] = out['scores'][i, :n] * out['mask_iou'][i, :n]
  out['paste_boxes'] = out['boxes'].copy()
  return out


class Timer:
  """Accumulates wall and thread-CPU seconds per stage name."""

  def __init__(self):
    self.wall, self.cpu = {}, {}

  @contextlib.contextmanager
  def __call__(self, name):
    t, c = time.perf_counter(), time.thread_time()
    try:
      yield
    finally:
      self.wall[name] = self.wall.get(name, 0.) + time.perf_counter() - t
      self.cpu[name] = self.cpu.get(name, 0.) + time.thread_time() - c

  def wrap(self, name, fn):
    def timed(*args, **kwargs):
      with self(name):
        return fn(*args, **kwargs)
    return timed


def run_once(args, root, gt_by_image, cat2label):
  cfg = ms_rcnn_config()
  cfg.data.source = 'coco'
  cfg.data.coco_dir = root
  cfg.data.val_split = 'val'
  cfg.data.num_workers = args.workers
  cfg.test.batch_size = args.batch_size
  timer = Timer()
  k = cfg.test.rcnn.max_per_img

  class StubPredictor(Predictor):
    """The real Predictor with the detector replaced by synthetic outputs."""

    def __init__(self):  # pylint: disable=super-init-not-called
      self.config = cfg
      self.variables = {}

    def predict_batch(self, batch):
      with timer('device'):
        out = synthetic_outputs(batch, gt_by_image, args.detections, k,
                                cat2label)
        return jax.device_get(jax.device_put(out))

  saved = (postprocess.paste_masks, postprocess.encode_rle,
           coco_evaluator.CocoEvaluator.evaluate,
           coco_evaluator.CocoEvaluator.mask_scoring_report,
           postprocess.outputs_to_records)
  postprocess.outputs_to_records = timer.wrap('postprocess', saved[4])
  postprocess.paste_masks = timer.wrap('paste', saved[0])
  postprocess.encode_rle = timer.wrap('rle', saved[1])
  coco_evaluator.CocoEvaluator.evaluate = timer.wrap('cocoeval', saved[2])
  coco_evaluator.CocoEvaluator.mask_scoring_report = timer.wrap(
      'cocoeval', saved[3])
  source = coco_lib.CocoSource(root, 'val', train=False)
  try:
    with tempfile.TemporaryDirectory() as out_dir:
      t0, c0 = time.perf_counter(), time.process_time()
      with contextlib.redirect_stdout(open(os.devnull, 'w')):
        metrics, _ = eval_run.evaluate_model(
            cfg, {}, out_dir, source=source, progress=False,
            predictor=StubPredictor())
      wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  finally:
    (postprocess.paste_masks, postprocess.encode_rle,
     coco_evaluator.CocoEvaluator.evaluate,
     coco_evaluator.CocoEvaluator.mask_scoring_report,
     postprocess.outputs_to_records) = saved
  return dict(wall=wall, cpu=cpu, stage_wall=timer.wall,
              stage_cpu=timer.cpu, segm=metrics['segm_mAP'],
              bbox=metrics['bbox_mAP'])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--images', type=int, default=200)
  ap.add_argument('--detections', type=int, default=100)
  ap.add_argument('--batch-size', type=int, default=2)
  ap.add_argument('--workers', type=int, default=2,
                  help='input pipeline threads (cfg.data.num_workers)')
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as root:
    write_dataset(root, args.images)
    with open(os.path.join(root, 'annotations', 'instances_val.json')) as f:
      ds = json.load(f)
    gt_by_image = {}
    for a in ds['annotations']:
      gt_by_image.setdefault(a['image_id'], []).append(a)
    cat2label = {c['id']: i for i, c in enumerate(
        sorted(ds['categories'], key=lambda c: c['id']))}
    print(f'backend {jax.default_backend()}, {cores} CPU cores (load '
          f'{os.getloadavg()[0]:.1f}), {args.images} images, '
          f'{args.detections} detections each, batch {args.batch_size}')
    runs = [run_once(args, root, gt_by_image, cat2label)
            for _ in range(args.repeats)]
  n = args.images
  for i, r in enumerate(runs):
    print(f'run {i}: {n / r["wall"]:6.2f} images/s wall, '
          f'stages (wall s) ' + ', '.join(
              f'{k} {v:.2f}' for k, v in sorted(r['stage_wall'].items())) +
          f' | bbox_mAP {r["bbox"]} segm_mAP {r["segm"]}')
  best = min(runs, key=lambda r: r['wall'])
  stages = ('device', 'postprocess', 'paste', 'rle', 'cocoeval')
  print(f'best of {len(runs)}: {n / best["wall"]:.2f} images/s end to end '
        f'({best["wall"]:.1f} s wall, {best["cpu"]:.1f} CPU s)')
  for s in stages:
    wall = min(r['stage_wall'].get(s, 0.) for r in runs)
    cpu = min(r['stage_cpu'].get(s, 0.) for r in runs)
    print(f'  {s:9s} {wall * 1e3 / n:7.2f} ms/image wall, '
          f'{cpu * 1e3 / n:7.2f} ms/image CPU')
  host = min(r['stage_cpu']['postprocess'] for r in runs)
  print(f'host post-processing cost: {host * 1e3 / n:.2f} ms per image per '
        f'core (CPU time of outputs_to_records: paste + RLE + records, '
        f'min over runs)')


if __name__ == '__main__':
  main()
