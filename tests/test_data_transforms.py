"""Image loading and mmdetection-identical transforms (spec §1.3, §3.3)."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import SET_IMAGES, fixture_config, fixture_path, load_npz
from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.data import image_io, pipeline, transforms, synthetic

SET_IMAGE_PAIRS = [(s, i) for s, ims in SET_IMAGES.items() for i in ims]


@pytest.mark.parametrize('set_name,image', SET_IMAGE_PAIRS)
def test_preprocess_test_matches_mmdetection(set_name, image):
  cfg = fixture_config(set_name)
  ref = load_npz(set_name, image)
  img = image_io.imread(fixture_path(f'{image}.png'))
  ex = transforms.preprocess_test(img, cfg.data)
  expected = ref['input'][0].transpose(1, 2, 0)
  assert ex['image'].dtype == np.float32
  assert ex['image'].shape == expected.shape
  np.testing.assert_allclose(ex['image'], expected, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(ex['img_shape'], ref['img_shape'][:2])
  np.testing.assert_array_equal(ex['pad_shape'], ref['pad_shape'][:2])
  np.testing.assert_array_equal(ex['ori_shape'], ref['ori_shape'][:2])
  np.testing.assert_array_equal(ex['scale_factor'], ref['scale_factor'])


def test_rescale_size_worked_example():
  # Spec §1.3: 640x480 -> 1067x800, w_scale 1.6671875, padded to 1088x800.
  assert transforms.rescale_size(640, 480, (1333, 800)) == (1067, 800)
  np.testing.assert_array_equal(
      transforms.scale_factor_of(640, 480, 1067, 800),
      np.float32([1.6671875, 800 / 480, 1.6671875, 800 / 480]))
  assert transforms.padded_size(800, 1067) == (800, 1088)
  # Long edge bound: 2000x500 -> s = 1333/2000.
  assert transforms.rescale_size(2000, 500, (1333, 800)) == (1333, 333)


def test_choose_bucket():
  buckets = ((800, 1344), (1344, 800), (800, 800))
  assert transforms.choose_bucket((800, 800), buckets) == (800, 800)
  assert transforms.choose_bucket((800, 1088), buckets) == (800, 1344)
  assert transforms.choose_bucket((1216, 800), buckets) == (1344, 800)
  assert transforms.choose_bucket((320, 512), buckets) == (800, 800)
  with pytest.raises(ValueError, match='no bucket'):
    transforms.choose_bucket((1376, 800), buckets)


def _cv2_color(path):
  return cv2.imread(str(path), cv2.IMREAD_COLOR)


def test_image_variants_load_as_cv2_imread_color(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (21, 33), dtype=np.uint8)
  cv2.imwrite(str(tmp_path / 'gray.png'), gray)
  rgba = rng.integers(0, 256, (17, 25, 4), dtype=np.uint8)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  deep = rng.integers(0, 65536, (19, 23, 3), dtype=np.uint16)
  cv2.imwrite(str(tmp_path / 'deep.png'), deep)
  rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 CW to display
  Image.fromarray(rgb).save(tmp_path / 'rot.jpg', exif=exif.tobytes(),
                            quality=95)

  g = image_io.imread(tmp_path / 'gray.png')
  assert g.shape == (21, 33, 3) and g.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(g[..., c], gray)
  a = image_io.imread(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(a, rgba[..., 2::-1])  # alpha dropped, BGR
  d = image_io.imread(tmp_path / 'deep.png')
  assert d.dtype == np.uint8 and d.shape == (19, 23, 3)
  r = image_io.imread(tmp_path / 'rot.jpg')
  assert r.shape == (30, 20, 3)  # EXIF orientation applied
  for name in ('gray.png', 'rgba.png', 'deep.png', 'rot.jpg'):
    np.testing.assert_array_equal(image_io.imread(tmp_path / name),
                                  _cv2_color(tmp_path / name))
    with open(tmp_path / name, 'rb') as f:
      np.testing.assert_array_equal(image_io.imfrombytes(f.read()),
                                    _cv2_color(tmp_path / name))


def test_unreadable_files_raise_naming_the_file(tmp_path):
  (tmp_path / 'text.png').write_text('not an image')
  (tmp_path / 'empty.jpg').write_bytes(b'')
  for name in ('missing.png', 'text.png', 'empty.jpg'):
    path = str(tmp_path / name)
    with pytest.raises(image_io.ImageReadError, match=name):
      image_io.imread(path)


@pytest.mark.parametrize('src,dst', [((7, 9), (13, 5)),
                                     ((480, 640), (800, 1067)),
                                     ((37, 41), (37, 123))])
def test_nearest_mask_resize_matches_cv2(src, dst):
  m = (np.random.default_rng(1).random(src) > 0.5).astype(np.uint8)
  ref = cv2.resize(m, (dst[1], dst[0]), interpolation=cv2.INTER_NEAREST)
  np.testing.assert_array_equal(
      transforms.resize_masks_nearest(m[None], dst[1], dst[0])[0], ref)


def _roi_align_ref(mask, box, size):
  """mmcv roi_align_forward (CPU), aligned=True, scale 1, sampling 0, avg."""
  f32 = np.float32
  h, w = mask.shape
  x1, y1, x2, y2 = (f32(v) for v in box)
  sx, sy = x1 - f32(0.5), y1 - f32(0.5)
  rw, rh = (x2 - f32(0.5)) - sx, (y2 - f32(0.5)) - sy
  bw, bh = rw / f32(size), rh / f32(size)
  gw, gh = int(math.ceil(rw / size)), int(math.ceil(rh / size))
  count = max(gw * gh, 1)
  out = np.zeros((size, size), np.float64)
  for ph in range(size):
    for pw in range(size):
      acc = 0.0
      for iy in range(gh):
        y = sy + f32(ph) * bh + f32(iy + 0.5) * bh / f32(gh)
        for ix in range(gw):
          x = sx + f32(pw) * bw + f32(ix + 0.5) * bw / f32(gw)
          if y < -1 or y > h or x < -1 or x > w:
            continue
          yy, xx = max(y, f32(0)), max(x, f32(0))
          yl, xl = int(yy), int(xx)
          if yl >= h - 1:
            yl = yh = h - 1
            yy = f32(yl)
          else:
            yh = yl + 1
          if xl >= w - 1:
            xl = xh = w - 1
            xx = f32(xl)
          else:
            xh = xl + 1
          ly, lx = yy - yl, xx - xl
          hy, hx = 1 - ly, 1 - lx
          acc += (hy * hx * mask[yl, xl] + hy * lx * mask[yl, xh] +
                  ly * hx * mask[yh, xl] + ly * lx * mask[yh, xh])
      out[ph, pw] = acc / count
  return out


def test_crop_masks_to_boxes_matches_roi_align():
  rng = np.random.default_rng(3)
  h, w = 40, 50
  masks = np.zeros((4, h, w), np.uint8)
  cv2.ellipse(masks[0], (20, 15), (12, 8), 30, 0, 360, 1, -1)
  cv2.rectangle(masks[1], (0, 0), (49, 39), 1, -1)
  masks[2] = rng.random((h, w)) > 0.4
  cv2.fillPoly(masks[3], [np.int32([[30, 2], [49, 39], [10, 39]])], 1)
  boxes = np.float32([[7.3, 6.2, 33.9, 23.6], [0, 0, 50, 40],
                      [3.5, 4.25, 21.75, 39.5], [10, 2, 50, 40]])
  size = 7
  crops = transforms.crop_masks_to_boxes(masks, boxes, size)
  assert crops.shape == (4, size, size) and crops.dtype == np.uint8
  for g in range(4):
    ref = _roi_align_ref(masks[g].astype(np.float32), boxes[g], size)
    np.testing.assert_array_equal(crops[g], (ref >= 0.5).astype(np.uint8))
  assert crops[1].all()


def _small_cfg():
  cfg = ms_rcnn_config()
  d = cfg.data
  d.img_scale = (256, 128)
  d.buckets = ((128, 256), (256, 128), (128, 128))
  d.max_instances = 5
  d.gt_mask_crop_size = 16
  d.num_workers = 0
  d.prefetch = 1
  d.synthetic = dict(num_train=6, num_val=3, image_size=(64, 64),
                     max_objects=4, num_classes=3)
  return cfg


@pytest.mark.parametrize('flip', [False, True])
def test_train_transform_boxes_and_mask_crops(flip):
  cfg = _small_cfg()
  rng = np.random.default_rng(5)
  img, masks, boxes, labels = synthetic.generate(rng, 50, 70, 4, 3)
  ex, truncated = transforms.train_transform(img, boxes, labels, masks,
                                             cfg.data, flip)
  assert not truncated
  new_w, new_h = transforms.rescale_size(70, 50, cfg.data.img_scale)
  assert tuple(ex['img_shape']) == (new_h, new_w) == (128, 179)
  assert tuple(ex['pad_shape']) == (128, 192)
  assert ex['image'].shape == (128, 256, 3)
  n = len(boxes)
  sf = ex['scale_factor']
  ref_boxes = boxes * sf
  ref_boxes[:, 0::2] = np.clip(ref_boxes[:, 0::2], 0, new_w)
  ref_boxes[:, 1::2] = np.clip(ref_boxes[:, 1::2], 0, new_h)
  # mmdetection's path: nearest-resized masks, flipped, padded to pad_shape.
  full = np.stack([cv2.resize(m, (new_w, new_h),
                              interpolation=cv2.INTER_NEAREST)
                   for m in masks])
  if flip:
    ref_boxes = np.stack([new_w - ref_boxes[:, 2], ref_boxes[:, 1],
                          new_w - ref_boxes[:, 0], ref_boxes[:, 3]], 1)
    full = full[:, :, ::-1]
  full = np.pad(full, ((0, 0), (0, 128 - new_h), (0, 192 - new_w)))
  np.testing.assert_allclose(ex['gt_boxes'][:n], ref_boxes, atol=1e-4)
  assert ex['gt_valid'].tolist() == [True] * n + [False] * (5 - n)
  np.testing.assert_array_equal(ex['gt_labels'][:n], labels)
  np.testing.assert_array_equal(
      ex['gt_masks'][:n],
      transforms.crop_masks_to_boxes(full, ex['gt_boxes'][:n], 16))
  assert not ex['gt_masks'][n:].any() and not ex['gt_boxes'][n:].any()
  # The flipped mask lies inside the flipped box: its tight box matches.
  for g in range(n):
    ys, xs = np.nonzero(full[g])
    np.testing.assert_allclose(
        [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], ex['gt_boxes'][g],
        atol=1.01 * sf[0])
  # The image itself is flipped: undo it and compare with the unflipped one.
  plain, _ = transforms.train_transform(img, boxes, labels, masks, cfg.data,
                                        False)
  if flip:
    np.testing.assert_array_equal(ex['image'][:new_h, :new_w][:, ::-1],
                                  plain['image'][:new_h, :new_w])
  assert not ex['image'][new_h:].any() and not ex['image'][:, new_w:].any()


def test_max_instances_truncation_counted():
  cfg = _small_cfg()
  cfg.data.max_instances = 2
  rng = np.random.default_rng(0)
  img = np.zeros((64, 64, 3), np.uint8)
  boxes = np.float32([[1, 1, 10, 10], [5, 5, 20, 20], [30, 30, 60, 60]])
  ex, truncated = transforms.train_transform(
      img, boxes, np.int32([0, 1, 2]), None, cfg.data, False)
  assert truncated
  np.testing.assert_allclose(ex['gt_boxes'], boxes[:2] * 2)
  np.testing.assert_array_equal(ex['gt_labels'], [0, 1])
  del rng


def test_train_batches_have_promised_shapes():
  cfg = _small_cfg()
  cfg.data.source = 'synthetic'
  it = pipeline.make_train_iterator(cfg, None, batch_size_per_host=2, seed=0,
                                    start_step=0, process_index=0,
                                    process_count=1)
  batch = next(it)
  it.close()
  expected = dict(image=((2, 128, 128, 3), np.float32),
                  img_shape=((2, 2), np.int32), pad_shape=((2, 2), np.int32),
                  scale_factor=((2, 4), np.float32),
                  gt_boxes=((2, 5, 4), np.float32),
                  gt_labels=((2, 5), np.int32), gt_valid=((2, 5), np.bool_),
                  gt_masks=((2, 5, 16, 16), np.uint8))
  assert set(batch) == set(expected)
  for k, (shape, dtype) in expected.items():
    assert batch[k].shape == shape, k
    assert batch[k].dtype == dtype, k
  assert batch['gt_valid'].any(axis=1).all()
  assert set(np.unique(batch['gt_masks'])) <= {0, 1}
