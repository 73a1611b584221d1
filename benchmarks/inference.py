r"""Inference speed and memory of one config on the current backend.

  python benchmarks/inference.py --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      [--batch-size 1] [--height 800 --width 1344] [--dtypes float32,bfloat16] [--iters 5]
      [--checkpoint DIR] [--image PATH --bucket config|exact]

Prints, per compute dtype: compile time (first call), steady-state seconds per
batch and images/s (median of ``--iters`` calls after the first), and peak
memory (device ``memory_stats()`` where the backend reports it, else the
process's max RSS). Weights are random (speed does not depend on them) unless
``--checkpoint`` names a converted directory; the image is a random
``--height x --width`` picture padded to /32.

With ``--image``, times what ``evaluate`` runs per image instead, on that
image (batch 1, in this process): mmdetection's test preprocessing, the
padded image in its bucket (``--bucket config``: the smallest of
``cfg.data.buckets`` that holds it; ``exact``: its own /32-padded size, what
mmdetection computes and what ``cfg.data.eval_num_buckets`` picks for a split
of this size), the detector with the device->host copy, then the host
post-processing (masks pasted at the original size, RLE) as
``postprocess.host_records``; and, on its own, the backbone + FPN part of the
detector (``MaskScoringRCNN.features``, compiled separately: the rest of the
detector is RPN, RoI heads and MaskIoU). Prints wall and CPU seconds (``process_time``:
all threads) per stage, min and median over ``--iters`` runs, and the load
average: mmdetection's ``simple_test`` on the same image and checkpoint
(``../shared/tools/bench_mmdet.py``) covers the same work but the RLE.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from msrcnn_jax import postprocess
from msrcnn_jax.data import image_io
from msrcnn_jax.data import transforms
from msrcnn_jax.inference import Predictor, batch_by_bucket
from msrcnn_jax.modeling import build
from msrcnn_jax.modeling.detector import MaskScoringRCNN, init_variables

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/ms_rcnn_r50_caffe_fpn_1x_coco.py', 'Model config.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per call.')
_HEIGHT = flags.DEFINE_integer('height', 800, 'Resized image height.')
_WIDTH = flags.DEFINE_integer('width', 1333, 'Resized image width.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                            'Compute dtypes to measure.')
_ITERS = flags.DEFINE_integer('iters', 5, 'Timed calls after compilation.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Converted directory (convert_torch_weights.py); '
    'default: random weights.')
_IMAGE = flags.DEFINE_string(
    'image', None, 'Time preprocessing + detector + host post-processing '
    'on this image (module docstring).')
_BUCKET = flags.DEFINE_enum(
    'bucket', 'config', ['config', 'exact'], 'With --image: the padded '
    'shape the detector runs at.')


def peak_memory_mb() -> str:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return f'{stats["peak_bytes_in_use"] / 2**20:.0f} MiB device peak'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return f'{rss:.0f} MiB process max RSS'


def _min_median(xs) -> str:
  return f'{min(xs):6.3f} / {statistics.median(xs):6.3f}'


def time_image(config, variables, path: str, bucket: str, dtype: str,
               iters: int) -> None:
  """Per-stage wall / CPU seconds of evaluating one image (``--image``)."""
  with config.unlocked():
    config.test.postprocess_workers = 0   # everything in this process
  img = image_io.imread(path)
  item = transforms.preprocess_test(img, config.data)
  data_cfg = config.data
  if bucket == 'exact':
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.buckets = [tuple(int(v) for v in item['pad_shape'])]
  item.update(image_id=0, file_name=os.path.basename(path))
  predictor = Predictor(config, variables, dtype=dtype)
  features = jax.jit(lambda v, image, pad_shape: predictor.model.apply(
      v, image, pad_shape, method=MaskScoringRCNN.features))
  thr = float(config.test.rcnn.mask_thr_binary)
  stages = ('preprocess', 'detector', 'paste', 'rle', 'total',
            'backbone+FPN')
  wall = {k: [] for k in stages}
  cpu = {k: [] for k in stages}
  for i in range(iters + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    item = transforms.preprocess_test(img, config.data)
    item.update(image_id=0, file_name=os.path.basename(path))
    (batch,) = batch_by_bucket([item], 1, data_cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    host = predictor.predict_batch(batch)
    t2, c2 = time.perf_counter(), time.process_time()
    metas = [dict(image_id=0, file_name=item['file_name'],
                  ori_shape=tuple(int(v) for v in item['ori_shape']))]
    (rec,), times = postprocess.host_records(host, metas, thr)
    t3, c3 = time.perf_counter(), time.process_time()
    jax.block_until_ready(features(variables, batch['image'],
                                   batch['pad_shape']))
    t4, c4 = time.perf_counter(), time.process_time()
    if i == 0:
      print(f'{dtype}: image {os.path.basename(path)} '
            f'{tuple(int(v) for v in item["ori_shape"])} resized '
            f'{tuple(int(v) for v in item["img_shape"])} '
            f'run at {tuple(batch["image"].shape[1:3])} ({bucket} bucket); '
            f'first call (compile) {t2 - t1:.1f} s; '
            f'{len(rec["scores"])} detections')
      continue
    post_wall, post_cpu = t3 - t2, c3 - c2
    # paste / rle: host_records' thread CPU split; wall split alike.
    share = times['paste'] / max(times['postprocess'], 1e-9)
    for d, vals in ((wall, (t1 - t0, t2 - t1, post_wall * share,
                            post_wall * (1 - share), t3 - t0, t4 - t3)),
                    (cpu, (c1 - c0, c2 - c1, post_cpu * share,
                           post_cpu * (1 - share), c3 - c0, c4 - c3))):
      for k, v in zip(stages, vals):
        d[k].append(v)
  print(f'  load average {os.getloadavg()}; {iters} runs, seconds min / '
        f'median (CPU: all threads of this process)')
  for k in stages:
    print(f'  {k:10s} wall {_min_median(wall[k])}   CPU '
          f'{_min_median(cpu[k])}')


def main(argv):
  del argv
  config = _CONFIG.value
  b, h, w = _BATCH.value, _HEIGHT.value, _WIDTH.value
  ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
  if _CHECKPOINT.value:
    variables, _ = build.load_checked_variables(config, _CHECKPOINT.value)
  else:
    variables = init_variables(config, jax.random.key(0))
  if _IMAGE.value:
    print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}'
          f', {os.cpu_count()} CPUs), {config.name}, weights '
          f'{_CHECKPOINT.value or "random"}')
    for name in _DTYPES.value:
      time_image(config, variables, _IMAGE.value, _BUCKET.value, name,
                 _ITERS.value)
    return
  rng = np.random.default_rng(0)
  images = np.zeros((b, ph, pw, 3), np.float32)
  images[:, :h, :w] = rng.normal(0, 50, (b, h, w, 3))
  img_shape = np.tile([[h, w]], (b, 1)).astype(np.int32)
  pad_shape = np.tile([[ph, pw]], (b, 1)).astype(np.int32)
  scale = np.ones((b, 4), np.float32)
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'{config.name}, batch {b}, image {h}x{w} padded {ph}x{pw}')
  for name in _DTYPES.value:
    dtype = jnp.dtype(name)

    model = MaskScoringRCNN(config, dtype=dtype)

    @jax.jit
    def forward(variables, images, img_shape, pad_shape, scale):
      return model.apply(variables, images, img_shape, pad_shape, scale)

    t0 = time.perf_counter()
    jax.block_until_ready(forward(variables, images, img_shape, pad_shape,
                                  scale))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(_ITERS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(forward(variables, images, img_shape, pad_shape,
                                    scale))
      times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(f'{name:>9}: compile+first {compile_s:7.1f} s | '
          f'{step * 1000:8.1f} ms/batch | {b / step:7.2f} images/s | '
          f'{peak_memory_mb()}')


if __name__ == '__main__':
  app.run(main)
