"""Speed of RoIAlign on 1333x800 FPN maps (256 channels), current backend.

Prints compile time and ms per call (after compile; wall and process CPU
time, median) for
``multilevel_roi_align`` with 1000 RoIs x 7x7 (bbox) and 100 RoIs x 14x14
(mask), and the fraction of RoIs that are exact under the sample cap.

  python benchmarks/roi_align.py [--max-samples 16] [--chunk 32] [--batch 1]
      [--grad] [--analysis]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from msrcnn_jax.ops import roi_align as ra


def random_boxes(rng, n, img_hw=(800, 1333), max_ratio=8.):
  """RoIs with log-uniform size 8..800 px and aspect ratio up to 1:8."""
  size = np.exp(rng.uniform(np.log(8), np.log(800), n))
  ratio = np.exp(rng.uniform(-np.log(max_ratio), np.log(max_ratio), n))
  w = np.minimum(size * np.sqrt(ratio), img_hw[1])
  h = np.minimum(size / np.sqrt(ratio), img_hw[0])
  x1 = rng.uniform(0, img_hw[1] - w)
  y1 = rng.uniform(0, img_hw[0] - h)
  return np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)


def exact_fraction(boxes, out, max_samples, strides=(4, 8, 16, 32)):
  lvl = np.asarray(ra.map_roi_levels(jnp.asarray(boxes)))
  s = np.asarray(strides, np.float32)[lvl]
  side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / s
  return float(np.mean(np.ceil(side / out) <= max_samples))


def analysis(caps=(4, 8, 16), ratios=(1, 2, 4, 8, 16)):
  """Exact fraction per aspect ratio: sqrt(area) log-uniform 16..800 px."""
  rng = np.random.default_rng(0)
  n = 20000
  print('exact RoIs (%) by aspect ratio; sqrt(area) log-uniform 16..800 px '
        'in a 1333x800 image, either orientation')
  print('out cap ' + ' '.join(f'{"1:" + str(r):>7}' for r in ratios))
  for out in (7, 14):
    for cap in caps:
      row = []
      for r in ratios:
        size = np.exp(rng.uniform(np.log(16), np.log(800), n))
        flip = rng.uniform(size=n) < .5
        long = np.minimum(size * np.sqrt(r), np.where(flip, 800, 1333))
        short = np.minimum(size * size / long, np.where(flip, 1333, 800))
        w, h = np.where(flip, short, long), np.where(flip, long, short)
        boxes = np.stack([0 * w, 0 * h, w, h], -1).astype(np.float32)
        row.append(100 * exact_fraction(boxes, out, cap))
      print(f'{out:>3} {cap:>3} ' + ' '.join(f'{v:7.1f}' for v in row))


def bench(feats, boxes, pad, out, max_samples, chunk, reps, grad=False):
  fn = lambda f, b, p: ra.multilevel_roi_align(
      f, b, p, output_size=out, max_samples=max_samples, chunk=chunk)
  if grad:  # forward + backward w.r.t. the features (training).
    fwd = fn
    fn = jax.grad(lambda f, b, p: jnp.sum(fwd(f, b, p) ** 2))
  fn = jax.jit(fn)
  block = lambda x: jax.block_until_ready(x)
  t0 = time.perf_counter()
  block(fn(feats, boxes, pad))
  compile_s = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(reps):
    t0, c0 = time.perf_counter(), time.process_time()
    block(fn(feats, boxes, pad))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return compile_s, 1e3 * float(np.median(times)), 1e3 * float(
      np.median(cpu))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--max-samples', type=int,
                 default=ra.DEFAULT_MAX_SAMPLES)
  p.add_argument('--mask-max-samples', type=int, default=None)
  p.add_argument('--chunk', type=int, default=None)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--channels', type=int, default=256)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--grad', action='store_true',
                 help='time forward + backward (features gradient)')
  p.add_argument('--analysis', action='store_true',
                 help='only print the exact fractions per aspect ratio')
  args = p.parse_args()
  if args.analysis:
    analysis()
    return
  rng = np.random.default_rng(0)
  b, c = args.batch, args.channels
  pad = jnp.asarray([[800, 1344]] * b, jnp.int32)
  feats = [jnp.asarray(rng.normal(size=(b, 800 // s, 1344 // s, c)),
                       jnp.float32) for s in (4, 8, 16, 32)]
  print(f'backend {jax.default_backend()}, batch {b}, C {c}, '
        f'chunk {args.chunk}')
  mask_s = args.mask_max_samples or args.max_samples
  for n, out, s in ((1000, 7, args.max_samples), (100, 14, mask_s)):
    boxes = np.stack([random_boxes(rng, n) for _ in range(b)])
    frac = exact_fraction(boxes.reshape(-1, 4), out, s)
    comp, ms, cpu_ms = bench(feats, jnp.asarray(boxes), pad, out, s,
                             args.chunk, args.reps, args.grad)
    what = 'fwd+bwd' if args.grad else 'fwd'
    print(f'{n} RoIs x {out}x{out}, max_samples {s} ({what}): compile '
          f'{comp:.2f} s, {ms:.1f} ms/call ({cpu_ms:.1f} CPU-ms), exact '
          f'RoIs {100 * frac:.1f}%')


if __name__ == '__main__':
  main()
