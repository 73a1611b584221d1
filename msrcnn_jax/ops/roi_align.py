"""RoIAlign and mmdetection's multi-level RoI extractor (spec §1.6, §2.3).

mmcv's ``RoIAlign(aligned=True, pool_mode='avg', sampling_ratio=0)`` with
static shapes. For one RoI and output bin ``(ph, pw)`` mmcv averages bilinear
samples on a ``grid_h x grid_w`` grid, ``grid = ceil(roi_size / out)`` per side
(adaptive, differs per RoI, may be 0). The sampling is separable, so the
output of one RoI is ``Ay (out, H) @ F (H, W, C) @ Ax^T (W, out)`` where ``Ay``
and ``Ax`` hold the averaged bilinear weights of each bin. Here each bin side
only keeps ``max_samples + 2`` consecutive feature rows ("slots") with their
weights; the output is

    out[ph, pw] = sum_{a, b} Wy[ph, a] Wx[pw, b] F[Ry[ph, a], Rx[pw, b]]

with no dense full-map products.

Exactness (the static cap, spec §5.9): a bin side with ``grid <= max_samples``
(RoI side ``<= output_size * max_samples`` feature pixels) touches at most
``max_samples + 2`` consecutive rows, so it is computed exactly as mmcv. A side
whose adaptive grid exceeds ``max_samples`` is approximated: it is sampled
with ``(max_samples + 2) // 2`` points per bin side, evenly spread over the bin
exactly as mmcv spreads its own points (positions ``(i + .5) * bin / n``,
same bilinear rules), two slots per point. The exact range is
``output_size * max_samples`` feature px per side. Level mapping puts boxes
with sqrt(area) < 28 * stride on P2..P4 (P5 takes the rest), so a box of
aspect ratio r has a long side < 28 * sqrt(r) feature px there:
  * max_samples=8: 7x7 exact for r <= 4 (and r = 8 below ~20 px mean side);
    14x14 exact for r <= 16;
  * max_samples=16 (default): 7x7 exact for r <= 16, 14x14 for r <= 64;
  * P5 boxes inside a 1333x800 image are at most 41.7 feature px: always
    exact for max_samples >= 6.
``benchmarks/roi_align.py --analysis`` prints these fractions.

Cost: a RoI uses ``ny x nx`` slot pairs ("taps": its used slots per side).
RoIs are sorted by their tap count and pooled in chunks; a chunk loops over
the taps of its largest RoI, each RoI over its own pairs (a gather of
``chunk x out x out`` C-vectors and a multiply-add per tap), so small RoIs
stay cheap whatever the cap. In a batch (``multilevel_roi_align``) chunk j
of every image loops the same count, the largest over the images, so the
loop has one predicate and updates its carry in place.
Memory stays ``O(chunk * out^2 * C)``. The backward (features only, as mmcv)
is a custom VJP that scatter-adds along the same slots.

Bilinear rules (mmcv ``bilinear_interpolate``), with H, W the *valid* feature
size of the image (``ceil(pad_shape / stride)``), never the bucket size, so
bucket padding does not change the output:
  * a point with y < -1, y > H, x < -1 or x > W contributes 0;
  * negative coordinates are clamped to 0;
  * if floor(y) >= H - 1 then low = high = H - 1 (likewise x);
  * standard 4-tap weights; the bin value is the sum / max(grid_h*grid_w, 1).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from msrcnn_jax.ops import padding

# Default cap on samples per bin side. The pooling loop only visits the
# slots RoIs use, so a large cap costs little: 16 keeps every RoI side up to
# 112 feature px (7x7) / 224 px (14x14) exact, i.e. every box with aspect
# ratio <= 16 on P2..P4 and every box of a 1333x800 image on P5.
DEFAULT_MAX_SAMPLES = 16
# Taps (slot pairs) pooled per step of the tap loop (benchmarks/loops.py).
TAPS_PER_STEP = 4


def map_roi_levels(boxes: jnp.ndarray, num_levels: int = 4,
                   finest_scale: float = 56.) -> jnp.ndarray:
  """SingleRoIExtractor.map_roi_levels (spec §1.6, §5.10).

  Args:
    boxes: ``(..., 4)`` float boxes (x1, y1, x2, y2), test (or train) scale.
    num_levels: number of feature levels.
    finest_scale: scale of level 0.

  Returns:
    ``(...)`` int32 level ``floor(log2(sqrt(w*h) / finest_scale + 1e-6))``
    clamped to ``[0, num_levels - 1]``. Degenerate boxes (w*h <= 0) get 0.
  """
  wh = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  scale = jnp.sqrt(jnp.maximum(wh, 0.))
  lvl = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
  return jnp.clip(lvl, 0, num_levels - 1).astype(jnp.int32)


def _axis_slots(start, size, valid, out, max_samples, sampling_ratio):
  """Slot rows and weights of one axis for a batch of RoIs.

  Args:
    start: ``(N,)`` float32 RoI start in feature coordinates (after offset).
    size: ``(N,)`` float32 RoI size in feature pixels (may be <= 0).
    valid: ``(N,)`` int32 valid feature size along this axis (>= 1).
    out: output bins along this axis.
    max_samples: static cap S on samples per bin side.
    sampling_ratio: 0 for adaptive, else the fixed count.

  Returns:
    rows ``(N, out, S+2)`` int32 indices in ``[0, valid)``, weights
    ``(N, out, S+2)`` float32 (already divided by the sample count).
  """
  n_slots = max_samples + 2
  n_pairs = n_slots // 2
  bin_size = size / out                                        # (N,)
  if sampling_ratio > 0:
    grid = jnp.full(size.shape, float(sampling_ratio), jnp.float32)
  else:
    grid = jnp.maximum(jnp.ceil(bin_size), 0.)                  # (N,)
  valid_f = valid.astype(jnp.float32)

  def samples(n):
    """Positions, taps and weights with n (N,) samples per bin (<= S)."""
    i = jnp.arange(max_samples, dtype=jnp.float32)
    ph = jnp.arange(out, dtype=jnp.float32)
    n_ = jnp.maximum(n, 1.)[:, None, None]
    # mmcv: start + ph * bin + (i + .5f) * bin / grid, in this order.
    y = (start[:, None, None] + ph[None, :, None] * bin_size[:, None, None]
         + (i[None, None, :] + .5) * bin_size[:, None, None] / n_)
    use = (i[None, None, :] < n[:, None, None]) & (y >= -1.) & (
        y <= valid_f[:, None, None])
    y = jnp.maximum(y, 0.)
    low = jnp.floor(y).astype(jnp.int32)
    edge = low >= valid[:, None, None] - 1
    top = valid[:, None, None] - 1
    low = jnp.where(edge, top, low)
    high = jnp.where(edge, top, low + 1)
    y = jnp.where(edge, low.astype(jnp.float32), y)
    ly = y - low.astype(jnp.float32)
    scale = jnp.where(use, 1., 0.) / n_
    return low, high, (1. - ly) * scale, ly * scale

  # Contiguous slots: rows base + k with base the first sample's low row;
  # exact when all taps of the bin fall within S + 2 rows (always when
  # grid <= S, spec §5.9).
  n1 = jnp.minimum(grid, float(max_samples))
  low1, high1, wl1, wh1 = samples(n1)
  base = low1[..., :1]                                          # (N,out,1)
  k = jnp.arange(n_slots, dtype=jnp.int32)
  hit_l = (low1 - base)[..., None] == k                         # (N,out,S,K)
  hit_h = (high1 - base)[..., None] == k
  w_contig = (jnp.sum(jnp.where(hit_l, wl1[..., None], 0.), axis=-2)
              + jnp.sum(jnp.where(hit_h, wh1[..., None], 0.), axis=-2))
  rows_contig = jnp.minimum(base + k, valid[:, None, None] - 1)
  last = jnp.take_along_axis(
      high1, jnp.maximum(n1.astype(jnp.int32) - 1, 0)[:, None, None]
      * jnp.ones_like(high1[..., :1]), axis=-1)
  fits = jnp.all(last - base < n_slots, axis=(1, 2)) & (grid <= max_samples)

  # Paired slots (2i, 2i+1) = (low_i, high_i) of sample i, for bins too wide
  # for contiguous slots: exact if grid <= (S+2)//2, else grid is capped.
  n2 = jnp.minimum(grid, float(n_pairs))
  low2, high2, wl2, wh2 = samples(n2)
  low2, high2 = low2[..., :n_pairs], high2[..., :n_pairs]
  wl2, wh2 = wl2[..., :n_pairs], wh2[..., :n_pairs]
  rows_pair = jnp.stack([low2, high2], -1).reshape(low2.shape[:2] + (-1,))
  w_pair = jnp.stack([wl2, wh2], -1).reshape(wl2.shape[:2] + (-1,))
  pad = n_slots - 2 * n_pairs
  if pad:
    rows_pair = jnp.concatenate(
        [rows_pair, jnp.broadcast_to(rows_pair[..., :1],
                                     rows_pair.shape[:2] + (pad,))], -1)
    w_pair = jnp.concatenate(
        [w_pair, jnp.zeros(w_pair.shape[:2] + (pad,), w_pair.dtype)], -1)

  rows = jnp.where(fits[:, None, None], rows_contig, rows_pair)
  weights = jnp.where(fits[:, None, None], w_contig, w_pair)
  return rows, weights


def _used_slots(weights):
  """(N,) number of leading slots with any nonzero weight."""
  k = jnp.arange(1, weights.shape[-1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(weights != 0, k, 0), axis=(1, 2))


def _tap_loop(flat, rowoff, wy, rx, wx, nx, taps, bound, cot=None):
  """Weighted gather over one chunk's slot pairs, RoI by RoI.

  Tap ``t`` of RoI ``i`` is its slot pair ``(k, l) = (t // nx_i, t % nx_i)``
  for ``t < taps_i = ny_i * nx_i`` (its used slots, row-major) and weight 0
  beyond, so each RoI visits its own pairs in the same order whatever the
  chunk, and the loop covers ``bound`` (>= the chunk's largest ``taps``)
  taps in steps of ``TAPS_PER_STEP``. The sum of each output is the same sequence of float32 additions
  as a loop over the chunk's ``max ny x max nx`` grid (that grid only adds
  products with a zero weight in between).

  Forward (``cot is None``): returns ``(chunk, out, out, C)`` float32
  ``sum_{k<ny, l<nx} wy[:, p, k] * wx[:, q, l]
  * flat[rowoff[:, p, k] + rx[:, q, l]]`` (``p, q`` the output bins).
  Backward: scatter-adds ``cot`` (same shape) into ``flat`` (the running
  gradient table) and returns it.
  """
  last = wy.shape[-1] - 1
  per_roi = jnp.maximum(nx, 1)[:, None, None]

  def pick(a, j):
    j = jnp.broadcast_to(j, a.shape[:2] + (1,))
    return jnp.take_along_axis(a, j, axis=2)[..., 0]

  def tap(t):
    k = jnp.minimum(t // per_roi, last)
    l = t % per_roi
    r, c = pick(rowoff, k), pick(rx, l)                     # (c, p), (c, q)
    w = pick(wy, k)[:, :, None] * pick(wx, l)[:, None, :]
    w = jnp.where((t < taps)[:, None, None], w, 0.)
    return r[:, :, None] + c[:, None, :], w

  # TAPS_PER_STEP consecutive taps per loop step, added in tap order: the
  # same additions, a quarter of the steps and of the accumulator traffic.
  steps = -(-bound // TAPS_PER_STEP)
  if cot is None:
    def step(s, acc):
      for j in range(TAPS_PER_STEP):
        idx, w = tap(s * TAPS_PER_STEP + j)
        acc = acc + w[..., None] * jnp.take(
            flat, idx, axis=0, mode='clip').astype(jnp.float32)
      return acc
    acc = jnp.zeros(rowoff.shape[:2] + (rx.shape[1], flat.shape[-1]),
                    jnp.float32)
    return jax.lax.fori_loop(0, steps, step, acc)

  def bstep(s, grad):
    for j in range(TAPS_PER_STEP):
      idx, w = tap(s * TAPS_PER_STEP + j)
      grad = grad.at[idx].add((w[..., None] * cot).astype(grad.dtype),
                              mode='drop')
    return grad
  return jax.lax.fori_loop(0, steps, bstep, flat)


@jax.custom_vjp
def _pool_chunks(flat, rowoff, wy, rx, wx, nx, taps, bounds):
  """``(nc, chunk, out, out, C)`` pooled features, chunk by chunk.

  ``bounds (nc,)``: taps each chunk loops over. Linear in ``flat``; the
  custom VJP scatter-adds into the feature table (mmcv's RoIAlign backward:
  no gradient for the boxes).
  """
  return jax.lax.map(lambda a: _tap_loop(flat, *a),
                     (rowoff, wy, rx, wx, nx, taps, bounds))


def _pool_fwd(flat, rowoff, wy, rx, wx, nx, taps, bounds):
  out = _pool_chunks(flat, rowoff, wy, rx, wx, nx, taps, bounds)
  # A zero-size probe carries the table's length and dtype to the backward.
  probe = jnp.zeros((flat.shape[0], 0), flat.dtype)
  return out, (probe, rowoff, wy, rx, wx, nx, taps, bounds)


def _pool_bwd(res, cot):
  probe, *slots = res
  def body(grad, a):
    return _tap_loop(grad, *a[:7], cot=a[7]), None
  grad0 = jnp.zeros((probe.shape[0], cot.shape[-1]), jnp.float32)
  grad, _ = jax.lax.scan(body, grad0, (*slots, cot))
  return (grad.astype(probe.dtype),) + (None,) * 7


_pool_chunks.defvjp(_pool_fwd, _pool_bwd)


def _default_chunk():
  # CPU: small chunks of size-sorted RoIs skip most unused slots; GPU/TPU:
  # large chunks keep the device busy.
  return 32 if jax.default_backend() == 'cpu' else 512


def _sorted_chunks(boxes, spatial_scale, valid_h, valid_w, row_stride, base,
                   output_size, max_samples, sampling_ratio, aligned, chunk):
  """Slots of N RoIs reading a flattened ``(T, C)`` feature table, sorted
  by tap count and cut into chunks.

  Feature pixel (r, c) of a RoI's map is ``flat[base + r * row_stride + c]``.
  All per-RoI arguments are ``(N,)``.

  Returns:
    ``(slots, chunk_taps, inverse)``: ``slots`` = ``(rowoff, wy, rx, wx,
    nx, taps)``, each ``(n_chunks, chunk, ...)`` (padding RoIs have 0 taps);
    ``chunk_taps (n_chunks,)`` the largest tap count of each chunk;
    ``inverse (N,)`` each RoI's position in the sorted order.
  """
  offset = 0.5 if aligned else 0.
  x1 = boxes[:, 0] * spatial_scale - offset
  y1 = boxes[:, 1] * spatial_scale - offset
  x2 = boxes[:, 2] * spatial_scale - offset
  y2 = boxes[:, 3] * spatial_scale - offset
  w, h = x2 - x1, y2 - y1
  if not aligned:  # legacy mmcv: RoI size clamped to >= 1.
    w, h = jnp.maximum(w, 1.), jnp.maximum(h, 1.)
  ry, wy = _axis_slots(y1, h, valid_h, output_size, max_samples,
                       sampling_ratio)
  rx, wx = _axis_slots(x1, w, valid_w, output_size, max_samples,
                       sampling_ratio)
  rowoff = base[:, None, None] + ry * row_stride[:, None, None]
  nx = _used_slots(wx)
  taps = _used_slots(wy) * nx

  n = boxes.shape[0]
  chunk = max(1, min(chunk or _default_chunk(), n))
  n_chunks = -(-n // chunk)
  order = jnp.argsort(taps)
  def prep(a):
    a = a[order]
    a = jnp.concatenate(
        [a, jnp.zeros((n_chunks * chunk - n,) + a.shape[1:], a.dtype)])
    return a.reshape((n_chunks, chunk) + a.shape[1:])
  slots = tuple(prep(a) for a in (rowoff, wy, rx, wx, nx, taps))
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(n, dtype=order.dtype))
  return slots, jnp.max(slots[-1], axis=1), inverse


def _pool_sorted(flat, slots, bounds, inverse):
  """``(N, out, out, C)`` in ``flat.dtype``, from ``_sorted_chunks``'s
  slots; chunk ``j`` loops ``bounds[j]`` taps."""
  pooled = _pool_chunks(flat, *slots, bounds)
  pooled = pooled.reshape((-1,) + pooled.shape[2:])
  return pooled[inverse].astype(flat.dtype)


def _roi_align_flat(flat, *args):
  """RoIAlign of N RoIs reading a flattened ``(T, C)`` feature table.

  ``args`` are ``_sorted_chunks``'s; returns ``(N, out, out, C)``. RoIs are
  sorted by the slot pairs (taps) they use and pooled in chunks; each chunk
  only loops over the taps of its largest RoI.
  """
  slots, chunk_taps, inverse = _sorted_chunks(*args)
  return _pool_sorted(flat, slots, chunk_taps, inverse)


def roi_align(feat: jnp.ndarray, boxes: jnp.ndarray, spatial_scale: float,
              output_size: int, max_samples: int = DEFAULT_MAX_SAMPLES,
              valid_hw=None,
              sampling_ratio: int = 0, aligned: bool = True,
              chunk: int | None = None) -> jnp.ndarray:
  """mmcv RoIAlign (avg pooling) of RoIs on one image's feature map.

  Args:
    feat: ``(H, W, C)`` features (H, W may be a padded bucket size).
    boxes: ``(N, 4)`` float boxes (x1, y1, x2, y2) in input pixels of the
      frame ``feat`` was computed from (test scale for FPN maps; mask pixels
      for mask targets with ``spatial_scale=1``).
    spatial_scale: feature pixels per input pixel (1 / stride).
    output_size: bins per side.
    max_samples: static cap S on the adaptive samples per bin side: exact for
      RoI sides <= ``output_size * S`` feature px; wider sides use
      ``(S + 2) // 2`` evenly spread points per bin (module docstring).
    valid_hw: ``(h, w)`` ints or int32 array: valid feature size of this image
      (``ceil(pad_shape * spatial_scale)``); the bilinear boundary rules use
      it. Default: the array size.
    sampling_ratio: 0 = adaptive ``ceil(roi / out)``; > 0 fixed count.
    aligned: True = mmcv aligned (-0.5 px shift, no size clamp).
    chunk: RoIs per chunk of the pooling loop (default: 32 on CPU, 512
      elsewhere).

  Returns:
    ``(N, output_size, output_size, C)`` in ``feat.dtype``. Degenerate RoIs
    (size <= 0) give zeros. Differentiable w.r.t. ``feat`` only (as mmcv).
  """
  if valid_hw is None:
    valid_hw = feat.shape[:2]
  return _roi_align_jit(feat, boxes, jnp.asarray(valid_hw, jnp.int32),
                        float(spatial_scale), int(output_size),
                        int(max_samples), int(sampling_ratio), bool(aligned),
                        chunk)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 9)))
def _roi_align_jit(feat, boxes, valid_hw, spatial_scale, output_size,
                   max_samples, sampling_ratio, aligned, chunk):
  hh, ww, c = feat.shape
  n = boxes.shape[0]
  vh = jnp.clip(jnp.broadcast_to(valid_hw[0], (n,)), 1, hh)
  vw = jnp.clip(jnp.broadcast_to(valid_hw[1], (n,)), 1, ww)
  return _roi_align_flat(
      feat.reshape(hh * ww, c), boxes.astype(jnp.float32), spatial_scale,
      vh, vw, jnp.full((n,), ww, jnp.int32), jnp.zeros((n,), jnp.int32),
      output_size, max_samples, sampling_ratio, aligned, chunk)


def roi_align_indexed(maps: jnp.ndarray, map_index: jnp.ndarray,
                      boxes: jnp.ndarray, spatial_scale: float,
                      output_size: int,
                      max_samples: int = DEFAULT_MAX_SAMPLES, valid_hw=None,
                      chunk: int | None = None) -> jnp.ndarray:
  """RoIAlign where RoI i samples its own map ``maps[map_index[i]]``.

  For mask targets (spec §3.3): ``maps`` = the GT bitmaps of one image as
  ``(G, H, W, 1)`` float, ``map_index`` = each positive RoI's assigned GT,
  ``spatial_scale=1``, ``output_size=28``; binarise the result ``>= 0.5``.
  Mask RoIs are large in mask pixels (ceil(side / 28) samples per bin): pass
  ``max_samples >= ceil(max(pad_shape) / 28)`` (48 for 1333 px) to stay
  exact; the cost only grows with the samples RoIs actually use.

  Args:
    maps: ``(G, H, W, C)`` maps (H, W may be bucket padded).
    map_index: ``(N,)`` int32 in ``[0, G)``.
    boxes: ``(N, 4)`` float boxes (x1, y1, x2, y2) in map pixels /
      ``spatial_scale``.
    spatial_scale, output_size, max_samples, chunk: as ``roi_align``
      (aligned, adaptive sampling).
    valid_hw: ``(h, w)`` valid size of the maps (default: array size).

  Returns:
    ``(N, output_size, output_size, C)`` in ``maps.dtype``.
  """
  if valid_hw is None:
    valid_hw = maps.shape[1:3]
  return _roi_align_indexed_jit(
      maps, jnp.asarray(map_index, jnp.int32), boxes,
      jnp.asarray(valid_hw, jnp.int32), float(spatial_scale),
      int(output_size), int(max_samples), chunk)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _roi_align_indexed_jit(maps, map_index, boxes, valid_hw, spatial_scale,
                           output_size, max_samples, chunk):
  g, hh, ww, c = maps.shape
  n = boxes.shape[0]
  vh = jnp.clip(jnp.broadcast_to(valid_hw[0], (n,)), 1, hh)
  vw = jnp.clip(jnp.broadcast_to(valid_hw[1], (n,)), 1, ww)
  base = jnp.clip(map_index, 0, g - 1) * (hh * ww)
  return _roi_align_flat(
      maps.reshape(g * hh * ww, c), boxes.astype(jnp.float32), spatial_scale,
      vh, vw, jnp.full((n,), ww, jnp.int32), base, output_size, max_samples,
      0, True, chunk)


def multilevel_roi_align(feats: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                         pad_shape: jnp.ndarray,
                         strides: Sequence[int] = (4, 8, 16, 32),
                         output_size: int = 7,
                         max_samples: int = DEFAULT_MAX_SAMPLES,
                         finest_scale: float = 56.,
                         chunk: int | None = None) -> jnp.ndarray:
  """mmdetection's SingleRoIExtractor over FPN levels (spec §1.6, §2.3).

  Each RoI is pooled once, on the level ``map_roi_levels`` picks from its
  box, with ``spatial_scale = 1 / stride``. The levels are flattened into one
  ``(sum H_l*W_l, C)`` table per image so a single gather serves every level.

  Args:
    feats: levels [P2..P5], each ``(B, H_l, W_l, C)`` (bucket padded).
    boxes: ``(B, N, 4)`` float boxes (x1, y1, x2, y2) at test (or train)
      scale. Padding rows may hold anything finite; their output is finite
      and meaningless (callers mask them).
    pad_shape: ``(B, 2)`` int32 (h, w) padded image size; the valid size of
      level l is ``ceil(pad_shape / stride_l)``.
    strides: stride of each level.
    output_size: bins per side (7 bbox, 14 mask).
    max_samples: static cap on samples per bin side (see ``roi_align``).
    finest_scale: level mapping scale (56).
    chunk: RoIs of one image per chunk of the pooling loop (default: 32
      on CPU, 512 elsewhere).

  Returns:
    ``(B, N, output_size, output_size, C)`` in the features' dtype.
    Differentiable w.r.t. ``feats`` only (as mmcv).
  """
  return _multilevel_jit(list(feats), boxes, pad_shape,
                         tuple(int(s) for s in strides), int(output_size),
                         int(max_samples), float(finest_scale), chunk)


@functools.partial(jax.jit, static_argnums=tuple(range(3, 8)))
def _multilevel_jit(feats, boxes, pad_shape, strides, output_size,
                    max_samples, finest_scale, chunk):
  num_levels = len(strides)
  assert len(feats) == num_levels, (len(feats), strides)
  bsz = boxes.shape[0]
  c = feats[0].shape[-1]
  flat = jnp.concatenate(
      [f.reshape(bsz, -1, c) for f in feats], axis=1)  # (B, T, C)
  sizes = [f.shape[1] * f.shape[2] for f in feats]
  bases = [0]
  for s in sizes[:-1]:
    bases.append(bases[-1] + s)
  widths = jnp.asarray([f.shape[2] for f in feats], jnp.int32)
  heights = jnp.asarray([f.shape[1] for f in feats], jnp.int32)
  bases = jnp.asarray(bases, jnp.int32)
  scales = jnp.asarray([1. / s for s in strides], jnp.float32)
  strides_a = jnp.asarray(strides, jnp.int32)

  boxes = boxes.astype(jnp.float32)
  lvl = map_roi_levels(boxes, num_levels, finest_scale)       # (B, N)
  pad_shape = jnp.asarray(pad_shape, jnp.int32)
  stride = strides_a[lvl]
  # Valid size ceil(pad / stride), clipped to the array (bucket) size.
  vh = jnp.clip(padding.valid_size(pad_shape[:, 0:1], stride), 1,
                heights[lvl])
  vw = jnp.clip(padding.valid_size(pad_shape[:, 1:2], stride), 1,
                widths[lvl])
  # spatial_scale = 1 / stride (a power of two, so folding it into the boxes
  # is exact).
  scaled = boxes * scales[lvl][..., None]

  # Image by image (vmap): each image reads only its own table, so a
  # batch-sharded program pools each chip's images on that chip (one table
  # for the whole batch made every chip loop over all RoIs of the global
  # batch and all-reduce the result; benchmarks/aot.py --audit).
  def one_image(rois, vh_i, vw_i, row_stride, base):
    return _sorted_chunks(rois, 1., vh_i, vw_i, row_stride, base,
                          output_size, max_samples, 0, True, chunk)
  slots, chunk_taps, inverse = jax.vmap(one_image)(
      scaled, vh, vw, widths[lvl], bases[lvl])
  # Chunk j of every image loops the batch's largest tap count of chunk j,
  # a bound shared by the images (not per image): the batched loop then has
  # one predicate, so its carry (the pooled chunk; in the backward the
  # whole gradient table) is updated in place instead of being selected
  # image by image on every step (benchmarks/loops.py).
  bounds = jnp.max(chunk_taps, axis=0)
  return jax.vmap(_pool_sorted, in_axes=(0, 0, None, 0))(
      flat, slots, bounds, inverse)
