"""Bad input to a training run: refused in one line, or recovered from.

- config values of a wrong sign or range (a table of them) are refused by
  ``config.validate`` naming the key and the value; every config in
  ``configs/`` still validates;
- a workdir that cannot be created or written is refused naming the path
  (``training/workdir.prepare``), before any work;
- one workdir lock: a second ``train.py`` on a held workdir ends in one
  ``error:`` line naming the holder's pid and host; a dead holder's lock is
  taken over with a warning; the lock is released when a run ends, also on
  error (train.py stopping at ``train.base_lr=-0.003``, the trainer at a
  checkpoint error, a UserError inside the loop);
- a damaged newest checkpoint (data file missing, data file truncated,
  ``state/_METADATA`` missing, metadata not JSON) beside intact older steps:
  the restart falls back to the newest intact step with a warning naming the
  step and the damage, keeps the damaged step as ``<step>.damaged`` (nothing
  deleted) and trains on; the same checks on the data files of arrays
  stored outside the b-tree (over 1 KiB); damage that only the restore
  finds restarts the data iterator at the older step's position; with no
  intact step, one ``CheckpointError``;
- a restart whose config does not fit the checkpoint (a wider neck) names the
  changed config key and the first differing arrays, with the full list in a
  file;
- a ``UserError`` raised inside the training loop (by the data iterator,
  mid-run) ends in an ``error:`` line that is the last line of stderr (the
  progress bar is closed before it, so no redraw follows).
Runs use the stand-in task (``training_standin.py``). Cost: one 3-step
training, six short resumes, one mismatched restart, three subprocesses
(train.py stopping at the lock, train.py stopping at a bad config after
taking the lock, a stand-in run); measured 45 s on the idle 2-core VM, 71 s
while shared with other test runs.
"""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import importlib.util
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from msrcnn_jax import config as config_lib
from msrcnn_jax import errors
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.training import checkpointing
from msrcnn_jax.training import trainer
from msrcnn_jax.training import workdir as workdir_lib
from msrcnn_jax.training.train_step import TrainState
import training_standin
from training_standin import StandInTask, make_iter_fn, small_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
              PYTHONPATH=os.pathsep.join(
                  [_ROOT, os.path.join(_ROOT, 'tests'),
                   os.environ.get('PYTHONPATH', '')]))


def _last_line(text):
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ''


# ------------------------------------------------------------ config ranges
def _set(config, key, value):
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


