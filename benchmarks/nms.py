"""Speed of RPN proposals and box post-processing at the released test scale.

Runs ``get_proposals`` on random RPN maps of a 800x1344 bucket (a 1333x800
image: P2 is 200x336, 201600 anchors) and ``get_detections`` on 1000 random
RoIs with 81 classes, on the current JAX backend. Prints compile time and
milliseconds per call (median and min after compile, ``block_until_ready``).

  python benchmarks/nms.py [--batch 1] [--block-size 256] [--iters 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from msrcnn_jax.modeling.heads.box_postprocess import get_detections
from msrcnn_jax.modeling.rpn import get_proposals

STRIDES = (4, 8, 16, 32, 64)


def rpn_inputs(rng, batch, bucket=(800, 1344)):
  cls, reg = [], []
  for s in STRIDES:
    h, w = -(-bucket[0] // s), -(-bucket[1] // s)
    cls.append(rng.normal(-2, 2, (batch, h, w, 3)).astype(np.float32))
    reg.append(rng.normal(0, 0.3, (batch, h, w, 12)).astype(np.float32))
  img_shape = np.tile(np.array([[800, 1333]], np.int32), (batch, 1))
  pad_shape = np.tile(np.array([[800, 1344]], np.int32), (batch, 1))
  return cls, reg, img_shape, pad_shape


def det_inputs(rng, batch, rois=1000, sparse=False):
  """Random RoIs; ``sparse``: ~12000 candidates pass, above the cap."""
  xy = rng.uniform(0, 1200, (batch, rois, 2))
  wh = rng.uniform(10, 300, (batch, rois, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  logits = rng.normal(0, 4.0, (batch, rois, 81))
  if sparse:  # 12 classes per RoI at probability ~0.06
    logits = rng.normal(0, 0.1, (batch, rois, 81))
    hot = rng.permuted(np.tile(np.arange(80), (batch, rois, 1)), axis=-1)
    np.put_along_axis(logits, hot[..., :12], 3.0, axis=-1)
  logits = logits.astype(np.float32)
  deltas = rng.normal(0, 0.5, (batch, rois, 320)).astype(np.float32)
  return dict(rois=boxes, roi_valid=np.ones((batch, rois), bool),
              cls_logits=logits, deltas=deltas,
              img_shape=np.tile(np.array([[800, 1333]], np.int32),
                                (batch, 1)),
              scale_factor=np.full((batch, 4), 1.6, np.float32))


def timeit(fn, args, iters):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return compile_s, float(np.median(times)), float(np.min(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--block-size', type=int, default=256)
  ap.add_argument('--iters', type=int, default=10)
  ap.add_argument('--max-candidates', type=int, default=8000)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  print(f'backend {jax.default_backend()}, batch {args.batch}, '
        f'block {args.block_size}')

  cls, reg, img_shape, pad_shape = rpn_inputs(rng, args.batch)
  for nms_pre in (1000, 2000):
    fn = jax.jit(lambda c, r, i, p, n=nms_pre: get_proposals(
        c, r, i, p, nms_pre=n, max_per_img=1000, iou_threshold=0.7,
        block_size=args.block_size))
    inputs = ([jnp.asarray(c) for c in cls], [jnp.asarray(r) for r in reg],
              jnp.asarray(img_shape), jnp.asarray(pad_shape))
    c_s, ms, ms_min = timeit(fn, inputs, args.iters)
    n = int(np.asarray(fn(*inputs)[2]).sum())
    print(f'get_proposals nms_pre={nms_pre}: compile {c_s:.2f} s, '
          f'{ms:.2f} ms/call median, {ms_min:.2f} min ({n} proposals)')

  for sparse in (False, True):
    d = det_inputs(rng, args.batch, sparse=sparse)
    probs = jax.nn.softmax(jnp.asarray(d['cls_logits']), -1)[..., :80]
    passing = int((probs > 0.05).sum()) // args.batch
    fn = jax.jit(lambda *a: get_detections(
        *a, score_thr=0.05, iou_threshold=0.5, max_per_img=100,
        max_candidates=args.max_candidates, block_size=args.block_size))
    inputs = [jnp.asarray(d[k]) for k in ('rois', 'roi_valid', 'cls_logits',
                                          'deltas', 'img_shape',
                                          'scale_factor')]
    c_s, ms, ms_min = timeit(fn, inputs, args.iters)
    print(f'get_detections ({passing} candidates > 0.05 per image): '
          f'compile {c_s:.2f} s, {ms:.2f} ms/call median, {ms_min:.2f} min')


if __name__ == '__main__':
  main()
