"""mmdetection-identical image and ground-truth transforms (numpy / cv2).

Reproduces mmdetection 2.x's ``Resize(keep_ratio=True)``, ``RandomFlip``,
``Normalize`` and ``Pad(size_divisor=32)`` (spec §1.3) on one image, plus
what our static-shape batches need on top: padding to a bucket shape and
ground truth padded to a fixed number of instances with a validity mask.

Frames: "original" = the decoded image (ori_shape); "train/test scale" = the
resized image (img_shape), which the network sees. Boxes are
``(x1, y1, x2, y2)`` float32 pixels, width ``x2 - x1``.

GT masks are stored as box-aligned crops (``crop_masks_to_boxes``) so that a
batch holds ``(G, M, M)`` bits per image instead of full-resolution bitmaps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import cv2
import numpy as np

from msrcnn_jax.errors import ConfigError, UserError


class DegenerateImageError(UserError, ValueError):
  """An image whose keep-ratio resize to ``data.img_scale`` has a zero side
  (an extreme aspect ratio such as 3000x4), which cv2.resize refuses."""


# --------------------------------------------------------------- geometry
def rescale_size(w: int, h: int,
                 scale: Sequence[float] = (1333, 800)) -> tuple[int, int]:
  """mmcv ``rescale_size`` with a (long, short) edge limit, keep ratio.

  s = min(max(scale) / max(h, w), min(scale) / min(h, w)) in float64; the new
  size is ``(int(w * s + 0.5), int(h * s + 0.5))`` (mmcv ``_scale_size``).

  Returns:
    ``(new_w, new_h)``.
  """
  long_edge, short_edge = max(scale), min(scale)
  s = min(long_edge / max(h, w), short_edge / min(h, w))
  return int(w * float(s) + 0.5), int(h * float(s) + 0.5)


def checked_rescale_size(w: int, h: int, scale: Sequence[float],
                         name: str = 'an image') -> tuple[int, int]:
  """``rescale_size``, refusing sizes it maps to a zero side.

  Args:
    w, h: the original width and height.
    scale: ``data.img_scale`` (long, short) edge limits.
    name: the image (file and id) for the message.

  Returns:
    ``(new_w, new_h)``, both >= 1.

  Raises:
    DegenerateImageError: ``w`` or ``h`` < 1, or a side that rescales to 0
      pixels; the message names the image and both sizes.
  """
  if w < 1 or h < 1:
    raise DegenerateImageError(f'{name} has width x height {w}x{h}')
  new_w, new_h = rescale_size(w, h, scale)
  if new_w < 1 or new_h < 1:
    raise DegenerateImageError(
        f'{name} (width x height {w}x{h}) resizes to {new_w}x{new_h} with '
        f'data.img_scale={tuple(scale)} (keep ratio): its aspect ratio is '
        'too extreme to detect anything in; remove or crop the image')
  return new_w, new_h


def scale_factor_of(w: int, h: int, new_w: int, new_h: int) -> np.ndarray:
  """``(w_s, h_s, w_s, h_s)`` float32 as mmdetection's ``Resize`` stores it."""
  ws, hs = new_w / w, new_h / h
  return np.array([ws, hs, ws, hs], dtype=np.float32)


def padded_size(h: int, w: int, divisor: int = 32) -> tuple[int, int]:
  """``(h, w)`` rounded up to multiples of ``divisor`` (impad_to_multiple)."""
  return (int(math.ceil(h / divisor)) * divisor,
          int(math.ceil(w / divisor)) * divisor)