# (key, bad value, what the message says besides the key and value)
_BAD_VALUES = [
    ('train.base_lr', -0.003, 'must be a number > 0'),
    ('train.base_lr', 0.0, 'must be a number > 0'),
    ('train.max_steps', -5, "must be an integer >= 0 (0 = the schedule's"),
    ('train.grad_clip_norm', -1.0, 'must be a number >= 0 (0 = no clipping)'),
    ('train.warmup_steps', -1, 'must be an integer >= 0'),
    ('train.warmup_ratio', 1.5, 'must be in [0, 1]'),
    ('train.checkpoint_every_steps', -100, 'must be an integer >= 0'),
    ('train.log_every_steps', 0, 'must be an integer >= 1'),
    ('train.keep_checkpoints', -1, 'must be an integer >= 0 (0 = keep all)'),
    ('train.global_batch_size', 0, 'must be an integer >= 1'),
    ('train.base_batch_size', -16, 'must be an integer >= 1'),
    ('train.images_per_epoch', 0, 'must be an integer >= 1'),
    ('train.epochs', 0, 'must be an integer >= 1'),
    ('train.weight_decay', -1e-4, 'must be a number >= 0'),
    ('train.momentum', 1.0, 'must be in [0, 1)'),
    ('train.momentum', -0.9, 'must be in [0, 1)'),
    ('train.lr_decay', 0.0, 'must be a number > 0'),
    ('train.lr_steps_epochs', [11, 8], 'must increase'),
    ('train.lr_steps_epochs', [-1, 8], 'every entry must be an integer >= 1'),
    ('train.rpn.pos_iou_thr', 1.7, 'must be in [0, 1]'),
    ('train.rcnn.num_samples', 0, 'must be an integer >= 1'),
    ('train.rcnn.pos_fraction', 0.0, 'must be in (0, 1]'),
    ('train.rpn_proposal.nms_pre', 0, 'must be an integer >= 1'),
    ('train.loss_weights.mask_iou', -0.5, 'must be a number >= 0'),
    ('test.rcnn.score_thr', -0.05, 'must be in [0, 1)'),
    ('test.rcnn.iou_threshold', 0.0, 'must be in (0, 1]'),
    ('test.rpn.max_per_img', 0, 'must be an integer >= 1'),
    ('test.batch_size', 0, 'must be an integer >= 1'),
    ('test.postprocess_workers', -2, 'must be an integer >= -1'),
    ('data.img_scale', (0, 0), 'every entry must be a number > 0'),
    ('data.img_scale', (1333,), 'must be a list of 2 numbers'),
    ('data.max_instances', 0, 'must be an integer >= 1'),
    ('data.buckets', ((800, 1333),),
     "(800, 1333) is not a multiple of 32 (the backbone's stride); e.g. "
     '(800, 1344)'),
    ('data.buckets', ((0, 64),), 'is not a (height, width) pair of positive'),
    ('data.buckets', (), 'must list one or more'),
    ('data.size_divisor', 0, 'must be an integer >= 1'),
    ('data.flip_ratio', 2.0, 'must be in [0, 1]'),
    ('data.std', (1.0, 0.0, 1.0), 'every entry must be a number > 0'),
    ('data.mean', (1.0, 2.0), 'must be a list of 3 numbers'),
    ('data.gt_mask_crop_size', 0, 'must be an integer >= 1'),
    ('data.num_workers', -1, 'must be an integer >= 0'),
    ('data.min_size', -1, 'must be an integer >= 0'),
    ('data.eval_num_buckets', -1, 'must be an integer >= 0'),
    ('data.synthetic.num_train', 0, 'must be an integer >= 1'),
    ('data.synthetic.image_size', (128, -128),
     'every entry must be an integer >= 1'),
    ('model.backbone.frozen_stages', 5, 'must be an integer in [-1, 4]'),
    ('model.backbone.bn_eps', 0.0, 'must be a number > 0'),
    ('model.neck.out_channels', 0, 'must be an integer >= 1'),
    ('model.rpn_head.anchor_ratios', [0.5, -1.0], 'every entry must be a '
     'number > 0'),
    ('model.rpn_head.target_stds', [1.0, 1.0, 1.0], 'must be a list of 4'),
    ('model.roi_head.finest_scale', -56, 'must be a number > 0'),
    ('model.roi_head.roi_align_max_samples', 0, 'must be an integer >= 1'),
    ('num_vis_images', -1, 'must be an integer >= 0'),
    ('seed', -1, 'must be an integer >= 0'),
    ('data.synthetic.seed', -3, 'must be an integer >= 0'),
]


@pytest.mark.parametrize('key,value,needle', _BAD_VALUES,
                         ids=[f'{k}={v}' for k, v, _ in _BAD_VALUES])
