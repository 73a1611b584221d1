"""Mask pasting (mmdetection's ``_do_paste_mask``) and COCO RLE (spec §2.7).

A 28x28 mask of probabilities is resampled onto the original image canvas
with ``F.grid_sample(bilinear, align_corners=False, padding_mode='zeros')``:
pixel (r, c) has centre (c + .5, r + .5), normalised to
``g = (centre - x0) / (x1 - x0) * 2 - 1``, then thresholded ``>= 0.5``.

``paste_masks`` is the host (numpy) version used by post-processing. Like
mmdetection on CPU (``skip_empty``) it only evaluates the box region +-1 px
(outside it the interpolated value is < 0.5) and follows torch's float32
operation order (grid, unnormalise, 4-tap sum), so it reproduces mmdetection's
masks bit for bit. ``paste_masks_jnp`` is the jit-able version on a static
canvas (separable tap weights, torch's per-pixel operation order: the same
pixels where the backend fuses multiply-adds as torch's CPU kernel does).

Device -> host: ``rle_transitions_jnp`` turns masks into bit-packed run
boundaries in COCO's column-major order, ``compact_bytes`` keeps their
nonzero bytes as a fixed-size list, and ``rles_from_transitions`` makes the
RLE strings on the host from that list without touching the other pixels.

Ground-truth masks for training are stored as crops: crop ``g`` of shape
``(Mh, Mw)`` covers exactly its frame box ``mask_frames[g]`` ``(x1, y1, x2,
y2)`` (train-scale pixels), cell ``(i, j)`` covering ``[fx1 + j * fw / Mw,
fx1 + (j + 1) * fw / Mw)`` and the same in y (``crop_geometry``). By default
the frame is the GT box; with the whole padded image as frame and the
full-resolution bitmap as crop the mask targets are mmdetection's exactly.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pycocotools.mask as mask_util


def _grid(lo, hi, c0, c1):
  """Normalised grid coordinates of pixel centres ``lo..hi-1`` (float32).

  torch: ``(arange(lo, hi).float() + 0.5 - c0) / (c1 - c0) * 2 - 1``, inf
  (zero-size box) replaced by 0.
  """
  p = np.arange(lo, hi, dtype=np.float32) + np.float32(.5)
  with np.errstate(divide='ignore', invalid='ignore'):
    g = (p - np.float32(c0)) / (np.float32(c1) - np.float32(c0))
  g = g * np.float32(2.) - np.float32(1.)
  return np.where(np.isinf(g), np.float32(0.), g).astype(np.float32)


def _fma(a, b, c):
  """float32 fused multiply-add ``a * b + c`` (via exact float64 product)."""
  return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
          + np.asarray(c, np.float64)).astype(np.float32)


def _taps(g, size):
  """grid_sample (align_corners=False) taps of one axis.

  Returns low index, high index, their weights and in-bounds flags, for
  torch's vectorised CPU kernel (built with FMA contraction):
  ``x = fma(g + 1, size / 2, -0.5)``; ``w = x - floor(x)``.
  """
  x = _fma(g + np.float32(1.), np.float32(size / 2), np.float32(-.5))
  return _neighbour_taps(x, size, np, np.int64)


def _neighbour_taps(x, size: int, xp, index_dtype):
  """The two taps around float32 sample coordinates ``x`` of one axis.

  ``xp`` is ``numpy`` (host) or ``jax.numpy`` (device). Returns the low and
  high index (clipped into ``[0, size)``), their weights (``w1 = x -
  floor(x)`` for the high tap) and whether each tap lies inside the axis.
  """
  x0 = xp.floor(x)
  w1 = (x - x0).astype(xp.float32)           # weight of the high tap
  w0 = (xp.float32(1.) - w1).astype(xp.float32)
  i0 = x0.astype(index_dtype)
  i1 = i0 + 1
  ok0 = (i0 >= 0) & (i0 < size)
  ok1 = (i1 >= 0) & (i1 < size)
  return (xp.clip(i0, 0, size - 1), xp.clip(i1, 0, size - 1), w0, w1, ok0,
          ok1)


def crop_geometry(mask_frames: jnp.ndarray, gt_index: jnp.ndarray,
                  crop_hw: tuple[int, int]):
  """Frame origin and cell size of the GT crops ``gt_index`` (pixels).

  Args:
    mask_frames: ``(G, 4)`` frame boxes of the crops (module docstring).
    gt_index: ``(P,)`` int GT indices, in range.
    crop_hw: static ``(Mh, Mw)`` of the crops.

  Returns:
    ``(x0, y0, cell_w, cell_h)``, each ``(P,)`` float32; a frame side is
    taken as at least 1e-6 pixels.
  """
  frames = mask_frames[gt_index].astype(jnp.float32)
  mh, mw = crop_hw
  cw = jnp.maximum(frames[:, 2] - frames[:, 0], 1e-6) / mw
  ch = jnp.maximum(frames[:, 3] - frames[:, 1], 1e-6) / mh
  return frames[:, 0], frames[:, 1], cw, ch


def paste_mask_region(mask, box, out_hw):
  """Probability of one mask on the region its box covers (+-1 px).

  Args:
    mask: ``(m, m)`` float32 probabilities.
    box: (x0, y0, x1, y1) in original-image pixels.
    out_hw: (H0, W0) canvas size.

  Returns:
    ``(values (h, w) float32, (y_lo, y_hi, x_lo, x_hi))`` with the region
    ``[y_lo, y_hi) x [x_lo, x_hi)`` of the canvas (possibly empty).
  """
  mask = np.asarray(mask, np.float32)
  h0, w0 = out_hw
  x0, y0, x1, y1 = (np.float32(v) for v in box)
  # mmdetection skip_empty: floor(min) - 1 clamped >= 0; ceil(max) + 1
  # clamped <= size.
  x_lo = int(max(np.floor(x0) - 1, 0))
  y_lo = int(max(np.floor(y0) - 1, 0))
  x_hi = int(min(np.ceil(x1) + 1, w0))
  y_hi = int(min(np.ceil(y1) + 1, h0))
  if x_hi <= x_lo or y_hi <= y_lo:
    return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
  mh, mw = mask.shape
  xa, xb, wxa, wxb, oxa, oxb = _taps(_grid(x_lo, x_hi, x0, x1), mw)
  ya, yb, wya, wyb, oya, oyb = _taps(_grid(y_lo, y_hi, y0, y1), mh)
  # torch: nw = s*e, ne = s*w, sw = n*e, se = n*w; value =
  # fma(se_v, se, fma(sw_v, sw, fma(ne_v, ne, nw_v * nw))), each tap 0
  # outside the input (zeros padding). Bit-identical to torch 2.x on CPU.
  def corner(yi, yok, wy, xi, xok, wx):
    v = mask[yi[:, None], xi[None, :]]
    v = np.where(yok[:, None] & xok[None, :], v, np.float32(0.))
    return v, (wy[:, None] * wx[None, :]).astype(np.float32)
  v, w = corner(ya, oya, wya, xa, oxa, wxa)
  val = v * w
  for yi, yok, wy, xi, xok, wx in ((ya, oya, wya, xb, oxb, wxb),
                                   (yb, oyb, wyb, xa, oxa, wxa),
                                   (yb, oyb, wyb, xb, oxb, wxb)):
    v, w = corner(yi, yok, wy, xi, xok, wx)
    val = _fma(v, w, val)
  return val.astype(np.float32), (y_lo, y_hi, x_lo, x_hi)


def paste_masks(mask_probs, boxes, out_hw, threshold: float = 0.5):
  """mmdetection's ``get_seg_masks`` pasting on the host (spec §2.7).

  Args:
    mask_probs: ``(K, m, m)`` float probabilities (sigmoid of the predicted
      class's logits).
    boxes: ``(K, 4)`` float boxes (x1, y1, x2, y2) in ORIGINAL-image pixels
      (mmdetection uses ``(det_boxes * scale_factor) / scale_factor``).
    out_hw: (H0, W0) original image size.
    threshold: a pixel is in the mask if its value ``>= threshold``.

  Returns:
    ``(K, H0, W0)`` bool numpy masks.
  """
  mask_probs = np.asarray(mask_probs, np.float32)
  boxes = np.asarray(boxes, np.float32)
  h0, w0 = int(out_hw[0]), int(out_hw[1])
  out = np.zeros((len(mask_probs), h0, w0), bool)
  for i, (m, b) in enumerate(zip(mask_probs, boxes)):
    val, (ya, yb, xa, xb) = paste_mask_region(m, b, (h0, w0))
    if val.size:
      out[i, ya:yb, xa:xb] = val >= threshold
  return out


def _taps_jnp(c0, c1, n: int, size: int):
  """``_grid`` + ``_taps`` of one axis for K boxes, in jnp.

  Args:
    c0, c1: ``(K,)`` float32 box edges on this axis.
    n: static number of canvas pixels on this axis.
    size: mask size on this axis (28).

  Returns:
    ``(i0, i1, w0, w1, ok0, ok1)``, each ``(K, n)``: tap indices clipped to
    the mask, their weights and in-bounds flags. Same float32 operations as
    the host version; ``(g + 1) * size / 2 - 0.5`` is one fused multiply-add
    when the backend contracts it (XLA:CPU does, as torch's CPU kernel).
  """
  p = jnp.arange(n, dtype=jnp.float32) + jnp.float32(.5)
  g = (p[None] - c0[:, None]) / (c1 - c0)[:, None]
  g = g * jnp.float32(2.) - jnp.float32(1.)
  g = jnp.where(jnp.isinf(g), jnp.float32(0.), g)
  x = (g + jnp.float32(1.)) * jnp.float32(size / 2) - jnp.float32(.5)
  return _neighbour_taps(x, size, jnp, jnp.int32)


def paste_masks_jnp(mask_probs: jnp.ndarray, boxes: jnp.ndarray, out_hw,
                    threshold: float = 0.5,
                    valid_hw: jnp.ndarray | None = None) -> jnp.ndarray:
  """Jit-able ``paste_masks``: the same pixels, on a static canvas.

  Evaluates mmdetection's ``_do_paste_mask`` (``skip_empty``: only the box
  region +-1 px, clipped to the image) at every canvas pixel with torch's
  float32 operation order: separable tap weights per axis, then per pixel
  ``fma(se_v, se, fma(sw_v, sw, fma(ne_v, ne, nw_v * nw)))``. On a backend
  that contracts ``a * b + c`` into a fused multiply-add (XLA:CPU; torch's
  CPU kernel is built that way) the masks are bit-identical to
  mmdetection's (tested on the fixtures); elsewhere a pixel whose value is
  within float rounding of the threshold can differ.

  Args:
    mask_probs: ``(K, m, m)`` float probabilities.
    boxes: ``(K, 4)`` boxes (x1, y1, x2, y2) in original-image pixels.
    out_hw: static ``(H, W)`` canvas size.
    threshold: a pixel is in the mask if its value ``>= threshold``.
    valid_hw: optional traced ``(2,)`` int (h0, w0) <= out_hw, the image
      size when the canvas is larger (pixels beyond it are False).
      Default: the canvas.

  Returns:
    ``(K, H, W)`` bool.
  """
  h, w = (int(v) for v in out_hw)
  mask_probs = mask_probs.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  k, m_h, m_w = mask_probs.shape
  if valid_hw is None:
    valid_hw = jnp.asarray([h, w], jnp.int32)
  h0, w0 = valid_hw[0], valid_hw[1]
  ya, yb, wya, wyb, oya, oyb = _taps_jnp(boxes[:, 1], boxes[:, 3], h, m_h)
  xa, xb, wxa, wxb, oxa, oxb = _taps_jnp(boxes[:, 0], boxes[:, 2], w, m_w)
  kk = jnp.arange(k)[:, None, None]

  def corner(yi, yok, wy, xi, xok, wx):
    v = mask_probs[kk, yi[:, :, None], xi[:, None, :]]
    v = jnp.where(yok[:, :, None] & xok[:, None, :], v, jnp.float32(0.))
    return v, wy[:, :, None] * wx[:, None, :]

  v, wt = corner(ya, oya, wya, xa, oxa, wxa)
  val = v * wt
  for args in ((ya, oya, wya, xb, oxb, wxb), (yb, oyb, wyb, xa, oxa, wxa),
               (yb, oyb, wyb, xb, oxb, wxb)):
    v, wt = corner(*args)
    val = v * wt + val
  # The skip_empty region: floor(min) - 1 >= 0 .. ceil(max) + 1 <= size.
  def region(c0, c1, n, limit):
    lo = jnp.maximum(jnp.floor(c0) - 1, 0.)
    hi = jnp.minimum(jnp.ceil(c1) + 1, limit.astype(jnp.float32))
    p = jnp.arange(n, dtype=jnp.float32)
    return (p[None] >= lo[:, None]) & (p[None] < hi[:, None])
  inside = (region(boxes[:, 1], boxes[:, 3], h, h0)[:, :, None]
            & region(boxes[:, 0], boxes[:, 2], w, w0)[:, None, :])
  return (val >= threshold) & inside


def rle_transitions_jnp(masks: jnp.ndarray, valid_hw: jnp.ndarray
                        ) -> jnp.ndarray:
  """Bit-packed run boundaries of ``masks`` in COCO RLE (column-major) order.

  Bit ``(k, x, y)`` is set where pixel (y, x) of mask k differs from the
  pixel before it in column-major order of the ``h0 x w0`` image (the pixel
  above; for y = 0 the last pixel ``h0 - 1`` of column x - 1; for the first
  pixel, 0). The RLE counts are the gaps between set bits
  (``rles_from_transitions``).

  Args:
    masks: ``(K, H, W)`` bool canvas, False beyond ``valid_hw``; ``H`` a
      multiple of 8.
    valid_hw: traced ``(2,)`` int (h0, w0) image size.

  Returns:
    ``(K, W, H // 8)`` uint8 (``jnp.packbits`` along the column, big bit
    order).
  """
  _, h, w = masks.shape
  if h % 8:
    raise ValueError(f'canvas height {h} is not a multiple of 8')
  h0, w0 = valid_hw[0], valid_hw[1]
  # Computed in the (K, H, W) layout of the paste (a transposed layout would
  # make XLA:CPU gather column-wise, 10x slower); only the packed bytes are
  # transposed.
  last = jnp.take(masks, jnp.clip(h0 - 1, 0, h - 1), axis=1)   # (K, W)
  last = jnp.pad(last[:, :-1], ((0, 0), (1, 0)))          # of column x - 1
  prev = jnp.concatenate([last[:, None, :], masks[:, :-1, :]], axis=1)
  inside = (jnp.arange(h) < h0)[:, None] & (jnp.arange(w) < w0)[None, :]
  packed = jnp.packbits((masks != prev) & inside[None], axis=1)
  return jnp.swapaxes(packed, 1, 2)


def compact_bytes(packed: jnp.ndarray, capacity: int
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The nonzero bytes of ``packed`` as a fixed-size sparse list (jit-able).

  Args:
    packed: any-shape uint8 array (flattened C order).
    capacity: static number of entries returned.

  Returns:
    ``(index (capacity,) int32, value (capacity,) uint8, count () int32)``:
    flat indices of the first ``capacity`` nonzero bytes in increasing
    order (padding: index of the last byte, value 0) and the total number of
    nonzero bytes (``count > capacity`` means some were left out).
  """
  flat = packed.reshape(-1)
  idx = jnp.nonzero(flat, size=capacity, fill_value=flat.size - 1)[0]
  idx = idx.astype(jnp.int32)
  val = jnp.where(jnp.arange(capacity) < jnp.count_nonzero(flat), flat[idx],
                  jnp.uint8(0))
  return idx, val, jnp.count_nonzero(flat).astype(jnp.int32)


def rles_from_transitions(index: np.ndarray, value: np.ndarray,
                          canvas_wh: tuple[int, int], image_hw, num: int
                          ) -> list[dict]:
  """COCO RLEs of the first ``num`` masks from their packed run boundaries.

  Args:
    index: flat indices into a ``(K, W, H // 8)`` array of
      ``rle_transitions_jnp`` (every nonzero byte of the first ``num``
      masks, increasing; zero-valued padding entries are ignored).
    value: the bytes at ``index``.
    canvas_wh: (W, H) of the canvas.
    image_hw: (h0, w0) image size.
    num: number of masks to encode.

  Returns:
    ``num`` dicts ``{'size': [h0, w0], 'counts': str}``, identical to
    ``encode_rle`` of the masks.
  """
  wc, hc = (int(v) for v in canvas_wh)
  h0, w0 = (int(v) for v in image_hw)
  if num == 0:
    return []
  index = np.asarray(index, np.int64)
  bits = np.unpackbits(np.asarray(value, np.uint8)[:, None], axis=1)
  r, c = np.nonzero(bits)
  flat = index[r] * 8 + c
  k, rest = np.divmod(flat, wc * hc)
  x, y = np.divmod(rest, hc)
  pos = x * h0 + y
  starts = np.searchsorted(k, np.arange(num + 1))
  return rles_from_boundaries(
      [pos[starts[i]:starts[i + 1]] for i in range(num)], (h0, w0))


def rles_from_boundaries(boundaries, image_hw) -> list[dict]:
  """COCO RLEs from the run boundaries of each mask.

  Args:
    boundaries: per mask, increasing column-major pixel indices where the
      mask changes value (starting from 0 before the first pixel).
    image_hw: (h0, w0).

  Returns:
    ``{'size': [h0, w0], 'counts': str}`` per mask, as ``encode_rle``.
  """
  h0, w0 = (int(v) for v in image_hw)
  if not boundaries:
    return []
  objs = [{'size': [h0, w0],
           'counts': np.diff(p, prepend=0, append=h0 * w0)}
          for p in boundaries]
  return [{'size': [h0, w0], 'counts': o['counts'].decode('ascii')}
          for o in mask_util.frPyObjects(objs, h0, w0)]


def region_boundaries(region: np.ndarray, origin, image_hw) -> np.ndarray:
  """Run boundaries (``rles_from_boundaries``) of a mask zero outside a region.

  Args:
    region: ``(h, w)`` bool, the mask on ``[y0, y0 + h) x [x0, x0 + w)``.
    origin: (y0, x0).
    image_hw: (h0, w0).

  Returns:
    Increasing int64 column-major indices; costs ``w x h0``, not ``h0 x w0``.
  """
  h0, w0 = (int(v) for v in image_hw)
  y0, x0 = (int(v) for v in origin)
  h, w = region.shape
  strip = np.zeros((w, h0), bool)            # columns x0 .. x0 + w - 1
  strip[:, y0:y0 + h] = region.T
  flat = strip.reshape(-1)
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  if flat.size and flat[0]:
    change = np.concatenate([[0], change])
  if flat.size and flat[-1] and x0 + w < w0:
    change = np.concatenate([change, [flat.size]])
  return change + x0 * h0


def encode_rle(mask) -> dict:
  """COCO RLE of one ``(H, W)`` bool mask: ``{'size': [h, w], 'counts': str}``.

  pycocotools encodes column-major (Fortran) order, as mmdetection's
  ``encode_mask_results``.
  """
  rle = mask_util.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {'size': [int(s) for s in rle['size']],
          'counts': rle['counts'].decode('ascii')}


def decode_rle(rle: dict) -> np.ndarray:
  """``(H, W)`` bool mask of an RLE dict (``counts`` str or bytes)."""
  counts = rle['counts']
  if isinstance(counts, str):
    counts = counts.encode('ascii')
  return mask_util.decode({'size': list(rle['size']),
                           'counts': counts}).astype(bool)
