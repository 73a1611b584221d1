r"""pycocotools' COCOeval against faster-coco-eval's C++ one: equal? faster?

  pip install faster-coco-eval==1.8.0   # not a dependency of the project
  python benchmarks/cocoeval_backends.py [--images 36] [--seed 0]
      [--many-dets 130]

On the generated set of ``tests/test_evaluation_streaming.py`` (crowd
ground truth, images without ground truth or detections, 25 categories,
tied scores, one image with ``--many-dets`` detections), ``--images``
images, runs
bbox and segm evaluation with mmdetection's ``maxDets = (100, 300, 1000)``
and with pycocotools' default ``(1, 10, 100)``, each through
``COCO.loadRes`` of pycocotools, then ``evaluate/accumulate/summarize`` of
``pycocotools.cocoeval.COCOeval`` and of ``faster_coco_eval.COCOeval_faster``.
Prints, per case, whether the 12 stats and the accumulated ``precision`` /
``recall`` / ``scores`` arrays are bit-identical, the largest differences,
and the CPU seconds of each.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import time

import numpy as np
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'tests'))
from test_evaluation_streaming import generated_set  # pylint: disable=g-import-not-at-top,wrong-import-position

from msrcnn_jax.evaluation.coco_evaluator import (  # pylint: disable=wrong-import-position
    MMDET_MAX_DETS, records_to_coco_results)


def run(cls, coco, results, iou_type, max_dets):
  """(12 stats, accumulated eval dict, CPU seconds of evaluate..summarize)."""
  preds = copy.deepcopy(results)
  if iou_type == 'segm':
    for p in preds:
      p.pop('bbox')
  with contextlib.redirect_stdout(io.StringIO()):
    dt = coco.loadRes(preds)
    kw = {} if cls is COCOeval else dict(print_function=lambda *a: None)
    ev = cls(coco, dt, iou_type, **kw)
    if max_dets:
      ev.params.maxDets = list(max_dets)
    t = time.process_time()
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    t = time.process_time() - t
  return np.asarray(ev.stats[:12], np.float64), ev.eval, t


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--images', type=int, default=36)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--many-dets', type=int, default=130,
                  help='detections on image 9 (the others have < 40)')
  args = ap.parse_args()
  import faster_coco_eval  # pylint: disable=g-import-not-at-top
  from faster_coco_eval import COCOeval_faster  # pylint: disable=g-import-not-at-top
  coco, cat_ids, records = generated_set(args.seed, args.images,
                                          many_dets=args.many_dets)
  bbox, segm = records_to_coco_results(records, cat_ids)
  print(f'faster-coco-eval {faster_coco_eval.__version__}; {args.images} '
        f'images, {len(coco.anns)} GT ({sum(a["iscrowd"] for a in coco.anns.values())} '
        f'crowd), {len(bbox)} detections, load {os.getloadavg()[0]:.1f}')
  for iou_type, results in (('bbox', bbox), ('segm', segm)):
    for max_dets in (MMDET_MAX_DETS, None):
      ref, ref_eval, ref_t = run(COCOeval, coco, results, iou_type, max_dets)
      got, got_eval, got_t = run(COCOeval_faster, copy.deepcopy(coco),
                                 results, iou_type, max_dets)
      diff = np.abs(ref - got)
      arrays = []
      for key in ('precision', 'recall', 'scores'):
        a, b = np.asarray(ref_eval[key]), np.asarray(got_eval[key])
        same = a.shape == b.shape and np.array_equal(a, b)
        arrays.append(f'{key} ' + ('equal' if same else
                                   f'max diff {np.abs(a - b).max():.1e} in '
                                   f'{int((a != b).sum())} of {a.size}'))
      print(f'{iou_type} maxDets {max_dets or "(1, 10, 100)"}: stats '
            + ('bit-identical' if not diff.any() else
               f'differ in {[int(i) for i in np.nonzero(diff)[0]]}, max '
               f'{diff.max():.2e}')
            + f'; {"; ".join(arrays)}; CPU {ref_t * 1e3:.0f} ms '
            f'pycocotools, {got_t * 1e3:.0f} ms faster-coco-eval')
      if diff.any():
        print(f'  pycocotools      {np.array2string(ref, precision=6)}\n'
              f'  faster-coco-eval {np.array2string(got, precision=6)}')


if __name__ == '__main__':
  main()