def test_config_value_out_of_range_is_refused(key, value, needle):
  c = config_lib.ms_rcnn_config()
  _set(c, key, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(c)
  message = str(info.value)
  assert message.startswith(f'{key}='), message
  assert needle in message, message
  assert '\n' not in message


def test_every_shipped_config_validates():
  folder = os.path.join(_ROOT, 'configs')
  names = sorted(f for f in os.listdir(folder) if f.endswith('.py'))
  assert len(names) >= 8
  for name in names:
    spec = importlib.util.spec_from_file_location(name[:-3],
                                                  os.path.join(folder, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_lib.validate(module.get_config())
  config_lib.validate(small_config())
  # Meaningful non-default values stay accepted.
  c = config_lib.ms_rcnn_config()
  c.train.update(eval_every_steps=-1, keep_checkpoints=0, warmup_steps=0,
                 checkpoint_every_steps=0, grad_clip_norm=0.0, momentum=0.0)
  c.data.update(buckets=((64, 64),), size_divisor=1)
  c.test.postprocess_workers = -1
  c.model.backbone.frozen_stages = -1
  config_lib.validate(c)
  # Buckets chosen from the data are padded sizes: /32 needs size_divisor /32.
  c.data.eval_num_buckets = 3
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "data.size_divisor=1 must be a multiple of 32 (the backbone's stride) "
      'with data.eval_num_buckets=3')):
    config_lib.validate(c)


# ------------------------------------------------------------------ workdir
def test_workdir_not_creatable_or_read_only(tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(
      f'cannot create the workdir {blocker}/run')):
    workdir_lib.prepare(str(blocker / 'run'))
  assert isinstance(workdir_lib.WorkdirError('x'), errors.UserError)
  # Read-only: root ignores permission bits, so the filesystem's refusal is
  # simulated where the probe file is written.
  real_open = open

  def read_only_open(path, *args, **kwargs):
    if '.write-probe-' in str(path):
      raise OSError(errno.EROFS, 'Read-only file system', str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(workdir_lib, 'open', read_only_open, raising=False)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=re.escape(f'the workdir {tmp_path / "ro"} is not '
                                     'writable (read-only filesystem)')):
    workdir_lib.prepare(str(tmp_path / 'ro'))
  monkeypatch.undo()
  if os.geteuid() != 0:
    ro = tmp_path / 'ro_perm'
    ro.mkdir()
    ro.chmod(0o555)
    try:
      with pytest.raises(workdir_lib.WorkdirError, match='not writable'):
        workdir_lib.prepare(str(ro))
    finally:
      ro.chmod(0o755)
  assert workdir_lib.prepare(str(tmp_path / 'ok')) == str(tmp_path / 'ok')
  assert os.listdir(tmp_path / 'ok') == []      # the probe is removed


def test_train_py_on_a_held_workdir_and_release_on_error(tmp_path):
  workdir = workdir_lib.prepare(str(tmp_path / 'run'))
  with workdir_lib.WorkdirLock(workdir):
    proc = subprocess.run(
        [sys.executable, 'train.py', f'--workdir={workdir}'], cwd=_ROOT,
        env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = _last_line(proc.stderr)
    assert last.startswith(f'error: the workdir {workdir} is in use by '
                           'another training run'), proc.stderr[-2000:]
    assert f'pid {os.getpid()} on host {socket.gethostname()}' in last
    assert 'Traceback' not in proc.stderr
  # Released: the file stays (emptied) and nothing else was written.
  assert open(os.path.join(workdir, '.lock')).read() == ''
  assert os.listdir(workdir) == ['.lock']
  # A run that takes the lock and then stops on an error releases it.
  proc = subprocess.run(
      [sys.executable, 'train.py', f'--workdir={workdir}',
       '--config.train.base_lr=-0.003'], cwd=_ROOT, env=_env(),
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert _last_line(proc.stderr) == (
      'error: train.base_lr=-0.003: must be a number > 0'), proc.stderr[-2000:]
  assert open(os.path.join(workdir, '.lock')).read() == ''


def test_dead_holder_is_taken_over_and_lock_nests(tmp_path, caplog):
  workdir = workdir_lib.prepare(str(tmp_path))
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead_pid = int(gone.stdout)
  with open(os.path.join(workdir, '.lock'), 'w') as f:
    json.dump({'pid': dead_pid, 'host': socket.gethostname(),
               'started': 0.0}, f)
  lock = workdir_lib.WorkdirLock(workdir)
  with caplog.at_level('WARNING'):
    lock.acquire()
  assert f'Taking over the lock of pid {dead_pid} on host ' in caplog.text
  assert 'the process is gone' in caplog.text
  held = json.load(open(os.path.join(workdir, '.lock')))
  assert held['pid'] == os.getpid()
  with workdir_lib.WorkdirLock(workdir):        # re-entrant in-process
    pass
  assert json.load(open(os.path.join(workdir, '.lock')))['pid'] == os.getpid()
  lock.release()
  assert open(os.path.join(workdir, '.lock')).read() == ''


def test_no_flock_on_the_filesystem_runs_unlocked(tmp_path, monkeypatch,
                                                 caplog):
  import fcntl  # pylint: disable=g-import-not-at-top
  real_flock = fcntl.flock

  def no_locks(fd, operation):
    if operation & fcntl.LOCK_EX:
      raise OSError(errno.ENOLCK, 'No locks available')
    return real_flock(fd, operation)

  monkeypatch.setattr(workdir_lib.fcntl, 'flock', no_locks)
  with caplog.at_level('WARNING'):
    with workdir_lib.WorkdirLock(str(tmp_path)):
      assert 'running without the workdir lock' in caplog.text
  assert workdir_lib._HELD == {}  # pylint: disable=protected-access


# -------------------------------------------------------------- checkpoints
def _damage_missing_data(step_dir):
  data = os.path.join(step_dir, 'state', 'd')
  for name in os.listdir(data):
    os.remove(os.path.join(data, name))
  return 'data file checkpoints/3/state/d/', 'is missing'


def _damage_truncated_data(step_dir):
  data = os.path.join(step_dir, 'state', 'd')
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), 100)
  return 'data file checkpoints/3/state/d/', 'is truncated (100 bytes'


def _damage_no_tree_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  return 'checkpoints/3/state/_METADATA is missing', ''


def _damage_bad_json(step_dir):
  with open(os.path.join(step_dir, 'metadata', 'metadata'), 'w') as f:
    f.write('{"data_position": 3,')
  return 'checkpoints/3/metadata/metadata is not JSON', ''


_DAMAGES = {'data_file_missing': _damage_missing_data,
            'data_file_truncated': _damage_truncated_data,
            'tree_metadata_missing': _damage_no_tree_metadata,
            'metadata_bad_json': _damage_bad_json}


@pytest.fixture(scope='module')
def three_steps(tmp_path_factory):
  """A stand-in run of 3 steps with checkpoints of steps 1, 2 and 3."""
  workdir = str(tmp_path_factory.mktemp('three') / 'run')
  trainer.train_and_evaluate(
      small_config(max_steps=3, checkpoint_every_steps=1), workdir,
      task=StandInTask(), train_iter_fn=make_iter_fn(BATCH))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '1', '2', '3']
  return workdir


