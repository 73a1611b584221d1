"""One checkpoint story: what ``train.py`` leaves is what ``predict`` takes.

The quickstart config trained for 2 steps in a subprocess (as a user runs
it); then:
- the workdir, its newest step directory and ``<workdir>/final`` (written by
  the trainer in the converter's format) load as the same variables, which
  are those of step 2, not step 1;
- the workdir as ``train.init_checkpoint`` gives every variable of step 2;
- ``python -m msrcnn_jax.predict --checkpoint WORKDIR`` runs on an image;
- a directory that holds no checkpoint ends in one ``error:`` line.
Cost: about 120 s of CPU (one 2-step training with its evaluation on 2
images, one model init, one predict).
"""

import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from conftest import compilation_cache_env

from msrcnn_jax import variables as variables_lib
from msrcnn_jax.modeling import build
from msrcnn_jax.training import partitioning
from msrcnn_jax.training import trainer
from msrcnn_jax.training.task import DetectorTask

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_QUICKSTART = os.path.join(_ROOT, 'configs', 'quickstart_synthetic.py')


def _run(*args, cache_env=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
             **(cache_env or {}))
  return subprocess.run([sys.executable, *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)


def _quickstart_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('qs', _QUICKSTART)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.slow
def test_train_then_predict_on_the_workdir(tmp_path):
  cache_env = compilation_cache_env(tmp_path)
  workdir = str(tmp_path / 'run')
  proc = _run('train.py', f'--workdir={workdir}',
              '--config.train.max_steps=2',
              '--config.train.checkpoint_every_steps=1',
              '--config.train.log_every_steps=1',
              '--config.data.synthetic.num_train=16',
              '--config.data.synthetic.num_val=2',
              '--config.num_vis_images=0', cache_env=cache_env)
  assert proc.returncode == 0, proc.stderr[-3000:]

  config = _quickstart_config()
  steps = os.path.join(workdir, 'checkpoints')
  by_path = {p: build.load_checked_variables(config, p) for p in (
      workdir, os.path.join(steps, '2'), os.path.join(workdir, 'final'))}
  (ref, meta), *others = by_path.values()
  assert meta['step'] == 2
  assert meta['config_name'] == 'quickstart_synthetic'
  flat_ref = variables_lib.flatten(ref)
  for variables, m in others:
    assert m['step'] == 2
    flat = variables_lib.flatten(variables)
    assert flat.keys() == flat_ref.keys()
    for k, v in flat.items():
      np.testing.assert_array_equal(v, flat_ref[k], err_msg=k)
  step1 = variables_lib.flatten(
      build.load_checked_variables(config, os.path.join(steps, '1'))[0])
  key = 'params/roi_head/bbox_head/fc_cls/kernel'
  assert not np.array_equal(step1[key], flat_ref[key])

  # The same workdir as train.init_checkpoint: every variable of step 2.
  replicated = partitioning.replicated_sharding(partitioning.make_mesh())
  init = jax.jit(DetectorTask(config).init_variables)(jax.random.key(1))
  merged, report = trainer.load_init_checkpoint(workdir, init, replicated)
  assert report['num_missing'] == 0 and not report['skipped']
  for k, v in variables_lib.flatten(jax.device_get(merged)).items():
    np.testing.assert_array_equal(v, flat_ref[k], err_msg=k)

  image = np.full((128, 128, 3), 40, np.uint8)
  cv2.rectangle(image, (20, 30), (90, 100), (200, 180, 60), -1)
  image_path = str(tmp_path / 'shape.png')
  cv2.imwrite(image_path, image)
  out = tmp_path / 'results.json'
  proc = _run('-m', 'msrcnn_jax.predict', '--config', _QUICKSTART,
              '--checkpoint', workdir, '--output', str(out), image_path,
              cache_env=cache_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'detections on 1 images' in proc.stdout
  assert isinstance(json.loads(out.read_text()), list)


def test_a_directory_without_checkpoint_is_named(tmp_path):
  empty = tmp_path / 'nothing_here'
  (empty / 'checkpoints').mkdir(parents=True)
  with pytest.raises(variables_lib.CheckpointError,
                     match='nothing_here is not an msrcnn_jax checkpoint'):
    variables_lib.load_variables(str(empty))
