r"""Trains Mask Scoring R-CNN (thin entry point over ``train_and_evaluate``).

  python train.py                                  # configs/quickstart_synthetic.py
  python train.py --config=configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --config.data.coco_dir=/data/coco --workdir=/ckpt/r50_1x \
      --config.train.init_checkpoint=/ckpt/resnet50_caffe_converted
  python train.py --config.train.max_steps=100 --config.train.compute_dtype=bfloat16

Any ``--config.<path>=<value>`` overrides a config key. Re-running with the
same ``--workdir`` resumes from its newest checkpoint. On several hosts run the
same command on every host (see README: TPU pod slices and multi-node GPU).

The run ends with a summary (process 0): the steps and time, the evaluation
metrics and the last logged training means as small tables, and the paths
written (``summary``).
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from msrcnn_jax import compilation_cache
from msrcnn_jax import config as config_lib
from msrcnn_jax import errors

_HERE = os.path.dirname(os.path.abspath(__file__))
# Before the flags: config_flags applies --config.<key> overrides as it
# defines them, with a traceback for an unknown key.
config_lib.exit_on_unknown_overrides(sys.argv)

with errors.config_errors_reported():  # overrides of the default config
  _CONFIG = config_flags.DEFINE_config_file(
      'config', os.path.join(_HERE, 'configs', 'quickstart_synthetic.py'),
      'Config file (a python file with get_config()).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Checkpoints, TensorBoard events and evaluation output '
    '(default ./workdir/<config.name>).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 100,
    'Several processes: a process silent for this long counts as dead and '
    'the run ends on every host with an error (instead of hanging).')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', 300,
    'Several processes: seconds to wait for all of them to join.')


_AP_KEYS = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')
_TRAIN_KEYS = ('loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls',
               'loss_bbox', 'loss_mask', 'loss_mask_iou', 'lr', 'grad_norm',
               'images_per_sec')


def summary(workdir: str, metrics: dict, seconds: float) -> str:
  """The end-of-run summary ``train.py`` prints.

  Args:
    workdir: the run's workdir.
    metrics: ``trainer.train_and_evaluate``'s metrics (``train``, ``eval``,
      ``steps``, optional ``preempted``).
    seconds: wall time of the run.

  Returns:
    Lines: steps and time; COCO AP (bbox and segm columns) and the
    mask-scoring correlations when evaluated; the last training means; the
    paths written that exist.
  """
  from msrcnn_jax import console  # pylint: disable=g-import-not-at-top
  minutes, secs = divmod(int(round(seconds)), 60)
  state = 'stopped (preempted) at' if metrics.get('preempted') else 'done:'
  lines = [f'Training {state} step {metrics.get("steps")} '
           f'({minutes} min {secs:02d} s)']
  ev = metrics.get('eval') or {}
  if any(f'bbox_{k}' in ev for k in _AP_KEYS):
    ap = lambda v: None if v is None else f'{float(v):.3f}'
    lines += ['', console.table(
        [(k, ap(ev.get(f'bbox_{k}')), ap(ev.get(f'segm_{k}')))
         for k in _AP_KEYS], header=('COCO', 'bbox', 'segm'))]
    ms = [(name, ap(ev.get(f'mask_scoring/pearson_{key}')),
           ap(ev.get(f'mask_scoring/spearman_{key}')))
          for name, key in (('predicted MaskIoU', 'maskiou'),
                            ('box score', 'boxscore'))
          if f'mask_scoring/pearson_{key}' in ev]
    if ms:
      lines += ['', console.table(
          ms, header=('vs actual mask IoU', 'Pearson', 'Spearman'))]
  tr = metrics.get('train') or {}
  if tr:
    lines += ['', 'last logged training means: ' + ', '.join(
        f'{k} {float(tr[k]):.4g}' for k in _TRAIN_KEYS if k in tr)]
  written = [
      ('checkpoints', os.path.join(workdir, 'checkpoints')),
      ('final variables', os.path.join(workdir, 'final')),
      ('metrics', os.path.join(workdir, 'eval', 'metrics.json')),
      ('mask-scoring report',
       os.path.join(workdir, 'eval', 'mask_scoring_report.json')),
      ('pictures', os.path.join(workdir, 'eval', 'vis')),
      ('TensorBoard', workdir if any(
          n.startswith('events.out.tfevents') for n in (
              os.listdir(workdir) if os.path.isdir(workdir) else ())) else
       ''),
  ]
  rows = [(k, p) for k, p in written if p and os.path.exists(p)]
  if rows:
    lines += ['', 'written:', console.table(rows)]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before any JAX computation: joins the other hosts when there are any.
  from msrcnn_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  partitioning.maybe_initialize_distributed(
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
      initialization_timeout=_INIT_TIMEOUT.value)
  compilation_cache.enable()
  from msrcnn_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  # Before any work: a workdir that cannot be written or that another run
  # holds is refused in one line; the lock is held until the process ends.
  from msrcnn_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = workdir_lib.prepare(
      _WORKDIR.value or os.path.join('workdir', config.name))
  import atexit  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    lock = workdir_lib.WorkdirLock(workdir)
    lock.acquire()
    atexit.register(lock.release)   # also after an error line (sys.exit)
  logging.info('Config %s, workdir %s', config.name, os.path.abspath(workdir))
  # The detector task is imported lazily (it pulls in the whole model).
  from msrcnn_jax.training.task import DetectorTask  # pylint: disable=g-import-not-at-top
  task = DetectorTask(config, workdir)
  start = time.time()
  _, metrics = trainer.train_and_evaluate(config, workdir, task=task)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(summary(os.path.abspath(workdir), metrics, time.time() - start),
          flush=True)


if __name__ == '__main__':
  errors.run(main)