def _files(top):
  return sorted(os.path.relpath(os.path.join(d, f), top)
                for d, _, files in os.walk(top) for f in files)


@pytest.mark.parametrize('kind', sorted(_DAMAGES))
def test_damaged_newest_checkpoint_falls_back(three_steps, tmp_path, kind,
                                              caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_steps, workdir)
  step3 = os.path.join(workdir, 'checkpoints', '3')
  where, what = _DAMAGES[kind](step3)
  damaged_files = _files(step3)
  with caplog.at_level('WARNING'):
    _, metrics = trainer.train_and_evaluate(
        small_config(max_steps=4, checkpoint_every_steps=1), workdir,
        task=StandInTask(), train_iter_fn=make_iter_fn(BATCH))
  assert metrics['steps'] == 4
  assert re.search(r'Checkpoint step 3 in \S+ is damaged \(' +
                   re.escape(where), caplog.text), caplog.text
  assert what in caplog.text
  assert 'Resuming from step 2; the damaged step 3 is kept as' in caplog.text
  # Nothing deleted: the damaged step is kept whole beside the new ones.
  assert _files(step3 + '.damaged') == damaged_files
  ck = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ck.all_steps()[-2:] == [3, 4]
  assert ck.metadata(3)['data_position'] == 3   # trained again from step 2
  assert ck.metadata(4)['data_position'] == 4
  ck.close()


