"""Resume-exactness, keep-last-N, NaN stop and crash-safe checkpoint saves."""

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from msrcnn_jax import errors
from msrcnn_jax import variables as variables_lib
from msrcnn_jax.training import checkpointing
from msrcnn_jax.training import optimizer
from msrcnn_jax.training import train_step as train_step_lib
from msrcnn_jax.training import trainer
from training_standin import StandInTask, make_batch, make_iter_fn, small_config

BATCH = 8


def _run(workdir, max_steps, poison_steps=(), **overrides):
  c = small_config(max_steps=max_steps, **overrides)
  return trainer.train_and_evaluate(
      c, str(workdir), task=StandInTask(),
      train_iter_fn=make_iter_fn(BATCH, poison_steps))


def _assert_same(a, b):
  la, ta = jax.tree.flatten(a.to_dict())
  lb, tb = jax.tree.flatten(b.to_dict())
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _sigterm_iter_fn(at_step):
  """The stand-in iterator; sends SIGTERM to itself when batch ``at_step``
  is taken (a preemption)."""
  base = make_iter_fn(BATCH)

  def train_iter_fn(config, start_step):
    for i, batch in enumerate(base(config, start_step), start_step):
      if i == at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  return train_iter_fn


def test_resume_is_exact(tmp_path):
  # 6 steps straight vs a run preempted (SIGTERM) during step 3, then a new
  # trainer (new manager, restore) that finishes. 4 steps per epoch, warm-up
  # 4, decay at epoch 2: the lr changes throughout.
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('SIGTERM handlers need the main thread')
  full, metrics = _run(tmp_path / 'full', 6)
  assert metrics['steps'] == 6 and np.isfinite(metrics['train']['loss'])
  previous = signal.getsignal(signal.SIGTERM)
  c = small_config(max_steps=6)
  part, pm = trainer.train_and_evaluate(
      c, str(tmp_path / 'split'), task=StandInTask(),
      train_iter_fn=_sigterm_iter_fn(3))
  assert signal.getsignal(signal.SIGTERM) == previous    # handler restored
  assert pm['preempted'] and pm['steps'] == 4 and int(part.step) == 4
  ck = checkpointing.Checkpointer(str(tmp_path / 'split' / 'checkpoints'))
  assert ck.all_steps() == [4]
  assert ck.metadata(4)['data_position'] == 4
  assert ck.metadata(4)['config_name'] == 'standin'
  ck.close()
  resumed, rm = _run(tmp_path / 'split', 6)
  assert int(resumed.step) == 6 and 'preempted' not in rm
  _assert_same(full, resumed)
  # The run actually moved and used the RNG.
  assert not np.array_equal(np.asarray(full.rng), np.asarray(part.rng))
  # TensorBoard event files were written.
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(tmp_path / 'full'))


def test_nan_loss_stops_before_checkpoint_and_keep_last_n(tmp_path):
  # Checkpoint every step, keep 2; step 5 (0-based update index) is NaN.
  with pytest.raises(FloatingPointError, match=r'step 5: loss='):
    _run(tmp_path, 8, poison_steps=(5,), checkpoint_every_steps=1,
         keep_checkpoints=2)
  ck = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), keep=2)
  assert ck.all_steps() == [4, 5]   # states after 4 and 5 good updates
  restored, step = ck.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state()))
  assert step == 5 and int(restored.step) == 5
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))
  assert ck.metadata(5)['data_position'] == 5
  ck.close()
  with pytest.raises(FloatingPointError, match='loss_aux=nan') as info:
    train_step_lib.check_finite({'loss': np.float32(np.nan),
                                 'loss_aux': np.float32(np.nan),
                                 'loss_reg': np.float32(1.0),
                                 'finite': np.bool_(False)}, 5)
  # train.py reports it as one `error:` line naming the settings to change.
  assert isinstance(info.value, errors.UserError)
  assert 'loss_reg' not in str(info.value)
  assert 'train.learning_rate' in str(info.value)
  assert '\n' not in str(info.value)


def _state():
  task = StandInTask()
  v = jax.jit(task.init_variables)(jax.random.key(0), make_batch(0, 1))
  tx, _ = optimizer.make_optimizer(small_config(),
                                   task.frozen_mask(v['params']))
  return train_step_lib.create_train_state(v, tx, jax.random.key(1))


def test_refuses_non_finite_state(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path))
  state = _state()
  bad = state.replace(params=jax.tree.map(lambda x: x * jnp.inf,
                                          state.params))
  with pytest.raises(FloatingPointError, match='Refusing'):
    ck.save(bad)
  ck.close()
  assert os.listdir(tmp_path) == [] or ck.all_steps() == []


# orbax's background writer of the aborted save reports to a closed loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
  state = _state()
  ck = checkpointing.Checkpointer(str(tmp_path))
  ck.save(state, {'data_position': 0}, wait=True)
  later = state.replace(step=jnp.int32(1),
                        params=jax.tree.map(lambda x: x + 1, state.params))

  async def crash(self, *args, **kwargs):
    raise RuntimeError('simulated crash while writing')

  # The state item is being written when the metadata item fails.
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, 'async_save',
                      crash)
  with pytest.raises(RuntimeError, match='simulated crash'):
    ck.save(later, {'data_position': 1})
    ck.wait_until_finished()
  monkeypatch.undo()
  try:
    ck.close()
  except RuntimeError:
    pass
  # A restarted process sees only the complete checkpoint, intact.
  fresh = checkpointing.Checkpointer(str(tmp_path))
  assert fresh.all_steps() == [0]
  restored, step = fresh.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  assert step == 0
  _assert_same(state, restored)
  assert fresh.metadata(0)['data_position'] == 0
  fresh.close()


def test_init_checkpoint_backbone_only(tmp_path):
  from msrcnn_jax.training import partitioning
  task = StandInTask()
  init = jax.jit(task.init_variables)
  ours = jax.device_get(init(jax.random.key(0), make_batch(0, 1)))
  other = jax.device_get(init(jax.random.key(7), make_batch(0, 1)))
  backbone = {'params': {'backbone': other['params']['backbone']},
              'batch_stats': {'backbone': other['batch_stats']['backbone']}}
  variables_lib.save_variables(str(tmp_path / 'bb'), backbone,
                               {'config_name': 'standin', 'source': 'test'})
  mesh = partitioning.make_mesh()
  merged, report = trainer.load_init_checkpoint(
      str(tmp_path / 'bb'), ours, partitioning.replicated_sharding(mesh))
  np.testing.assert_array_equal(
      merged['params']['backbone']['layer2_0']['conv1']['kernel'],
      other['params']['backbone']['layer2_0']['conv1']['kernel'])
  np.testing.assert_array_equal(merged['params']['head']['kernel'],
                                ours['params']['head']['kernel'])
  assert report['num_missing'] == 4      # neck and head kernel/bias
  assert 'params/head/kernel' in report['missing']
  bad_shape = jax.tree.map(lambda x: x, backbone)
  bad_shape['params']['backbone']['conv1']['kernel'] = np.zeros((5, 4))
  with pytest.raises(variables_lib.VariablesMismatchError,
                     match=r'shape: params/backbone/conv1/kernel has \(5, 4\)'):
    variables_lib.merge_variables(ours, bad_shape)
  extra = {'params': {'backbone': {'fc': {'kernel': np.zeros((2, 2))}}}}
  with pytest.raises(variables_lib.VariablesMismatchError,
                     match='unexpected: params/backbone/fc/kernel'):
    variables_lib.merge_variables(ours, extra)
