r"""Training-step speed and memory of one config on the current backend.

  python benchmarks/train_step.py --config configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --batch-size 16 [--steps 10] [--config.train.compute_dtype=bfloat16]

Builds the real detector task (``msrcnn_jax.training.task.DetectorTask``),
random weights and a random global batch of the config's first bucket shape
(``config.data.buckets[0]``) with a few random ground-truth boxes/masks per
image, shards it over all devices exactly as ``train.py`` does, and prints:
compile time of the jitted train step, steady-state seconds per step (median
of ``--steps`` after one warm-up), images/s, and peak memory per device
(``memory_stats()['peak_bytes_in_use']`` where the backend reports it, else
the process's max RSS).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from msrcnn_jax.training import optimizer as optimizer_lib
from msrcnn_jax.training import partitioning
from msrcnn_jax.training import train_step as train_step_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/ms_rcnn_r50_caffe_fpn_1x_coco.py', 'Model config.')
_BATCH = flags.DEFINE_integer('batch_size', 0,
                              'Global batch (0 = config.train.global_batch_size).')
flags.DEFINE_alias('batch-size', 'batch_size')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps after the warm-up.')
_NUM_GT = flags.DEFINE_integer('num_gt', 8, 'Valid ground-truth boxes/image.')


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int,
                    num_gt: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  """A random host batch in the data pipeline's train format.

  Returns:
    ``image (B, H, W, 3) float32`` (H, W) = ``config.data.buckets[0]``,
    normalised-image noise,
    ``img_shape``/``pad_shape (B, 2) int32`` = (H, W), ``scale_factor (B, 4)
    float32`` ones, ``gt_boxes (B, G, 4) float32`` (x1, y1, x2, y2) in the
    image, ``gt_labels (B, G) int32``, ``gt_valid (B, G) bool`` (first
    ``num_gt`` rows), ``gt_masks (B, G, M, M) uint8`` (ellipses), G =
    ``data.max_instances``, M = ``data.gt_mask_crop_size``.
  """
  d = config.data
  h, w = (int(v) for v in d.buckets[0])
  g, m = int(d.max_instances), int(d.gt_mask_crop_size)
  rs = np.random.default_rng(seed)
  wh = rs.uniform(16, min(h, w) / 2, size=(batch_size, g, 2))
  xy = rs.uniform(0, 1, size=(batch_size, g, 2)) * (np.array([w, h]) - wh)
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  valid = np.arange(g)[None, :] < min(num_gt, g)
  yy, xx = np.mgrid[:m, :m]
  ellipse = (((yy - m / 2 + .5) / (m / 2)) ** 2 +
             ((xx - m / 2 + .5) / (m / 2)) ** 2 <= 1).astype(np.uint8)
  # Pixels of spread ~50 after the config's normalisation (mean removed).
  pixel_std = 50.0 / float(np.mean(d.std))
  return dict(
      image=rs.normal(0, pixel_std, (batch_size, h, w, 3)).astype(np.float32),
      img_shape=np.tile([[h, w]], (batch_size, 1)).astype(np.int32),
      pad_shape=np.tile([[h, w]], (batch_size, 1)).astype(np.int32),
      scale_factor=np.ones((batch_size, 4), np.float32),
      gt_boxes=np.where(valid[..., None], boxes, 0).astype(np.float32),
      gt_labels=np.where(valid, rs.integers(0, config.model.num_classes,
                                            (batch_size, g)), 0
                         ).astype(np.int32),
      gt_valid=np.broadcast_to(valid, (batch_size, g)).copy(),
      gt_masks=np.broadcast_to(ellipse, (batch_size, g, m, m)) *
      valid[..., None, None].astype(np.uint8))


def peak_memory() -> list[str]:
  """Peak bytes in use per local device, or the process max RSS."""
  out = []
  for dev in jax.local_devices():
    stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      out.append(f'{dev.id}: {stats["peak_bytes_in_use"] / 2**30:.2f} GiB')
  if not out:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.append(f'process max RSS {rss:.2f} GiB')
  return out


def benchmark(config: ml_collections.ConfigDict, batch_size: int,
              steps: int, task: Any = None,
              host_batch: dict[str, np.ndarray] | None = None,
              num_gt: int = 8) -> dict[str, Any]:
  """Compiles and times the train step; returns the figures.

  Args:
    config: the full config; ``train.global_batch_size`` is set to
      ``batch_size`` (and the lr scaled as the trainer would).
    batch_size: global batch (a multiple of the device count).
    steps: timed steps after one warm-up step.
    task: the train task (default ``DetectorTask(config)``).
    host_batch: this host's batch (default :func:`synthetic_batch`).
    num_gt: valid boxes per synthetic image.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.global_batch_size = batch_size
  mesh = partitioning.make_mesh()
  local = partitioning.check_batch_size(batch_size, mesh)
  if task is None:
    from msrcnn_jax.training.task import DetectorTask  # pylint: disable=g-import-not-at-top
    task = DetectorTask(config, check_eval_source=False)
  if host_batch is None:
    host_batch = synthetic_batch(config, local, num_gt,
                                 seed=jax.process_index())
  replicated = partitioning.replicated_sharding(mesh)
  init_batch = jax.tree.map(lambda x: x[:1], host_batch)
  variables = jax.jit(task.init_variables, out_shardings=replicated)(
      jax.random.key(0), init_batch)
  mask = task.frozen_mask(variables['params'])
  tx, schedule_fn = optimizer_lib.make_optimizer(config, mask)
  state = jax.jit(lambda v: train_step_lib.create_train_state(
      v, tx, jax.random.key(1)), out_shardings=replicated)(variables)
  del variables
  step = train_step_lib.make_train_step(
      task.loss_fn, tx, mesh, compute_dtype=config.train.compute_dtype,
      schedule_fn=schedule_fn, mask=mask)
  batch = partitioning.host_batch_to_global(host_batch, mesh)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times) if times else first_s
  host = jax.device_get(metrics)
  return dict(compile_s=compile_s, first_step_s=first_s, step_s=step_s,
              images_per_s=batch_size / step_s, memory=peak_memory(),
              loss=float(host['loss']), finite=bool(host['finite']),
              devices=jax.device_count(),
              flops=_flops(compiled))


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get('flops')) if cost else None
  except Exception:  # pylint: disable=broad-except
    return None


