"""Mask pasting (mmdetection's ``_do_paste_mask``) and COCO RLE (spec §2.7).

A 28x28 mask of probabilities is resampled onto the original image canvas
with ``F.grid_sample(bilinear, align_corners=False, padding_mode='zeros')``:
pixel (r, c) has centre (c + .5, r + .5), normalised to
``g = (centre - x0) / (x1 - x0) * 2 - 1``, then thresholded ``>= 0.5``.

``paste_masks`` is the host (numpy) version used by post-processing. Like
mmdetection on CPU (``skip_empty``) it only evaluates the box region +-1 px
(outside it the interpolated value is < 0.5) and follows torch's float32
operation order (grid, unnormalise, 4-tap sum), so it reproduces mmdetection's
masks bit for bit. ``paste_masks_jnp`` is a jit-able separable version for
the whole canvas (same maths, different summation order: a pixel whose value
is within float rounding of the threshold can differ).

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
  x0 = np.floor(x)
  w1 = (x - x0).astype(np.float32)           # weight of the high tap
  w0 = (np.float32(1.) - w1).astype(np.float32)
  i0 = x0.astype(np.int64)
  i1 = i0 + 1
  ok0 = (i0 >= 0) & (i0 < size)
  ok1 = (i1 >= 0) & (i1 < size)
  return (np.clip(i0, 0, size - 1), np.clip(i1, 0, size - 1), w0, w1, ok0,
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


def paste_masks_jnp(mask_probs: jnp.ndarray, boxes: jnp.ndarray, out_hw,
                    threshold: float = 0.5) -> jnp.ndarray:
  """Jit-able, full-canvas version of ``paste_masks`` (separable).

  Args:
    mask_probs: ``(K, m, m)`` float probabilities.
    boxes: ``(K, 4)`` boxes in original-image pixels.
    out_hw: static (H0, W0) canvas size (pixels beyond the image may be
      masked by the caller).
    threshold: ``>=`` threshold.

  Returns:
    ``(K, H0, W0)`` bool. Same interpolation as ``paste_masks``, computed as
    ``Ay (H0, m) @ mask @ Ax^T (m, W0)``; differs only for values within
    float rounding of the threshold.
  """
  h0, w0 = out_hw
  mask_probs = mask_probs.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  m_h, m_w = mask_probs.shape[1:]

  def axis_weights(c0, c1, n, size):
    p = jnp.arange(n, dtype=jnp.float32) + .5
    g = (p[None] - c0[:, None]) / (c1 - c0)[:, None] * 2. - 1.
    g = jnp.where(jnp.isinf(g), 0., g)
    x = (g + 1.) * (size / 2) - .5
    x0 = jnp.floor(x)
    w1 = x - x0
    i0 = x0.astype(jnp.int32)
    k = jnp.arange(size, dtype=jnp.int32)
    # Out-of-range taps match no k (zeros padding).
    return (jnp.where(i0[..., None] == k, (1. - w1)[..., None], 0.)
            + jnp.where(i0[..., None] + 1 == k, w1[..., None], 0.))

  ay = axis_weights(boxes[:, 1], boxes[:, 3], h0, m_h)   # (K, H0, m)
  ax = axis_weights(boxes[:, 0], boxes[:, 2], w0, m_w)   # (K, W0, m)
  val = jnp.einsum('kyi,kij,kxj->kyx', ay, mask_probs, ax)
  return val >= threshold


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
