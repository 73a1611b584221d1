"""Mask pasting and RLE against mmdetection's results and torch grid_sample."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SET_IMAGES, SETS, load_npz, load_results
from msrcnn_jax.ops.masks import decode_rle
from msrcnn_jax.ops.masks import encode_rle
from msrcnn_jax.ops.masks import paste_mask_region
from msrcnn_jax.ops.masks import paste_masks
from msrcnn_jax.ops.masks import paste_masks_jnp


def _sigmoid(x):
  return torch.sigmoid(torch.from_numpy(x)).numpy()


def _mmdet_boxes(d):
  """get_seg_masks' boxes: (det * scale_factor) / scale_factor, float32."""
  sf = d['scale_factor'].astype(np.float32)
  return (d['det_bboxes'][:, :4].astype(np.float32) * sf) / sf


def _results_in_det_order(results, image, d):
  """results.json entries of ``image`` ordered as ``det_bboxes``."""
  entries = [r for r in results if r['image'].startswith(image + '.')]
  det = d['det_bboxes'][:, :4].astype(np.float64)
  xywh = np.concatenate([det[:, :2], det[:, 2:] - det[:, :2]], 1)
  ordered = []
  for box, label in zip(xywh, d['det_labels']):
    hits = [r for r in entries if r['label'] == int(label)
            and np.allclose(r['bbox'], box, atol=1e-3)]
    assert len(hits) >= 1, (box, label)
    ordered.append(hits[0])
  assert len(ordered) == len(entries)
  return ordered


@pytest.mark.parametrize('set_name,image',
                         [(s, i) for s in SETS for i in SET_IMAGES[s]])
def test_paste_reproduces_results(set_name, image):
  d = load_npz(set_name, image)
  entries = _results_in_det_order(load_results(set_name), image, d)
  h0, w0 = (int(v) for v in d['ori_shape'][:2])
  probs = _sigmoid(d['mask_pred'])
  masks = paste_masks(probs, _mmdet_boxes(d), (h0, w0))
  assert masks.shape == (len(entries), h0, w0)
  for mask, entry in zip(masks, entries):
    ref = decode_rle(entry['segmentation'])
    inter = np.logical_and(mask, ref).sum()
    union = np.logical_or(mask, ref).sum()
    assert union == 0 or inter / union >= 0.99
    # Bit-exact pasting gives the identical RLE string.
    assert encode_rle(mask) == entry['segmentation']


def test_paste_jnp_matches_host():
  d = load_npz('r50_caffe_tiny', 'chelsea')
  h0, w0 = (int(v) for v in d['ori_shape'][:2])
  probs = _sigmoid(d['mask_pred'][:20])
  boxes = _mmdet_boxes(d)[:20]
  host = paste_masks(probs, boxes, (h0, w0))
  dev = np.asarray(paste_masks_jnp(jnp.asarray(probs), jnp.asarray(boxes),
                                   (h0, w0)))
  # Same interpolation, different summation order: at most a few pixels
  # within float rounding of 0.5 may differ.
  assert (host != dev).sum() <= 5
  assert host.sum() > 1000


def _torch_paste(mask, box, h0, w0):
  """mmdetection's _do_paste_mask(skip_empty=True) for one mask."""
  masks = torch.from_numpy(mask[None, None])
  boxes = torch.from_numpy(box[None])
  x0_int, y0_int = torch.clamp(
      boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
  x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=w0).to(torch.int32)
  y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=h0).to(torch.int32)
  if x1_int <= x0_int or y1_int <= y0_int:   # wholly outside the image
    return np.zeros((0, 0), np.float32), (int(y0_int), int(y0_int),
                                          int(x0_int), int(x0_int))
  x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
  img_y = torch.arange(y0_int, y1_int).to(torch.float32) + 0.5
  img_x = torch.arange(x0_int, x1_int).to(torch.float32) + 0.5
  img_y = (img_y - y0) / (y1 - y0) * 2 - 1
  img_x = (img_x - x0) / (x1 - x0) * 2 - 1
  img_x[torch.isinf(img_x)] = 0
  img_y[torch.isinf(img_y)] = 0
  gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
  gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
  grid = torch.stack([gx, gy], dim=3)
  out = F.grid_sample(masks, grid, align_corners=False)
  return out[0, 0].numpy(), (int(y0_int), int(y1_int), int(x0_int),
                             int(x1_int))


def test_region_matches_torch_grid_sample():
  rng = np.random.default_rng(0)
  for _ in range(50):
    mask = rng.uniform(size=(28, 28)).astype(np.float32)
    ctr = rng.uniform(0, 100, 2)
    wh = rng.uniform(.3, 90, 2)
    box = np.concatenate([ctr - wh / 2, ctr + wh / 2]).astype(np.float32)
    ref, ref_region = _torch_paste(mask, box, 100, 120)
    got, region = paste_mask_region(mask, box, (100, 120))
    assert region == ref_region
    np.testing.assert_array_equal(got, ref)   # bit-exact


def test_rle_round_trip():
  mask = np.zeros((5, 7), bool)
  mask[1:4, 2:6] = True
  mask[4, 0] = True
  rle = encode_rle(mask)
  assert rle['size'] == [5, 7] and isinstance(rle['counts'], str)
  np.testing.assert_array_equal(decode_rle(rle), mask)
  assert encode_rle(np.zeros((3, 4), bool))['counts'] == '<'