def main(argv):
  del argv
  config = _CONFIG.value
  # Random weights with frozen identity BN statistics make a full-width
  # ResNet's activations explode (inf losses at 1333x800); identity-initialised
  # residual blocks keep them finite. Speed does not depend on the values.
  with config.unlocked():
    config.model.backbone.zero_init_residual = True
  batch = _BATCH.value or int(config.train.global_batch_size)
  d = jax.devices()[0]
  print(f'backend {jax.default_backend()} ({d.device_kind}) x '
        f'{jax.device_count()}, {config.name}, global batch {batch}, '
        f'bucket {tuple(config.data.buckets[0])}, compute '
        f'{config.train.compute_dtype}')
  r = benchmark(config, batch, _STEPS.value, num_gt=_NUM_GT.value)
  print(f'compile {r["compile_s"]:.1f} s | first step {r["first_step_s"]:.2f}'
        f' s | {r["step_s"] * 1000:.1f} ms/step | {r["images_per_s"]:.2f} '
        f'images/s | loss {r["loss"]:.4f} finite {r["finite"]}')
  if r['flops']:
    print(f'XLA cost analysis: {r["flops"] / 1e9:.1f} GFLOP/step '
          f'({r["flops"] / r["step_s"] / 1e12:.2f} TFLOP/s)')
  print('peak memory: ' + ', '.join(r['memory']))


if __name__ == '__main__':
  app.run(main)
