r"""Evaluation throughput: images/s of ``evaluate_model`` end to end.

  python benchmarks/eval_throughput.py [--images 200] [--detections 100]
      [--batch-size 2] [--repeats 3] [--paste device|host]
      [--postprocess-workers -1]

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
the padded-pixel overhead of the configured buckets and of buckets chosen
from the set's sizes (``cfg.data.eval_num_buckets``), and the host
post-processing cost per image per core (CPU seconds of
paste + RLE + record assembly, all processes, divided by images): the
figure that caps evaluation at ``cores / cost`` images/s whatever the
accelerator; and the peak resident memory of the process over the first
``evaluate_model`` (``ru_maxrss``) beside its RSS just before (the warm-up
pass drops its records). The minimum over ``--repeats`` runs is reported (this VM is
shared; the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import tempfile
import time

import cv2
import jax
import numpy as np

from msrcnn_jax import inference
from msrcnn_jax import postprocess
from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.data import coco as coco_lib
from msrcnn_jax.data import pipeline
from msrcnn_jax.evaluation import coco_evaluator
from msrcnn_jax.evaluation import mask_scoring_report
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


def run_once(args, root, gt_by_image, cat2label):
  cfg = ms_rcnn_config()
  cfg.data.source = 'coco'
  cfg.data.coco_dir = root
  cfg.data.val_split = 'val'
  cfg.data.num_workers = args.workers
  cfg.test.batch_size = args.batch_size
  cfg.test.mask_paste = args.paste
  cfg.test.postprocess_workers = args.postprocess_workers
  k = cfg.test.rcnn.max_per_img
  stub = {'s': 0.}

  class StubPredictor(Predictor):
    """The real Predictor with the detector replaced by synthetic outputs."""

    def __init__(self):  # pylint: disable=super-init-not-called
      self.config = cfg
      self.variables = {}
      self.paste_on_device = inference.masks_on_device(args.paste)
      self.postprocess_workers = (
          inference.default_postprocess_workers()
          if cfg.test.postprocess_workers < 0 else
          cfg.test.postprocess_workers)
      self.timings = {}
      self._pool = None
      self._paste = jax.jit(postprocess.paste_on_device,
                            static_argnames=('canvas_hw', 'mask_thr'))
      self._encode = jax.jit(postprocess.encode_on_device)

    def detect(self, batch):
      t = time.perf_counter()
      out = synthetic_outputs(batch, gt_by_image, args.detections, k,
                              cat2label)
      stub['s'] += time.perf_counter() - t
      return jax.device_put(out)

  cocoeval = {'wall': 0., 'cpu': 0.}
  # What evaluate_model runs after (or beside) the detector loop: results
  # entries, COCOeval and the mask-scoring report (whichever the code has).
  targets = [(owner, name) for owner, name in (
      (coco_evaluator.CocoEvaluator, 'add'),
      (coco_evaluator.CocoEvaluator, 'evaluate'),
      (mask_scoring_report, 'mask_scoring_report'),
      (getattr(mask_scoring_report, 'MaskScoringAccumulator', None), 'add'),
      (getattr(mask_scoring_report, 'MaskScoringAccumulator', None),
       'report')) if owner is not None]
  saved = [getattr(owner, name) for owner, name in targets]

  def timed(fn):
    def wrapper(*a, **kw):
      t, c = time.perf_counter(), time.thread_time()
      try:
        return fn(*a, **kw)
      finally:
        cocoeval['wall'] += time.perf_counter() - t
        cocoeval['cpu'] += time.thread_time() - c
    return wrapper
  for (owner, name), fn in zip(targets, saved):
    setattr(owner, name, timed(fn))
  source = coco_lib.CocoSource(root, 'val', train=False)
  predictor = StubPredictor()
  try:
    # Compiles the paste programs and starts the workers outside the timing.
    # The records are dropped as they come (the peak RSS is evaluate's).
    with contextlib.redirect_stdout(open(os.devnull, 'w')):
      collections.deque(predictor.predict_batches(pipeline.make_eval_iterator(
          cfg, source, process_index=0, process_count=1)), maxlen=0)
    predictor.timings, stub['s'] = {}, 0.
    rss_before = _rss_mb()
    with tempfile.TemporaryDirectory() as out_dir:
      t0 = time.perf_counter()
      with contextlib.redirect_stdout(open(os.devnull, 'w')):
        metrics, _ = eval_run.evaluate_model(
            cfg, {}, out_dir, source=source, progress=False,
            predictor=predictor)
      wall = time.perf_counter() - t0
      max_rss = _max_rss_mb()
  finally:
    for (owner, name), fn in zip(targets, saved):
      setattr(owner, name, fn)
    predictor.close()
  t = predictor.timings
  return dict(wall=wall - stub['s'], stub=stub['s'],
              device=t.get('device', 0.), paste=t.get('paste', 0.),
              rle=t.get('rle', 0.), postprocess=t.get('postprocess', 0.),
              host_wait=t.get('host_wait', 0.), cocoeval=cocoeval['wall'],
              cocoeval_cpu=cocoeval['cpu'], segm=metrics['segm_mAP'],
              bbox=metrics['bbox_mAP'], rss_before=rss_before,
              max_rss=max_rss)


def _rss_mb() -> float:
  """This process's resident set size now, MB."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _max_rss_mb() -> float:
  """This process's peak resident set size so far (ru_maxrss, KB), MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--images', type=int, default=200)
  ap.add_argument('--detections', type=int, default=100)
  ap.add_argument('--batch-size', type=int, default=2)
  ap.add_argument('--workers', type=int, default=2,
                  help='input pipeline threads (cfg.data.num_workers)')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--paste', choices=('device', 'host'), default='device',
                  help='cfg.test.mask_paste (with --postprocess-workers 0, '
                  'host is the code before issue 11 but for the RLE)')
  ap.add_argument('--postprocess-workers', type=int, default=-1,
                  help='cfg.test.postprocess_workers (-1: CPU cores - 1)')
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
          f'{args.detections} detections each, batch {args.batch_size}, '
          f'paste on {args.paste}, postprocess_workers '
          f'{args.postprocess_workers}')
    cfg = ms_rcnn_config()
    pads = pipeline.padded_sizes([[im['height'], im['width']]
                                  for im in ds['images']], cfg.data)
    print(f'padded pixels over the /32-padded sizes: cfg.data.buckets '
          f'{100 * pipeline.padding_overhead(pads, cfg.data.buckets):.1f}%')
    for nb in range(1, 5):
      chosen = pipeline.buckets_from_sizes(pads, nb)
      print(f'  eval_num_buckets={nb}: {list(chosen)} '
            f'{100 * pipeline.padding_overhead(pads, chosen):.1f}%')
    runs = [run_once(args, root, gt_by_image, cat2label)
            for _ in range(args.repeats)]
  n = args.images
  for i, r in enumerate(runs):
    print(f'run {i}: {n / r["wall"]:6.2f} images/s wall | ' + ', '.join(
        f'{k} {r[k]:.2f} s' for k in ('device', 'paste', 'rle',
                                      'postprocess', 'host_wait',
                                      'cocoeval')) +
          f' | bbox_mAP {r["bbox"]} segm_mAP {r["segm"]}')
  best = min(runs, key=lambda r: r['wall'])
  print(f'best of {len(runs)}: {n / best["wall"]:.2f} images/s end to end '
        f'({best["wall"]:.1f} s wall without the stand-in detector\'s '
        f'{best["stub"]:.1f} s)')
  for key, what in (('device', 'wall, waiting for the device (paste '
                     'program + copy)'),
                    ('paste', 'CPU, host pasting'),
                    ('rle', 'CPU, RLE strings'),
                    ('host_wait', 'wall, main thread waiting for workers'),
                    ('cocoeval', 'wall, pycocotools bbox + segm + report'),
                    ('cocoeval_cpu', 'CPU, of which in this thread')):
    print(f'  {key:12s} {min(r[key] for r in runs) * 1e3 / n:8.2f} ms/image '
          f'({what})')
  host = min(r['postprocess'] for r in runs)
  print(f'host post-processing cost: {host * 1e3 / n:.2f} ms per image per '
        f'core (CPU time of outputs_to_records: paste + RLE + records, '
        f'min over runs)')
  first = runs[0]
  print(f'peak RSS of this process (ru_maxrss) after the first '
        f'evaluate_model: {first["max_rss"]:.0f} MB; RSS just before it '
        f'{first["rss_before"]:.0f} MB (+{first["max_rss"] - first["rss_before"]:.0f} MB)')


if __name__ == '__main__':
  main()
