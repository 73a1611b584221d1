r"""Trains Mask Scoring R-CNN (thin entry point over ``train_and_evaluate``).

  python train.py                                  # configs/quickstart_synthetic.py
  python train.py --config=configs/ms_rcnn_r50_caffe_fpn_1x_coco.py \
      --config.data.coco_dir=/data/coco --workdir=/ckpt/r50_1x \
      --config.train.init_checkpoint=/ckpt/resnet50_caffe_converted
  python train.py --config.train.max_steps=100 --config.train.compute_dtype=bfloat16

Any ``--config.<path>=<value>`` overrides a config key. Re-running with the
same ``--workdir`` resumes from its newest checkpoint. On several hosts run the
same command on every host (see README: TPU pod slices and multi-node GPU).
"""

import os
import sys

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
  _, metrics = trainer.train_and_evaluate(config, workdir, task=task)
  logging.info('Final metrics: %s', {k: v for k, v in metrics.items()
                                     if k != 'init_report'})


if __name__ == '__main__':
  errors.run(main)