def test_damage_of_large_arrays_data_files(tmp_path):
  # Arrays over 1 KiB are stored outside the b-tree, in
  # state/ocdbt.process_0/d/ (the stand-in's are all inline): a missing or
  # truncated one of those is found without reading the arrays, and an
  # unreferenced leftover file there is not damage.
  noise = np.random.default_rng(0).normal(size=(2, 64, 64))  # incompressible
  state = TrainState(
      step=jnp.int32(7), params={'w': jnp.asarray(noise[0], jnp.float32),
                                 'b': jnp.ones(3)},
      batch_stats={}, opt_state={'mu': jnp.asarray(noise[1], jnp.float32)},
      rng=jnp.zeros(2, jnp.uint32))
  ck = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  ck.save(state, {'data_position': 7}, wait=True)
  assert ck.damage(7) is None
  item = str(tmp_path / 'checkpoints' / '7' / 'state')
  base = ts.KvStore.open({'driver': 'file', 'path': item + '/'}).result()
  root = ts.ocdbt.dump(base).result()['versions'][-1]['root']['location']
  node = ts.ocdbt.dump(base, root).result()
  files = sorted({e['indirect_value'].split(':')[2] for e in node['entries']
                  if 'indirect_value' in e})
  assert files, node
  folder = os.path.join(item, 'ocdbt.process_0', 'd')
  leftovers = set(os.listdir(folder)) - {f.split('/')[-1] for f in files}
  for name in leftovers:      # the per-process b-tree, merged into state/d
    os.remove(os.path.join(folder, name))
  assert ck.damage(7) is None
  restored, step, _ = ck.restore_newest(state)
  assert step == 7
  np.testing.assert_array_equal(restored.params['w'], state.params['w'])
  data = os.path.join(item, 'ocdbt.process_0', files[0])
  size = os.path.getsize(data)
  os.truncate(data, size // 2)
  assert re.fullmatch(
      re.escape(f'data file checkpoints/7/state/ocdbt.process_0/{files[0]} '
                f'is truncated ({size // 2} bytes, ') + r'\d+ needed\)',
      ck.damage(7)), ck.damage(7)
  os.remove(data)
  assert ck.damage(7) == (f'data file checkpoints/7/state/ocdbt.process_0/'
                          f'{files[0]} is missing')
  ck.close()


# orbax's aborted reads of the missing file report to a closed event loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_damage_found_only_by_the_restore_restarts_the_data(
    three_steps, tmp_path, monkeypatch, caplog):
  # Damage the file checks do not see (e.g. corrupt bytes in a data file):
  # the data iterator was started at step 3's position, so after falling
  # back to step 2 it must restart at step 2's.
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_steps, workdir)
  _damage_missing_data(os.path.join(workdir, 'checkpoints', '3'))
  monkeypatch.setattr(checkpointing.Checkpointer, 'damage',
                      lambda self, step: None)
  with caplog.at_level('WARNING'):
    _, metrics = trainer.train_and_evaluate(
        small_config(max_steps=4, checkpoint_every_steps=1), workdir,
        task=StandInTask(), train_iter_fn=make_iter_fn(BATCH))
  assert metrics['steps'] == 4
  assert re.search(r'step 3 in \S+ is damaged \(cannot be read: ',
                   caplog.text), caplog.text
  ck = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ck.metadata(3)['data_position'] == 3
  assert ck.metadata(4)['data_position'] == 4
  ck.close()


def test_no_intact_checkpoint_is_one_error(three_steps, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_steps, workdir)
  for step in ('1', '2', '3'):
    os.remove(os.path.join(workdir, 'checkpoints', step, 'state',
                           '_METADATA'))
  checkpoints = os.path.join(workdir, 'checkpoints')
  before = _files(checkpoints)
  with pytest.raises(variables_lib.CheckpointError) as info:
    trainer.train_and_evaluate(
        small_config(max_steps=4), workdir, task=StandInTask(),
        train_iter_fn=make_iter_fn(BATCH))
  message = str(info.value)
  assert message.startswith('no intact checkpoint in ')
  assert 'step 3: checkpoints/3/state/_METADATA is missing' in message
  assert 'step 1: ' in message and '\n' not in message
  assert _files(checkpoints) == before     # nothing moved or deleted
  # The lock was released on the error.
  assert open(os.path.join(workdir, '.lock')).read() == ''


