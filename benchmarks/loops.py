r"""Measured trip counts of the data-dependent loops, and their device cost.

Counts how many times each ``lax.while_loop`` / ``fori_loop`` body of NMS and
RoIAlign runs on full-scale inputs (a 1333x800 image, bucket 800x1344), as
the batched (``vmap``) program runs it: under ``vmap`` a loop runs until its
last element is done, so the count is what a device executes. The counter is
a host callback without arguments added to each loop body while the program
is traced (the production code is unchanged): it runs once per iteration.

Inputs (``--scenes``):
  * ``coco``: synthetic COCO-like scenes (object count log-normal, mean ~7;
    sqrt(area) log-normal around 40 px at COCO scale, x1.67 to the test
    scale; aspect ratio h/w log-normal, sigma 0.55), with RPN maps and R-CNN
    logits that a trained detector would give: objectness rising with the
    anchor's IoU with its best object, deltas regressing towards it, class
    logits rising with the RoI's IoU (sometimes a second, confused class);
  * ``fixture``: mmdetection's own proposals and R-CNN outputs of the two
    full-scale fixture images (random weights,
    ``tests/fixtures/mmdet/r50_caffe_tiny_fullscale``), repeated to the
    batch.

Stages counted: RPN proposals (test nms_pre 1000, train nms_pre 2000; NMS
block loop, kept-buffer scan, in-block fixed point), R-CNN multiclass NMS,
RoIAlign's tap loop (steps of ``TAPS_PER_STEP`` taps per chunk; box stage
7x7 of the 1000 proposals, mask stage 14x14 of the 100 detections,
training 512 sampled RoIs 7x7 and <= 128 positive RoIs 14x14, forward and
the backward scan), with the taps that sorting by ``(ny, nx)`` (the former
order) and by ``ny * nx`` would loop, simulated from the RoIs' used slots.

``--hlo`` (needs the jax-cuda12 plugin, e.g. /work/venv-8) also compiles each
stage alone for the H200 target (batch ``--batch`` on one chip, deviceless)
and prints, per ``while`` loop of the optimised program, the kernels and
the bytes its body (condition included) moves per iteration, estimated
from the operand and result shapes (a gather counts the rows it reads, an
in-place update the rows it writes). BENCHMARKS.md ("Loop decisions")
turns trips x per-iteration figures into device-time estimates.

  python benchmarks/loops.py [--batch 8] [--scenes coco,fixture] \
      [--block-sizes 256,1024] [--roi-chunk 512]
  JAX_PLATFORMS=cpu /work/venv-8/bin/python benchmarks/loops.py --hlo ...
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from msrcnn_jax.modeling.heads.box_postprocess import get_detections
from msrcnn_jax.modeling.rpn import get_proposals
from msrcnn_jax.ops import anchors as anchors_lib
from msrcnn_jax.ops import boxes as boxes_lib
from msrcnn_jax.ops import roi_align as ra

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot  # pylint: disable=g-import-not-at-top,wrong-import-position

IMG = (800, 1333)     # test-scale image (h, w)
PAD = (800, 1344)     # padded to /32
STRIDES = (4, 8, 16, 32, 64)
FIXTURES = 'tests/fixtures/mmdet/r50_caffe_tiny_fullscale'

# ---------------------------------------------------------------- counting
COUNTS: collections.Counter = collections.Counter()


@contextlib.contextmanager
def counted_loops():
  """Within: loops traced here count their iterations in ``COUNTS``.

  Keys are the ``file:line`` that called ``while_loop``/``fori_loop``. A
  ``jax.debug.callback`` without arguments in a batched loop body runs once
  per iteration of the batched loop, i.e. the device's trip count.
  """
  orig_while, orig_fori = jax.lax.while_loop, jax.lax.fori_loop

  def site():
    f = inspect.stack()[2]
    return f'{os.path.basename(f.filename)}:{f.lineno}'

  def tick(name):
    jax.debug.callback(lambda: COUNTS.update([name]))

  def while_loop(cond, body, init):
    name = site()
    def counted(x):
      tick(name)
      return body(x)
    return orig_while(cond, counted, init)

  def fori_loop(lower, upper, body, init, **kw):
    name = site()
    def counted(i, x):
      tick(name)
      return body(i, x)
    return orig_fori(lower, upper, counted, init, **kw)

  jax.lax.while_loop, jax.lax.fori_loop = while_loop, fori_loop
  ra._multilevel_jit.clear_cache()  # pylint: disable=protected-access
  try:
    yield
  finally:
    jax.lax.while_loop, jax.lax.fori_loop = orig_while, orig_fori
    ra._multilevel_jit.clear_cache()  # pylint: disable=protected-access


def run_counted(fn, *args):
  """``(trips per loop site, CPU seconds of the run)`` of ``fn(*args)``."""
  with counted_loops():
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    COUNTS.clear()
    t0 = time.process_time()
    jax.block_until_ready(compiled(*args))
    cpu = time.process_time() - t0
  return dict(COUNTS), cpu


# ------------------------------------------------------------------ scenes
def coco_like_gt(rng, n_obj):
  """``(n, 4)`` float32 boxes at test scale with COCO-like statistics."""
  side = np.clip(np.exp(rng.normal(np.log(40.), 1.0, n_obj)), 6, 640) * 1.667
  ratio = np.exp(rng.normal(0., .55, n_obj))  # h / w
  w = np.minimum(side / np.sqrt(ratio), IMG[1] - 1)
  h = np.minimum(side * np.sqrt(ratio), IMG[0] - 1)
  x1 = rng.uniform(0, IMG[1] - w)
  y1 = rng.uniform(0, IMG[0] - h)
  return np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)


def coco_like_batch(rng, batch):
  """GT boxes and labels of ``batch`` images (object count log-normal)."""
  n = np.clip(np.round(np.exp(rng.normal(np.log(4.5), .9, batch))), 1, 60)
  gts = [coco_like_gt(rng, int(k)) for k in n]
  labels = [rng.integers(0, 80, len(g)) for g in gts]
  return gts, labels


def _best_gt(boxes, gt):
  """IoU with the best GT and its index, numpy, ``boxes (N, 4)``."""
  iou = np.asarray(boxes_lib.box_iou(jnp.asarray(boxes), jnp.asarray(gt)))
  return iou.max(1), iou.argmax(1)


def trained_rpn_maps(rng, gts):
  """Per-level ``(B, H, W, 3)`` logits and ``(B, H, W, 12)`` deltas."""
  sizes = anchors_lib.feature_sizes(PAD, STRIDES)
  anchors = anchors_lib.multilevel_anchors(sizes, STRIDES)
  cls = [np.zeros((len(gts), h, w, 3), np.float32) for h, w in sizes]
  reg = [np.zeros((len(gts), h, w, 12), np.float32) for h, w in sizes]
  for b, gt in enumerate(gts):
    for lvl, a in enumerate(anchors):
      iou, arg = _best_gt(a, gt)
      logit = 14. * (iou - .45) + rng.normal(0, 1.5, len(a))
      d = np.asarray(boxes_lib.encode_deltas(jnp.asarray(a),
                                             jnp.asarray(gt[arg])))
      near = (iou > .1)[:, None]
      d = np.where(near, d * rng.uniform(.5, 1., (len(a), 1)), 0.)
      d = d + rng.normal(0, .1, d.shape)
      h, w = sizes[lvl]
      cls[lvl][b] = logit.reshape(h, w, 3)
      reg[lvl][b] = d.reshape(h, w, 12)
  return cls, reg


def trained_rcnn_outputs(rng, rois, gts, labels):
  """``(B, R, 81)`` class logits and ``(B, R, 320)`` deltas."""
  bsz, r = rois.shape[:2]
  logits = rng.normal(-4., 1.5, (bsz, r, 81)).astype(np.float32)
  deltas = rng.normal(0, .3, (bsz, r, 320)).astype(np.float32)
  stds = (.1, .1, .2, .2)
  for b in range(bsz):
    iou, arg = _best_gt(rois[b], gts[b])
    cls = labels[b][arg]
    logits[b, :, 80] = 0.
    fg = 12. * (iou - .5) + rng.normal(0, 1., r)
    logits[b, np.arange(r), cls] = fg
    confused = rng.uniform(size=r) < .2
    other = rng.integers(0, 80, r)
    logits[b, np.arange(r)[confused], other[confused]] = fg[confused] - 1.
    d = np.asarray(boxes_lib.encode_deltas(
        jnp.asarray(rois[b]), jnp.asarray(gts[b][arg]), stds=stds))
    d = np.nan_to_num(d) * .8
    for c in (cls, other):
      idx = 4 * c[:, None] + np.arange(4)
      np.put_along_axis(deltas[b], idx, d + rng.normal(0, .1, d.shape),
                        axis=1)
  return logits, deltas


def fixture_batch(batch):
  """mmdetection's fixture outputs (2 images), repeated to ``batch``."""
  out = collections.defaultdict(list)
  names = ('logo_rgba', 'stereo_motorcycle')
  for i in range(batch):
    d = np.load(os.path.join(FIXTURES, names[i % 2] + '.npz'))
    out['proposals'].append(d['proposals'][:, :4])
    out['cls'].append(d['bbox_cls_score'])
    out['deltas'].append(d['bbox_pred'])
    out['img_shape'].append(d['img_shape'][:2])
    out['pad_shape'].append(d['pad_shape'][:2])
    out['scale'].append(d['scale_factor'])
    out['mask_rois'].append(d['mask_rois'][:, 1:5])
  return {k: np.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------- stages
def rpn_trips(cls, reg, nms_pre, block_size):
  img = jnp.asarray(np.tile([IMG], (cls[0].shape[0], 1)), jnp.int32)
  pad = jnp.asarray(np.tile([PAD], (cls[0].shape[0], 1)), jnp.int32)
  fn = lambda c, r, i, p: get_proposals(
      c, r, i, p, nms_pre=nms_pre, max_per_img=1000, iou_threshold=.7,
      block_size=block_size)
  args = ([jnp.asarray(c) for c in cls], [jnp.asarray(r) for r in reg],
          img, pad)
  trips, cpu = run_counted(fn, *args)
  boxes, _, valid = jax.jit(fn)(*args)
  return trips, cpu, np.asarray(boxes), np.asarray(valid)


def rcnn_trips(rois, valid, logits, deltas, img_shape, scale, block_size):
  fn = lambda *a: get_detections(*a, block_size=block_size)
  args = [jnp.asarray(x) for x in (rois, valid, logits, deltas, img_shape,
                                   scale)]
  trips, cpu = run_counted(fn, *args)
  det = jax.jit(fn)(*args)
  passing = int(np.sum(np.asarray(jax.nn.softmax(
      jnp.asarray(logits), -1))[..., :80] > .05)) // rois.shape[0]
  return trips, cpu, det, passing


def roi_feats(batch, channels=8):
  rng = np.random.default_rng(1)
  return [jnp.asarray(rng.normal(size=(batch, -(-PAD[0] // s),
                                       -(-PAD[1] // s), channels)),
                      jnp.float32) for s in STRIDES[:4]]


def roi_trips(feats, boxes, out, chunk, grad=False):
  pad = jnp.asarray(np.tile([PAD], (boxes.shape[0], 1)), jnp.int32)
  fn = lambda f, b: ra.multilevel_roi_align(f, b, pad, output_size=out,
                                            chunk=chunk)
  if grad:
    fwd = fn
    fn = jax.grad(lambda f, b: jnp.sum(fwd(f, b) ** 2))
  return run_counted(fn, feats, jnp.asarray(boxes, jnp.float32))


def tap_counts(boxes, out, max_samples=ra.DEFAULT_MAX_SAMPLES):
  """Per RoI used slots ``(ny, nx)`` (the real slot code), ``boxes (N, 4)``."""
  boxes = jnp.asarray(boxes, jnp.float32)
  lvl = ra.map_roi_levels(boxes)
  s = jnp.asarray(STRIDES[:4], jnp.float32)[lvl]
  b = boxes / s[:, None] - .5
  vh = jnp.ceil(PAD[0] / s).astype(jnp.int32)
  vw = jnp.ceil(PAD[1] / s).astype(jnp.int32)
  _, wy = ra._axis_slots(b[:, 1], b[:, 3] - b[:, 1], vh, out, max_samples, 0)  # pylint: disable=protected-access
  _, wx = ra._axis_slots(b[:, 0], b[:, 2] - b[:, 0], vw, out, max_samples, 0)  # pylint: disable=protected-access
  return (np.asarray(ra._used_slots(wy)),  # pylint: disable=protected-access
          np.asarray(ra._used_slots(wx)))  # pylint: disable=protected-access


def simulated_taps(ny, nx, chunk, key):
  """Trips of the batched tap loop, summed over chunks, and padded taps.

  ``ny, nx``: ``(B, N)``. ``key``: 'grid' (sort by (ny, nx), a chunk loops
  max ny x max nx) or 'product' (sort by ny * nx, a chunk loops max ny*nx).
  Returns ``(taps looped, padded RoI-taps per image, useful RoI-taps per
  image, loop steps of ``ra.TAPS_PER_STEP`` taps)``.
  """
  bsz, n = ny.shape
  chunk = min(chunk, n)
  nc = -(-n // chunk)
  per_chunk = np.zeros((bsz, nc), np.int64)
  padded = 0
  for b in range(bsz):
    if key == 'grid':
      order = np.argsort(ny[b] * 19 + nx[b], kind='stable')
    else:
      order = np.argsort(ny[b] * nx[b], kind='stable')
    for c in range(nc):
      sel = order[c * chunk:(c + 1) * chunk]
      if key == 'grid':
        per_chunk[b, c] = ny[b][sel].max() * nx[b][sel].max()
      else:
        per_chunk[b, c] = (ny[b][sel] * nx[b][sel]).max()
  bounds = per_chunk.max(0)
  steps = int((-(-bounds // ra.TAPS_PER_STEP)).sum())
  useful = float((ny * nx).sum(1).mean())
  return int(bounds.sum()), float(bounds.sum() * chunk), useful, steps


# ------------------------------------------------------------ HLO costs
_FREE = ('parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast',
         'while', 'call', 'conditional', 'after-all', 'partition-id',
         'replica-id', 'opt-barrier')
_INSTR = aot._INSTR  # pylint: disable=protected-access


def _nbytes(text: str) -> int:
  return aot._elements(text, nbytes=True)  # pylint: disable=protected-access


def _operands(args: str) -> list[str]:
  """Shapes of the operands of an instruction (text before the attrs)."""
  depth, cur, out = 0, '', []
  for ch in args:
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      if depth == 0:
        break
      depth -= 1
    if ch == ',' and depth == 0:
      out.append(cur)
      cur = ''
    else:
      cur += ch
  out.append(cur)
  return [o for o in out if '%' in o]


def _operand_bytes(operand: str, shapes: dict[str, str]) -> int:
  """Bytes of an operand, from its inline shape or its definition."""
  n = _nbytes(operand)
  if n:
    return n
  ref = re.search(r'%([\w.\-]+)\s*$', operand.strip())
  return _nbytes(shapes.get(ref.group(1), '')) if ref else 0


def _fusion_bytes(line_args: str, result: str, fused: list[str],
                  shapes: dict[str, str]) -> int:
  """Bytes one fusion moves: results + operands, where an operand that is
  only gathered from / dynamically sliced counts what is read of it, and an
  in-place dynamic-update-slice / scatter counts only what it writes."""
  params, users = {}, collections.defaultdict(list)
  instrs = []
  for line in fused:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, args = m.groups()
    instrs.append((name, shape, op, args))
    if op == 'parameter':
      params[int(re.match(r'(\d+)', args).group(1))] = name
  for name, shape, op, args in instrs:
    for pos, o in enumerate(_operands(args)):
      ref = re.search(r'%([\w.\-]+)\s*$', o.strip())
      if ref:
        users[ref.group(1)].append((op, pos, shape, args))
  total = 0
  root_inplace = False
  fshapes = {name: shape for name, shape, _, _ in instrs}
  for name, shape, op, args in instrs:
    if op in ('dynamic-update-slice', 'scatter'):
      ops = _operands(args)
      upd = ops[-1] if op == 'scatter' else ops[1]
      total += (3 if op == 'scatter' else 1) * _operand_bytes(upd, fshapes)
      root_inplace = True
  ops = _operands(line_args)
  for i, o in enumerate(ops):
    u = users.get(params.get(i, ''), [])
    if u and all(op in ('gather', 'dynamic-slice') and pos == 0
                 for op, pos, _, _ in u):
      total += sum(_nbytes(shape) for _, _, shape, _ in u)
    elif u and root_inplace and all(
        op in ('dynamic-update-slice', 'scatter') and pos == 0
        for op, pos, _, _ in u):
      continue
    else:
      total += _operand_bytes(o, shapes)
  if not root_inplace:
    total += _nbytes(result)
  return total


def loop_costs(text: str) -> list[dict]:
  """Per ``while`` of an optimised HLO module: kernels and bytes per
  iteration of its body and condition (nested loops excluded: listed on
  their own), and its source line."""
  frames = aot._stack_frames(text)  # pylint: disable=protected-access
  comps = aot.computations(text)
  out = []
  for lines in comps.values():
    for line in lines:
      m = _INSTR.match(line)
      if not m or m.group(3) != 'while':
        continue
      body = re.search(r'body=%?([\w.\-]+)', line).group(1)
      cond = re.search(r'condition=%?([\w.\-]+)', line).group(1)
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      kernels, nbytes = 0, 0
      for c in (body, cond):
        shapes = {im.group(1): im.group(2) for im in map(
            _INSTR.match, comps.get(c, ())) if im}
        for bl in comps.get(c, ()):
          im = _INSTR.match(bl)
          if not im or im.group(3) in _FREE:
            continue
          kernels += 1
          op, args = im.group(3), im.group(4)
          if op == 'fusion':
            called = re.search(r'calls=%?([\w.\-]+)', bl).group(1)
            nbytes += _fusion_bytes(args, im.group(2), comps.get(called, []),
                                    shapes)
          elif op == 'gather':
            nbytes += 2 * _nbytes(im.group(2))
          elif op == 'scatter':
            nbytes += 3 * _operand_bytes(_operands(args)[-1], shapes)
          else:
            nbytes += _nbytes(im.group(2)) + sum(
                _operand_bytes(o, shapes) for o in _operands(args))
      out.append(dict(source=aot._source(line, frames),  # pylint: disable=protected-access
                      trip=int(trip.group(1)) if trip else None,
                      kernels=kernels, bytes=nbytes))
  return out


def hlo_costs(batch, channels=256):
  """Loop costs of each stage compiled alone for one H200 (deviceless)."""
  devices, desc, _ = aot.target_devices('gpu', chips=1)
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  sizes = anchors_lib.feature_sizes(PAD, STRIDES)
  hw = sds((batch, 2), jnp.int32)
  progs = {}
  for nms_pre in (1000, 2000):
    progs[f'RPN proposals nms_pre {nms_pre}'] = (
        lambda c, r, i, p, n=nms_pre: get_proposals(
            c, r, i, p, nms_pre=n, max_per_img=1000, iou_threshold=.7),
        ([sds((batch, h, w, 3), jnp.float32) for h, w in sizes],
         [sds((batch, h, w, 12), jnp.float32) for h, w in sizes], hw, hw))
  progs['R-CNN multiclass NMS'] = (
      get_detections,
      (sds((batch, 1000, 4), jnp.float32), sds((batch, 1000), bool),
       sds((batch, 1000, 81), jnp.float32),
       sds((batch, 1000, 320), jnp.float32), hw,
       sds((batch, 4), jnp.float32)))
  feats = [sds((batch, h, w, channels), jnp.bfloat16) for h, w in sizes[:4]]
  for name, n, out, grad in (('RoIAlign box 7x7', 1000, 7, False),
                             ('RoIAlign mask 14x14', 100, 14, False),
                             ('RoIAlign train box fwd+bwd', 512, 7, True),
                             ('RoIAlign train mask fwd+bwd', 128, 14, True)):
    fn = lambda f, b, p, o=out: ra.multilevel_roi_align(
        f, b, p, output_size=o, chunk=512)
    if grad:
      fn = jax.grad(lambda f, b, p, g=fn: jnp.sum(
          g(f, b, p).astype(jnp.float32) ** 2))
    progs[name] = (fn, (feats, sds((batch, n, 4), jnp.float32), hw))
  print(f'\nper-iteration cost, each stage compiled alone for {desc}, '
        f'batch {batch}, RoIAlign features bf16 x {channels}')
  results = {}
  for name, (fn, args) in progs.items():
    t0 = time.process_time()
    compiled = jax.jit(fn).lower(*args).compile()
    cpu = time.process_time() - t0
    loops = loop_costs(compiled.as_text())
    results[name] = loops
    print(f'  {name} (compile {cpu:.1f} CPU-s):')
    for lp in loops:
      trip = lp['trip'] if lp['trip'] is not None else 'dynamic'
      print(f'    while {lp["source"]}: trip {trip}, {lp["kernels"]} '
            f'kernels, {lp["bytes"] / 1e6:.2f} MB per iteration')
  return results


# ------------------------------------------------------------------ main
def _fmt(trips: dict) -> str:
  return ', '.join(f'{k} {v}' for k, v in sorted(trips.items()))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seeds', type=int, default=2,
                 help='COCO-like batches to draw')
  p.add_argument('--scenes', default='coco,fixture')
  p.add_argument('--block-sizes', default='256')
  p.add_argument('--roi-chunk', type=int, default=512)
  p.add_argument('--hlo', action='store_true')
  p.add_argument('--skip-counts', action='store_true')
  args = p.parse_args()
  bsz = args.batch
  blocks = [int(b) for b in args.block_sizes.split(',')]
  print(f'backend {jax.default_backend()}, batch {bsz}, load '
        f'{os.getloadavg()[0]:.1f}')
  feats = roi_feats(bsz)
  scenes = args.scenes.split(',') if not args.skip_counts else []
  for scene in scenes:
    for seed in (range(args.seeds) if scene == 'coco' else [0]):
      print(f'\n== scenes {scene}' + (f', seed {seed}' if scene == 'coco'
                                      else ''))
      rng = np.random.default_rng(seed)
      if scene == 'coco':
        gts, labels = coco_like_batch(rng, bsz)
        print('objects per image', [len(g) for g in gts])
        cls, reg = trained_rpn_maps(rng, gts)
        for nms_pre in (1000, 2000):
          for bs in blocks:
            trips, cpu, boxes, valid = rpn_trips(cls, reg, nms_pre, bs)
            print(f'RPN nms_pre {nms_pre} block {bs}: {_fmt(trips)} '
                  f'({cpu:.2f} CPU-s, {valid.sum(1).min()}-'
                  f'{valid.sum(1).max()} proposals)')
            if nms_pre == 1000:
              test_rois, test_valid = boxes, valid
            else:
              train_rois, train_valid = boxes, valid
        logits, deltas = trained_rcnn_outputs(rng, test_rois, gts, labels)
        img_shape = np.tile([IMG], (bsz, 1))
        scale = np.ones((bsz, 4), np.float32)
        # Training RoIs: GT boxes first (as mmdetection adds them), then
        # proposals; positives (IoU >= 0.5) for the mask stage.
        train_box, train_mask = [], []
        for b in range(bsz):
          props = train_rois[b][train_valid[b]]
          cand = np.concatenate([gts[b], props])[:512]
          train_box.append(np.pad(cand, ((0, 512 - len(cand)), (0, 0))))
          iou, _ = _best_gt(cand, gts[b])
          pos = cand[iou >= .5][:128]
          train_mask.append(np.pad(pos, ((0, 128 - len(pos)), (0, 0))))
      else:
        fx = fixture_batch(bsz)
        test_rois = fx['proposals']
        test_valid = np.ones(test_rois.shape[:2], bool)
        logits = fx['cls']
        deltas, img_shape, scale = fx['deltas'], fx['img_shape'], fx['scale']
        train_box = train_mask = None
      for bs in blocks:
        trips, cpu, det, passing = rcnn_trips(
            test_rois, test_valid, logits, deltas, img_shape, scale, bs)
        print(f'R-CNN NMS block {bs} ({passing} candidates > 0.05 per '
              f'image, {int(np.asarray(det["valid"]).sum()) // bsz} '
              f'detections): {_fmt(trips)} ({cpu:.2f} CPU-s)')
      mask_rois = (np.asarray(det['boxes']) * scale[:, None, :]
                   if scene == 'coco' else fx['mask_rois'])
      stages = [('box 7x7 (test)', test_rois, 7, False),
                ('mask 14x14 (test)', mask_rois, 14, False)]
      if train_box is not None:
        stages += [('box 7x7 (train) fwd+bwd', np.stack(train_box), 7, True),
                   ('mask 14x14 (train) fwd+bwd', np.stack(train_mask), 14,
                    True)]
      for name, rois, out, grad in stages:
        trips, cpu = roi_trips(feats, rois, out, args.roi_chunk, grad)
        ny, nx = tap_counts(rois.reshape(-1, 4), out)
        ny, nx = ny.reshape(rois.shape[:2]), nx.reshape(rois.shape[:2])
        sims = {k: simulated_taps(ny, nx, args.roi_chunk, k)
                for k in ('grid', 'product')}
        grid, prod = sims['grid'], sims['product']
        print(f'RoIAlign {name}: {_fmt(trips)} ({cpu:.2f} CPU-s); '
              f'taps per RoI mean {np.mean(ny * nx):.1f} max '
              f'{(ny * nx).max()}; simulated: chunk grid max ny x max nx '
              f'{grid[0]} taps (padded/useful {grid[1] / grid[2]:.1f}), '
              f'sorted by ny*nx {prod[0]} taps ({prod[1] / prod[2]:.1f}) '
              f'= {prod[3]} steps of {ra.TAPS_PER_STEP}')
  if args.hlo:
    hlo_costs(bsz)


if __name__ == '__main__':
  main()
