"""Evaluation buckets chosen from the data's size histogram (issue 11)."""

import numpy as np
import pytest

from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.data import pipeline

# Hand-computed case: 10 landscape 640x427 COCO images (-> 800x1199, padded
# 800x1216), 2 at 800x1344, 3 portrait 427x640 (-> 1216x800 padded).
SIZES = np.array([[800, 1216]] * 10 + [[800, 1344]] * 2 + [[1216, 800]] * 3)
EXACT = 10 * 800 * 1216 + 2 * 800 * 1344 + 3 * 1216 * 800   # 14,796,800


def test_padded_sizes_follow_the_test_resize():
  cfg = ms_rcnn_config()
  got = pipeline.padded_sizes([[427, 640], [640, 427], [480, 640]], cfg.data)
  np.testing.assert_array_equal(got, [[800, 1216], [1216, 800],
                                      [800, 1088]])


def test_default_buckets_overhead():
  # Every image in an 800x1344 / 1344x800 bucket: 15 x 1,075,200 pixels.
  cfg = ms_rcnn_config()
  assert pipeline.padding_overhead(SIZES, cfg.data.buckets) == pytest.approx(
      15 * 800 * 1344 / EXACT - 1)                            # 9.0%


@pytest.mark.parametrize('k,buckets,pixels', [
    (1, ((1216, 1344),), 15 * 1216 * 1344),
    # The greedy pick (1216x1344 + 800x1344) is improved by a swap.
    (2, ((1216, 800), (800, 1344)), 12 * 800 * 1344 + 3 * 1216 * 800),
    (3, ((800, 1216), (1216, 800), (800, 1344)), EXACT),
    (5, ((800, 1216), (1216, 800), (800, 1344)), EXACT),
])
def test_buckets_from_sizes(k, buckets, pixels):
  got = pipeline.buckets_from_sizes(SIZES, k)
  assert got == buckets
  assert pipeline.padding_overhead(SIZES, got) == pytest.approx(
      pixels / EXACT - 1)


def test_eval_iterator_uses_buckets_from_the_data():
  cfg = ms_rcnn_config()
  cfg.data.num_workers = 0
  cfg.data.eval_num_buckets = 2
  rng = np.random.default_rng(0)
  source = [dict(image_id=i, file_name=f'{i}.png', height=h, width=w,
                 image=rng.integers(0, 255, (h, w, 3), np.uint8))
            for i, (h, w) in enumerate([(427, 640), (640, 427), (427, 640),
                                        (480, 640)])]
  it = pipeline.make_eval_iterator(cfg, source, batch_size_per_host=2,
                                   process_index=0, process_count=1)
  shapes = sorted(b['image'].shape[1:3] for b in it)
  # 800x1088 and 800x1216 share the 800x1216 bucket (3 images: 2 batches
  # of 2); the portrait image
  # gets 1216x800 (the default buckets would use 800x1344 and 1344x800).
  assert shapes == [(800, 1216), (800, 1216), (1216, 800)]


def test_chosen_buckets_need_not_fit_the_configured_ones():
  cfg = ms_rcnn_config()
  cfg.data.buckets = ((800, 800),)
  cfg.data.eval_num_buckets = 1
  assert pipeline.eval_buckets(cfg.data, SIZES) == ((1216, 1344),)
  with pytest.raises(ValueError):
    pipeline.padding_overhead(SIZES, cfg.data.buckets)