def choose_bucket(pad_hw: Sequence[int],
                  buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest-area bucket ``(H, W)`` with ``H >= h`` and ``W >= w``.

  Args:
    pad_hw: the padded image size ``(h, w)``.
    buckets: candidate ``(H, W)`` shapes (cfg.data.buckets).

  Raises:
    ConfigError: no bucket fits (a ValueError).
  """
  h, w = int(pad_hw[0]), int(pad_hw[1])
  fits = [(int(bh) * int(bw), i) for i, (bh, bw) in enumerate(buckets)
          if bh >= h and bw >= w]
  if not fits:
    raise ConfigError(
        f'no bucket in {list(map(tuple, buckets))} fits a padded image of '
        f'(h, w) = ({h}, {w}); add a larger bucket to cfg.data.buckets')
  bh, bw = buckets[min(fits)[1]]
  return int(bh), int(bw)


def bucket_for_size(height: int, width: int, data_cfg) -> tuple[int, int]:
  """The bucket of an original ``height x width`` image, from metadata only."""
  new_w, new_h = rescale_size(width, height, data_cfg.img_scale)
  return choose_bucket(padded_size(new_h, new_w, data_cfg.size_divisor),
                       data_cfg.buckets)


# ------------------------------------------------------------ photometric
def resize_image(img: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
  """cv2 bilinear resize of a uint8 image (mmcv imresize 'bilinear')."""
  return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float],
              to_rgb: bool) -> np.ndarray:
  """mmcv ``imnormalize``: float32, optional BGR->RGB, then (x - mean) / std.

  mmdetection keeps mean/std as float32 arrays; mmcv widens them to float64
  and lets cv2 subtract and multiply by 1/std in place on the float32 image.

  Args:
    img: ``(H, W, 3)`` uint8 BGR.

  Returns:
    ``(H, W, 3)`` float32, RGB if ``to_rgb`` else BGR.
  """
  out = img.astype(np.float32)  # a copy
  mean64 = np.float64(np.asarray(mean, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.asarray(std, np.float32).reshape(1, -1))
  if to_rgb:
    cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
  cv2.subtract(out, mean64, out)
  cv2.multiply(out, stdinv, out)
  return out


def pad_image(img: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """Zero-pads ``(h, w, C)`` at the bottom/right to ``hw`` (mmcv impad)."""
  h, w = img.shape[:2]
  if h > hw[0] or w > hw[1]:
    raise ValueError(f'cannot pad {(h, w)} to smaller {tuple(hw)}')
  out = np.zeros((int(hw[0]), int(hw[1])) + img.shape[2:], img.dtype)
  out[:h, :w] = img
  return out


def preprocess_test(img_bgr: np.ndarray, data_cfg,
                    name: str = 'an image') -> dict[str, np.ndarray]:
  """mmdetection's test pipeline: Resize, Normalize, Pad(32) (spec §1.3).

  Args:
    img_bgr: ``(H0, W0, 3)`` uint8 BGR as ``image_io.imread`` returns.
    data_cfg: ``cfg.data`` (img_scale, mean, std, to_rgb, size_divisor).
    name: the image (its file) for error messages.

  Returns:
    dict: ``image (Hp, Wp, 3) float32`` normalised, zero padded to /32;
    ``img_shape``, ``pad_shape``, ``ori_shape`` ``(2,) int32 (h, w)``;
    ``scale_factor (4,) float32 (w_s, h_s, w_s, h_s)``.

  Raises:
    DegenerateImageError: the image resizes to a zero side.
  """
  h0, w0 = img_bgr.shape[:2]
  new_w, new_h = checked_rescale_size(w0, h0, data_cfg.img_scale, name)
  img = resize_image(img_bgr, new_w, new_h)
  img = normalize(img, data_cfg.mean, data_cfg.std, data_cfg.to_rgb)
  pad = padded_size(new_h, new_w, data_cfg.size_divisor)
  return dict(
      image=pad_image(img, pad),
      img_shape=np.array([new_h, new_w], np.int32),
      pad_shape=np.array(pad, np.int32),
      scale_factor=scale_factor_of(w0, h0, new_w, new_h),
      ori_shape=np.array([h0, w0], np.int32))


# ------------------------------------------------------------------ boxes
def rescale_boxes(boxes: np.ndarray, scale_factor: np.ndarray,
                  img_hw: Sequence[int]) -> np.ndarray:
  """Original-frame boxes -> train scale, clipped to [0, w] x [0, h]."""
  out = boxes.astype(np.float32) * scale_factor[None, :]
  out[:, 0::2] = np.clip(out[:, 0::2], 0, img_hw[1])
  out[:, 1::2] = np.clip(out[:, 1::2], 0, img_hw[0])
  return out


def flip_boxes(boxes: np.ndarray, img_w: int) -> np.ndarray:
  """Horizontal flip: x1' = W - x2, x2' = W - x1 (W = img_shape width)."""
  out = boxes.copy()
  out[:, 0] = img_w - boxes[:, 2]
  out[:, 2] = img_w - boxes[:, 0]
  return out


def nearest_src_index(dst_len: int, src_len: int) -> np.ndarray:
  """Source index of each destination pixel of cv2 INTER_NEAREST resize.

  cv2 ``resizeNN``: ``min(floor(i * (1 / (dst / src))), src - 1)`` in
  float64 (mmcv imrescale of BitmapMasks uses 'nearest').
  """
  ifx = 1.0 / (dst_len / src_len)
  idx = np.floor(np.arange(dst_len, dtype=np.float64) * ifx).astype(np.int64)
  return np.minimum(idx, src_len - 1)


def resize_masks_nearest(masks: np.ndarray, new_w: int,
                         new_h: int) -> np.ndarray:
  """``(G, H, W)`` uint8 -> ``(G, new_h, new_w)`` by cv2 nearest indexing."""
  rows = nearest_src_index(new_h, masks.shape[1])
  cols = nearest_src_index(new_w, masks.shape[2])
  return masks[:, rows[:, None], cols[None, :]]


# ---------------------------------------------------- box-aligned crops
def _axis_samples(c1: float, c2: float, size: int, extent: int):
  """Separable RoIAlign (aligned=True, scale 1, adaptive) samples on one axis.

  Mirrors mmcv's CPU ``roi_align`` position arithmetic in float32: start =
  c1 - 0.5, bin = (c2 - c1) / size, grid = ceil((c2 - c1) / size), sample
  k of bin p at start + p * bin + (k + 0.5) * bin / grid; a sample outside
  [-1, extent] contributes 0; otherwise it is clamped at 0 and at extent - 1
  and split linearly between its two neighbours.

  Returns:
    (low, high) int64 ``(size, grid)`` indices relative to ``first``,
    (w_low, w_high) float64 ``(size, grid)`` weights, ``first``, ``n`` (the
    window length covering every index) and ``grid``; grid 0 for an empty
    box.
  """
  f32 = np.float32
  start = f32(c1) - f32(0.5)
  length = (f32(c2) - f32(0.5)) - start
  bin_sz = length / f32(size)
  grid = int(np.ceil(length / f32(size))) if length > 0 else 0
  if grid == 0:
    return None, None, None, None, 0, 0, 0
  p = np.arange(size, dtype=f32)[:, None]
  k = np.arange(grid, dtype=f32)[None, :]
  pos = start + p * bin_sz + (k + f32(0.5)) * bin_sz / f32(grid)
  valid = (pos >= -1) & (pos <= extent)
  pos = np.maximum(pos, f32(0))
  low = pos.astype(np.int64)
  at_end = low >= extent - 1
  low = np.where(at_end, extent - 1, low)
  high = np.where(at_end, low, low + 1)
  frac = np.where(at_end, f32(0), pos - low.astype(f32)).astype(f32)
  w_low = np.where(valid, f32(1) - frac, 0).astype(np.float64)
  w_high = np.where(valid, frac, 0).astype(np.float64)
  first = int(low.min())
  n = int(high.max()) - first + 1
  return low - first, high - first, w_low, w_high, first, n, grid


def crop_mask_window(fetch: Callable[[int, int, int, int], np.ndarray],
                     box: Sequence[float], size: int,
                     mask_hw: Sequence[int]) -> np.ndarray:
  """One instance's box-aligned crop from a lazily fetched bitmap window.

  The bilinear sampling is separable, so the bin averages are computed as
  gathers along rows, then along columns (no BLAS: data workers must not
  spawn BLAS threads).

  Args:
    fetch: ``fetch(r0, r1, c0, c1)`` returns rows r0:r1, cols c0:c1 of the
      full ``mask_hw`` bitmap (any numeric dtype, values in {0, 1}).
    box: ``(x1, y1, x2, y2)`` in the bitmap's pixel frame.
    size: output side M.
    mask_hw: ``(H, W)`` of the full bitmap (the extent for the boundary rule).

  Returns:
    ``(M, M)`` uint8 {0, 1}: RoIAlign average of each bin >= 0.5.
  """
  x1, y1, x2, y2 = (float(v) for v in box)
  ylo, yhi, wyl, wyh, r0, nr, gy = _axis_samples(y1, y2, size,
                                                 int(mask_hw[0]))
  xlo, xhi, wxl, wxh, c0, nc, gx = _axis_samples(x1, x2, size,
                                                 int(mask_hw[1]))
  if gy == 0 or gx == 0:
    return np.zeros((size, size), np.uint8)
  win = fetch(r0, r0 + nr, c0, c0 + nc).astype(np.float64)
  # Rows: (M, gy, nc) -> (M, nc); then columns: (M, M, gx) -> (M, M).
  rows = (win[ylo] * wyl[..., None] + win[yhi] * wyh[..., None]).sum(1)
  total = (rows[:, xlo] * wxl + rows[:, xhi] * wxh).sum(-1)
  return (total / (gy * gx) >= 0.5).astype(np.uint8)


def crop_masks_to_boxes(masks: np.ndarray, boxes: np.ndarray,
                        size: int) -> np.ndarray:
  """Box-aligned GT mask crops (bounded-memory GT mask storage).

  Cell (i, j) of crop g is 1 iff the RoIAlign average (aligned=True, spatial
  scale 1, mmcv's adaptive sampling ceil(box_side / size) per bin side) of
  bin (i, j) of ``boxes[g]`` over ``masks[g]`` is >= 0.5, as mmdetection
  computes mask targets (spec §3.3), here for the GT box itself.

  Args:
    masks: ``(G, H, W)`` uint8 {0, 1} bitmaps at train scale (padded to
      pad_shape as mmdetection pads them).
    boxes: ``(G, 4)`` float ``(x1, y1, x2, y2)`` in the same pixel frame.
    size: crop side M (cfg.data.gt_mask_crop_size).

  Returns:
    ``(G, M, M)`` uint8 {0, 1}.
  """
  out = np.zeros((len(boxes), size, size), np.uint8)
  hw = masks.shape[1:]
  for g in range(len(boxes)):
    m = masks[g]
    out[g] = crop_mask_window(lambda r0, r1, c0, c1: m[r0:r1, c0:c1],
                              boxes[g], size, hw)
  return out


# -------------------------------------------------------------- training
def train_transform(img_bgr: np.ndarray, boxes: np.ndarray,
                    labels: np.ndarray,
                    masks: np.ndarray | Callable[[], np.ndarray] | None,
                    data_cfg, flip: bool,
                    bucket_hw: Sequence[int] | None = None,
                    name: str = 'an image',
                    img_scale: Sequence[int] | None = None
                    ) -> tuple[dict[str, np.ndarray], bool]:
  """mmdetection's train pipeline on one image + fixed-size ground truth.

  Resize (keep ratio) -> boxes x scale_factor clipped to img_shape ->
  RandomFlip (decided by the caller) -> Normalize -> Pad to /32 (pad_shape)
  and then to ``bucket_hw`` with 0 (spec §1.3). Masks are resized by
  nearest, flipped, padded to pad_shape and stored as box-aligned crops.

  Args:
    img_bgr: ``(H0, W0, 3)`` uint8 BGR.
    boxes: ``(N, 4)`` float32 original-frame boxes.
    labels: ``(N,)`` int labels 0..C-1.
    masks: ``(N, H0, W0)`` uint8 bitmaps, or a callable returning them (only
      called when N > 0), or None (crops are then all zero).
    data_cfg: ``cfg.data`` (img_scale, size_divisor, mean, std, to_rgb,
      buckets, max_instances, gt_mask_crop_size).
    flip: apply the horizontal flip.
    bucket_hw: output image size; default: ``choose_bucket``.
    name: the image (file and id) for error messages.
    img_scale: (long, short) scale of this image (multi-scale training:
      ``pipeline.scale_decision`` of ``data.train_img_scales``); default
      ``data_cfg.img_scale``.

  Returns:
    (example, truncated): example has ``image (H, W, 3) float32``,
    ``img_shape``, ``pad_shape`` ``(2,) int32``, ``scale_factor (4,)
    float32``, ``gt_boxes (G, 4) float32`` train-scale (padding rows 0),
    ``gt_labels (G,) int32`` (padding 0), ``gt_valid (G,) bool``,
    ``gt_masks (G, M, M) uint8``; G = max_instances. ``truncated`` is True
    when the image had more than G instances (the first G are kept).

  Raises:
    DegenerateImageError: the image resizes to a zero side.
  """
  h0, w0 = img_bgr.shape[:2]
  new_w, new_h = checked_rescale_size(
      w0, h0, data_cfg.img_scale if img_scale is None else img_scale, name)
  sf = scale_factor_of(w0, h0, new_w, new_h)
  pad = padded_size(new_h, new_w, data_cfg.size_divisor)
  if bucket_hw is None:
    bucket_hw = choose_bucket(pad, data_cfg.buckets)
  img = resize_image(img_bgr, new_w, new_h)
  if flip:
    img = cv2.flip(img, 1)  # horizontal, == img[:, ::-1]
  img = normalize(img, data_cfg.mean, data_cfg.std, data_cfg.to_rgb)

  g_max = int(data_cfg.max_instances)
  m_size = int(data_cfg.gt_mask_crop_size)
  n = len(boxes)
  truncated = n > g_max
  n = min(n, g_max)
  b = rescale_boxes(np.asarray(boxes[:n], np.float32).reshape(-1, 4), sf,
                    (new_h, new_w))
  if flip:
    b = flip_boxes(b, new_w)
  gt_boxes = np.zeros((g_max, 4), np.float32)
  gt_boxes[:n] = b
  gt_labels = np.zeros((g_max,), np.int32)
  gt_labels[:n] = np.asarray(labels[:n], np.int32)
  gt_valid = np.zeros((g_max,), bool)
  gt_valid[:n] = True
  gt_masks = np.zeros((g_max, m_size, m_size), np.uint8)
  if n and masks is not None:
    full = masks() if callable(masks) else masks
    rows = nearest_src_index(new_h, h0)
    cols = nearest_src_index(new_w, w0)
    if flip:
      cols = cols[::-1]
    for g in range(n):
      m = full[g]

      def fetch(r0, r1, c0, c1, m=m):
        # The train-scale bitmap, flipped and zero padded to pad_shape,
        # materialised only inside the window.
        win = np.zeros((r1 - r0, c1 - c0), np.uint8)
        rr, cc = min(r1, new_h), min(c1, new_w)
        if rr > r0 and cc > c0:
          win[:rr - r0, :cc - c0] = m[rows[r0:rr, None], cols[None, c0:cc]]
        return win

      gt_masks[g] = crop_mask_window(fetch, b[g], m_size, pad)
  example = dict(
      image=pad_image(img, bucket_hw),
      img_shape=np.array([new_h, new_w], np.int32),
      pad_shape=np.array(pad, np.int32),
      scale_factor=sf,
      gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid,
      gt_masks=gt_masks)
  return example, truncated


def test_transform(img_bgr: np.ndarray, data_cfg,
                   bucket_hw: Sequence[int] | None = None,
                   name: str = 'an image') -> dict[str, np.ndarray]:
  """``preprocess_test`` with the image padded further to ``bucket_hw``."""
  ex = preprocess_test(img_bgr, data_cfg, name)
  if bucket_hw is None:
    bucket_hw = choose_bucket(ex['pad_shape'], data_cfg.buckets)
  ex['image'] = pad_image(ex['image'], bucket_hw)
  return ex
