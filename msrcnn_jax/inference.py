"""Batched, jitted inference: preprocessed images in, per-image records out.

``Predictor`` compiles the detector once per (batch size, bucket) shape and
turns its fixed-size outputs into host records (``postprocess``): boxes in
original pixels, box scores, labels, MaskIoU, mask scores and RLE masks.

On accelerators masks are pasted on the device (``postprocess.
paste_on_device`` and ``encode_on_device``, jitted programs per (batch,
canvas) run on the detector's outputs where they are); the host work left
(RLE strings, records) runs in a pool of worker processes while the device
computes the next batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import logging
import multiprocessing
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from msrcnn_jax import postprocess
from msrcnn_jax.data import image_io
from msrcnn_jax.data import pipeline
from msrcnn_jax.data import transforms

# The detector's inputs, in order (the pipeline's keys).
BATCH_KEYS = ('image', 'img_shape', 'pad_shape', 'scale_factor')
# Detector outputs the records need (``mask_logits`` only to paste on the
# host).
_RECORD_KEYS = ('boxes', 'scores', 'labels', 'valid', 'mask_iou',
                'mask_scores', 'paste_boxes')


def default_postprocess_workers() -> int:
  """Worker processes for host post-processing: CPU cores - 1, at most 8;
  0 on the CPU backend (the detector there takes the cores and is ~40x
  slower than the host part)."""
  if jax.default_backend() == 'cpu':
    return 0
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count() or 1)
  return int(min(max(cores - 1, 0), 8))


def masks_on_device(mask_paste: str) -> bool:
  """``cfg.test.mask_paste`` ('auto' | 'device' | 'host') -> on the device?

  Raises:
    ValueError: another value.
  """
  if mask_paste not in ('auto', 'device', 'host'):
    raise ValueError(f'test.mask_paste must be auto, device or host, not '
                     f'{mask_paste!r}')
  if mask_paste == 'auto':
    return jax.default_backend() != 'cpu'
  return mask_paste == 'device'


class Predictor:
  """A jitted detector: one compiled program per (batch, bucket) shape.

  Args:
    config: the model config (``model``, ``test`` and ``data`` are read;
      ``test.mask_paste`` and ``test.postprocess_workers`` choose where
      masks are pasted and how many worker processes make the records,
      -1 = ``default_postprocess_workers()``, 0 = in the calling thread).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    dtype: compute dtype of convolutions and dense layers (``bfloat16``
      runs them in bf16 on float32 variables; outputs stay float32).

  Attributes:
    forward: the jitted detector, ``forward(variables, image, img_shape,
      pad_shape, scale_factor) -> outputs`` (``MaskScoringRCNN.__call__``:
      fixed-size detections, mask logits, MaskIoU); what ``msrcnn_jax.export``
      serializes.
    timings: seconds accumulated over calls: ``device`` (wall time waiting
      for device results), ``postprocess`` (CPU time of making records, in
      whichever process did it), of which ``paste`` and ``rle`` (host
      pasting, RLE strings), and ``host_wait`` (wall time waiting for
      worker results).
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict,
               dtype: Any = 'float32'):
    # Imported here so that ``serving`` (exported programs) runs without it.
    from msrcnn_jax.modeling.detector import MaskScoringRCNN  # pylint: disable=g-import-not-at-top
    self.config = config
    self.model = MaskScoringRCNN(config, dtype=jax.numpy.dtype(dtype))
    self.variables = variables
    self.paste_on_device = masks_on_device(config.test.get('mask_paste',
                                                           'auto'))
    workers = int(config.test.get('postprocess_workers', -1))
    self.postprocess_workers = (default_postprocess_workers() if workers < 0
                                else workers)
    self.timings: dict[str, float] = {}
    self._pool = None

    def forward(variables, image, img_shape, pad_shape, scale_factor):
      return self.model.apply(variables, image, img_shape, pad_shape,
                              scale_factor)
    self.forward = jax.jit(forward)
    self._paste = jax.jit(postprocess.paste_on_device,
                          static_argnames=('canvas_hw', 'mask_thr'))
    self._encode = jax.jit(postprocess.encode_on_device)

  def detect(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The detector's outputs for a padded batch, as device arrays (async)."""
    return self.forward(self.variables, *(batch[k] for k in BATCH_KEYS))

  def _dispatch(self, batch: dict[str, Any]) -> tuple[dict, tuple | None]:
    """Detector (+ paste) dispatched on the device; nothing waits."""
    out = dict(self.detect(batch))
    canvas = (postprocess.canvas_size(batch['ori_shape'])
              if self.paste_on_device else None)
    if canvas is not None:
      ori_shape = np.asarray(batch['ori_shape'], np.int32)
      masks = self._paste(out, ori_shape, canvas_hw=canvas,
                          mask_thr=float(self.config.test.rcnn
                                         .mask_thr_binary))
      out.update(self._encode(masks, ori_shape))
    return out, canvas

  def _fetch(self, out: dict, canvas) -> dict[str, np.ndarray]:
    """Device -> host: what the records need (the logits only to paste on
    the host)."""
    keys = [k for k in _RECORD_KEYS if k in out]
    if canvas is not None:
      keys += list(postprocess.DEVICE_MASK_KEYS)
    host = jax.device_get({k: out[k] for k in keys})
    if canvas is not None:
      host['canvas_hw'] = np.asarray(canvas)
      if (host['rle_count'] <= host['rle_index'].shape[1]).all():
        return host
    host['mask_logits'] = np.asarray(jax.device_get(out['mask_logits']))
    return host

  def predict_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Host outputs for a padded batch: the detector's record keys (numpy)
    plus ``postprocess.encode_on_device``'s keys and ``canvas_hw`` when the
    masks were pasted on the device (else ``mask_logits``)."""
    return self._fetch(*self._dispatch(batch))

  def _add_time(self, key: str, seconds: float) -> None:
    self.timings[key] = self.timings.get(key, 0.) + seconds

  def _worker_pool(self):
    if self._pool is None and self.postprocess_workers > 0:
      # spawn: the parent runs XLA threads, which fork must not copy.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.postprocess_workers,
          mp_context=multiprocessing.get_context('spawn'))
    return self._pool

  def _workers_failed(self, error: Exception) -> None:
    # E.g. spawn re-importing a __main__ script without a main guard.
    if self.postprocess_workers:
      logging.warning('post-processing workers failed (%s); making records '
                      'in this process from now on', error)
    self.postprocess_workers = 0
    self.close()

  def close(self) -> None:
    """Stops the worker processes (they restart on the next call)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def predict_batches(self, batches: Iterable[dict[str, Any]]
                      ) -> Iterator[dict[str, Any]]:
    """Records of every valid image of every batch, in order.

    Each batch holds the arrays of ``BATCH_KEYS`` plus ``ori_shape``,
    ``image_id``, optional ``file_name`` (list) and ``valid`` (B,) flags.
    Batch i + 1 is dispatched to the device before the host waits for
    batch i, and the records of up to ``2 x workers`` batches are made in
    the worker processes at once.
    """
    thr = float(self.config.test.rcnn.mask_thr_binary)
    pool = self._worker_pool()
    on_device: collections.deque = collections.deque()
    on_host: collections.deque = collections.deque()

    def to_host(valid, metas, dev):
      t = time.perf_counter()
      host = self._fetch(*dev)
      self._add_time('device', time.perf_counter() - t)
      fut = None
      if pool is not None and self.postprocess_workers > 0:
        try:
          fut = pool.submit(postprocess.host_records, host, metas, thr)
        except concurrent.futures.process.BrokenProcessPool as e:
          self._workers_failed(e)
      if fut is None:
        fut = concurrent.futures.Future()
        fut.set_result(postprocess.host_records(host, metas, thr))
      on_host.append((valid, fut, host, metas))

    def finish():
      valid, fut, host, metas = on_host.popleft()
      t = time.perf_counter()
      try:
        records, timings = fut.result()
      except concurrent.futures.process.BrokenProcessPool as e:
        self._workers_failed(e)
        records, timings = postprocess.host_records(host, metas, thr)
      self._add_time('host_wait', time.perf_counter() - t)
      for k, v in timings.items():
        self._add_time(k, v)
      return [rec for i, rec in enumerate(records) if valid[i]]

    for batch in batches:
      n = len(batch['image'])
      valid = np.asarray(batch.get('valid', np.ones(n, bool)))
      names = batch.get('file_name', [''] * n)
      metas = [dict(image_id=int(batch['image_id'][i]) if 'image_id' in batch
                    else i, file_name=names[i],
                    ori_shape=tuple(int(v) for v in batch['ori_shape'][i]))
               for i in range(n)]
      on_device.append((valid, metas, self._dispatch(batch)))
      if len(on_device) > 1:
        to_host(*on_device.popleft())
      while on_host and (len(on_host) > 2 * max(self.postprocess_workers, 0)
                         or on_host[0][1].done()):
        yield from finish()
    while on_device:
      to_host(*on_device.popleft())
    while on_host:
      yield from finish()

  def predict_images(self, paths: Sequence[str], batch_size: int = 1,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Reads, preprocesses (as mmdetection's test pipeline), batches by
    bucket and runs ``paths``. Returns one record per path, in order.

    Images are read as they are needed: a batch runs as soon as
    ``batch_size`` images of one bucket are waiting, so at most
    ``batch_size`` preprocessed images per bucket are held in memory
    (the records, with RLE masks, are kept for all).
    """
    records: dict[int, dict] = {}
    pending: dict[tuple, list] = {}
    bar = tqdm.tqdm(total=len(paths), disable=not progress, unit='img',
                    desc='predict')

    def run(group):
      for batch in batch_by_bucket(group, batch_size, self.config.data):
        for rec in self.predict_batches([batch]):
          records[rec['image_id']] = rec
          bar.update(1)

    try:
      for i, path in enumerate(paths):
        item = transforms.preprocess_test(image_io.imread(path),
                                          self.config.data, path)
        item['image_id'] = i
        item['file_name'] = os.path.basename(path)
        bucket = tuple(transforms.choose_bucket(item['pad_shape'],
                                                self.config.data.buckets))
        group = pending.setdefault(bucket, [])
        group.append(item)
        if len(group) == batch_size:
          run(pending.pop(bucket))
      for group in pending.values():
        run(group)
    finally:
      bar.close()
    return [records[i] for i in range(len(paths))]


def batch_by_bucket(items: Sequence[dict[str, Any]], batch_size: int,
                    data_cfg: ml_collections.ConfigDict
                    ) -> Iterator[dict[str, Any]]:
  """Groups preprocessed test items into fixed-shape batches.

  The evaluation pipeline's grouping (``pipeline.eval_plan``): items in the
  same shape bucket (``cfg.data.buckets``) are batched together, order kept
  within a bucket; a short last batch is padded with copies of its first
  item and ``valid`` False.
  """
  buckets = [tuple(int(v) for v in b) for b in data_cfg.buckets]
  ids = pipeline.bucket_ids([it['pad_shape'] for it in items], buckets)
  for b, idx in pipeline.eval_plan(ids, batch_size):
    chunk = [items[i] for i in idx if i >= 0]
    n = len(chunk)
    chunk = chunk + [chunk[0]] * (batch_size - n)
    yield dict(
        image=np.stack([transforms.pad_image(it['image'], buckets[b])
                        for it in chunk]),
        img_shape=np.stack([it['img_shape'] for it in chunk]).astype(
            np.int32),
        pad_shape=np.stack([it['pad_shape'] for it in chunk]).astype(
            np.int32),
        scale_factor=np.stack([it['scale_factor'] for it in chunk]).astype(
            np.float32),
        ori_shape=np.stack([it['ori_shape'] for it in chunk]).astype(
            np.int32),
        image_id=np.asarray([it['image_id'] for it in chunk], np.int64),
        file_name=[it['file_name'] for it in chunk],
        valid=np.arange(batch_size) < n)
