"""The README's main command, shortened: `python train.py` on synthetic data.

Runs the real entry point (quickstart config) for a few dozen steps in a
subprocess, then checks that the loss fell, that the run left checkpoints,
TensorBoard events, metrics.json with mmdetection's keys, the mask-scoring
report and pictures, and that rerunning the command resumes. The first run's
console is also checked as a person reads it: no third-party INFO lines
(orbax, JAX's backend probe), the mask-scoring summary once, no log line glued
to the progress bar, and the closing summary (AP table, paths written) last
instead of a Python dict.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import compilation_cache_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = [f'{t}_mAP{s}' for t in ('bbox', 'segm')
               for s in ('', '_50', '_75', '_s', '_m', '_l')]


def _train(workdir, steps, cache_env):
  cmd = [sys.executable, 'train.py', f'--workdir={workdir}',
         f'--config.train.max_steps={steps}',
         '--config.train.log_every_steps=5',
         '--config.train.checkpoint_every_steps=20',
         '--config.data.synthetic.num_val=8',
         '--config.num_vis_images=2']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', **cache_env))
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  return proc


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / 'qs')
  cache_env = compilation_cache_env(tmp_path)
  proc = _train(workdir, 40, cache_env)
  out = proc.stdout + proc.stderr
  losses = [float(v) for v in re.findall(r'step \d+/\d+ .*? loss=([0-9.]+)',
                                         out)]
  assert len(losses) == 8, out[-3000:]
  # From scratch the total loss starts around 3 and falls while the lr is
  # still warming up (about 3.1 -> 1.8 over these 40 steps when measured).
  assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses

  assert os.listdir(os.path.join(workdir, 'checkpoints'))
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(workdir))
  eval_dir = os.path.join(workdir, 'eval')
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    metrics = json.load(f)
  for k in METRIC_KEYS:
    assert isinstance(metrics[k], float), k
  for name in ('results.bbox.json', 'results.segm.json',
               'mask_scoring_report.json', 'mask_scoring_scatter.png'):
    assert os.path.isfile(os.path.join(eval_dir, name)), name
  assert len(os.listdir(os.path.join(eval_dir, 'vis'))) == 2

  # The console, as a person reads it.
  for noise in ('orbax', 'checkpoint_manager.py', 'async_checkpointer.py',
                'Unable to initialize backend', "Final metrics: {'train'",
                'creating index'):
    assert noise not in out, noise
  assert out.count('Mask scoring over') == 1
  for line in proc.stderr.splitlines():  # log lines start their own line
    assert 'step/s]I' not in line and 'step/s]W' not in line, line
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].split() == ['TensorBoard', workdir]
  assert 'Training done: step 40' in proc.stdout
  assert any(l.split()[:1] == ['mAP'] for l in lines)

  # The same command with a longer schedule resumes from step 40.
  proc = _train(workdir, 45, cache_env)  # its programs from the cache
  assert 'Resuming from step 40' in proc.stdout + proc.stderr
