"""Input-pipeline throughput: train images/s, total and per CPU core.

Measures ``make_train_iterator`` on (1) the in-memory synthetic source and
(2) a COCO-format directory written by ``synthetic.write_coco`` (PNG decode
+ RLE masks through pycocotools), both with 640x480 images resized to the
released (1333, 800) scale (-> 1067x800, bucket 800x1344), the full
max_instances=100 / 112x112 mask-crop ground truth.

  python benchmarks/input_pipeline.py [--images 32] [--steps 12] [--batch 2]
      [--workers 0 2]

"per core" = images per CPU-second of this process (all threads), which
does not depend on other load on the machine; "total" is wall-clock.

Also times the start-up checks of a COCO split (``coco.check_image_files``:
every file exists and its header's size, EXIF orientation applied, is the
annotated one) per image, on the PNG directory and on the same images as
JPEG with an EXIF block.
"""

import argparse
import os
import tempfile
import time

from PIL import Image

from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.data import coco, pipeline, synthetic


def _rate(cfg, source, batch, steps, workers):
  cfg.data.num_workers = workers
  it = pipeline.make_train_iterator(cfg, source, batch_size_per_host=batch,
                                    seed=0, start_step=0, process_index=0,
                                    process_count=1)
  next(it)  # warm-up (pool start, first decode)
  t, c = time.perf_counter(), time.process_time()
  for _ in range(steps):
    b = next(it)
  dt, dc = time.perf_counter() - t, time.process_time() - c
  it.close()
  return steps * batch / dt, steps * batch / dc, b['image'].shape


def _check_cost(records, ann_file, repeat=5):
  """CPU and wall ms per image of ``coco.check_image_files``."""
  t, c = time.perf_counter(), time.process_time()
  for _ in range(repeat):
    coco.check_image_files(records, ann_file)
  n = repeat * len(records)
  return ((time.perf_counter() - t) / n * 1e3,
          (time.process_time() - c) / n * 1e3)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--images', type=int, default=32)
  ap.add_argument('--steps', type=int, default=12)
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  args = ap.parse_args()
  cores = len(os.sched_getaffinity(0)) if hasattr(
      os, 'sched_getaffinity') else os.cpu_count()
  cfg = ms_rcnn_config()
  cfg.data.synthetic = dict(num_train=args.images, num_val=1,
                            image_size=(480, 640), max_objects=6,
                            num_classes=3)
  syn = synthetic.SyntheticDataset('train', cfg.data.synthetic, seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.write_coco(tmp, 'train', args.images, cfg.data.synthetic)
    coco_src = coco.CocoSource(tmp, 'train', train=True)
    print(f'{cores} CPU cores available; 640x480 -> 1067x800 (bucket '
          f'800x1344), batch {args.batch}, {args.steps} steps')
    jpegs = []
    for r in coco_src.records:
      path = os.path.splitext(r['path'])[0] + '.jpg'
      exif = Image.Exif()
      exif[0x0112] = 1  # an EXIF block, upright
      Image.open(r['path']).convert('RGB').save(path, exif=exif.tobytes())
      jpegs.append(dict(r, path=path))
    for name, recs in (('PNG', coco_src.records), ('JPEG+EXIF', jpegs)):
      wall, cpu = _check_cost(recs, coco_src.ann_file)
      print(f'start-up check ({name}): {wall:.3f} ms wall, {cpu:.3f} ms '
            f'CPU per image (x 118287 COCO train2017 images: '
            f'{wall * 118.287:.0f} s)')
    for name, src in (('synthetic', syn), ('coco-format', coco_src)):
      for w in args.workers:
        rate, per_core, shape = _rate(cfg, src, args.batch, args.steps, w)
        print(f'{name:12s} workers={w}: {rate:6.2f} images/s total (wall), '
              f'{per_core:6.2f} images/s per CPU core  (batch image '
              f'{shape})')


if __name__ == '__main__':
  main()