class _WideNeckModel(nn.Module):
  """The stand-in model with a neck of 8 features instead of 4."""

  @nn.compact
  def __call__(self, x):
    x = training_standin._Backbone(name='backbone')(x)  # pylint: disable=protected-access
    x = nn.Dense(8, name='neck', dtype=x.dtype)(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(2, name='head', dtype=x.dtype)(x)


def test_restart_with_another_width_names_the_config_key(three_steps,
                                                         tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_steps, workdir)
  task = StandInTask()
  task.model = _WideNeckModel()
  c = small_config(max_steps=4)
  c.model.neck.out_channels = 8
  with pytest.raises(checkpointing.RestoreMismatchError) as info:
    trainer.train_and_evaluate(c, workdir, task=task,
                               train_iter_fn=make_iter_fn(BATCH))
  message = str(info.value)
  assert isinstance(info.value, errors.UserError) and '\n' not in message
  assert message.startswith('checkpoint step 3 in ')
  assert ('config keys changed since the checkpoint: '
          'model.neck.out_channels: 256 in the checkpoint, 8 now') in message
  assert ' (and 2 more);' in message   # train.max_steps, ..._every_steps
  report = os.path.join(workdir, 'restore_mismatch_step3.txt')
  # The first three of 6 (head and neck params, then their SGD traces).
  assert ('6 arrays differ, e.g. params/head/kernel: (4, 2) in the '
          'checkpoint, (8, 2) now; params/neck/bias: (4,) in the checkpoint, '
          '(8,) now; all 6 in ') in message
  assert f'; all 6 in {report}.' in message
  with open(report) as f:
    lines = f.read().splitlines()
  assert 'model.neck.out_channels: 256 in the checkpoint, 8 now' in lines
  assert 'train.max_steps: 3 in the checkpoint, 4 now' in lines
  array_lines = [line for line in lines[1:] if '/' in line.split(':')[0]]
  assert len(array_lines) == 6, lines
  assert array_lines[-1] == ('opt_state/inner_states/train/inner_state/1/'
                             'trace/neck/kernel: (6, 4) in the checkpoint, '
                             '(6, 8) now')
  # Not damage: nothing was moved aside.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '1', '2', '3']


# ---------------------------------------------------- errors inside the loop
_LOOP_ERROR = '''
import sys
from msrcnn_jax import errors
from msrcnn_jax.training import trainer
from training_standin import StandInTask, make_iter_fn, small_config

def train_iter_fn(config, start_step):
  for i, batch in enumerate(make_iter_fn(8)(config, start_step), start_step):
    if i == 3:   # as a data worker's corrupt image, mid-run
      raise errors.UserError('cannot decode image 7 (simulated)')
    yield batch

def main(argv):
  trainer.train_and_evaluate(small_config(max_steps=6, log_every_steps=1),
                             sys.argv[-1], task=StandInTask(),
                             train_iter_fn=train_iter_fn)

errors.run(main)
'''


def test_user_error_inside_the_loop_is_the_last_line(tmp_path):
  script = tmp_path / 'loop_error.py'
  script.write_text(_LOOP_ERROR)
  proc = subprocess.run(
      [sys.executable, str(script), str(tmp_path / 'run')], cwd=_ROOT,
      env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  # splitlines also splits the progress bar's carriage returns.
  assert _last_line(proc.stderr) == (
      'error: cannot decode image 7 (simulated)'), proc.stderr[-2000:]
  assert 'train:' in proc.stderr and 'Traceback' not in proc.stderr
  assert open(tmp_path / 'run' / '.lock').read() == ''
