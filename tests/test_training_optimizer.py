"""SGD, lr schedule and freezing against mmcv's formulas and torch.optim.SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msrcnn_jax.config import ms_rcnn_config
from msrcnn_jax.training import optimizer
from training_standin import StandInTask, make_batch, small_config


def _lr(config, step):
  return float(optimizer.make_schedule(config)(step))


def test_schedule_matches_mmcv_r50_1x():
  c = ms_rcnn_config()   # lr 0.02 for 16 images, warm-up 500 from 0.001.
  # mmcv linear warm-up: regular * (1 - (1 - it/500) * (1 - 0.001)).
  np.testing.assert_allclose(_lr(c, 0), 0.02 * 0.001, rtol=1e-5)
  np.testing.assert_allclose(_lr(c, 250), 0.02 * (1 - 0.5 * 0.999), rtol=1e-6)
  np.testing.assert_allclose(_lr(c, 499), 0.02 * (1 - 0.002 * 0.999),
                             rtol=1e-6)
  np.testing.assert_allclose(_lr(c, 500), 0.02, rtol=1e-7)
  # ceil(117266 / 16) = 7330 steps per epoch; decays at epochs 8 and 11.
  assert optimizer.steps_per_epoch(c) == 7330
  assert optimizer.decay_boundaries(c) == [58640, 80630]
  assert optimizer.total_steps(c) == 12 * 7330
  np.testing.assert_allclose(_lr(c, 58639), 0.02, rtol=1e-7)
  np.testing.assert_allclose(_lr(c, 58640), 0.002, rtol=1e-6)
  np.testing.assert_allclose(_lr(c, 80629), 0.002, rtol=1e-6)
  np.testing.assert_allclose(_lr(c, 80630), 0.0002, rtol=1e-6)
  np.testing.assert_allclose(_lr(c, 87959), 0.0002, rtol=1e-6)


def test_schedule_linear_scaling_and_2x():
  c = ms_rcnn_config(schedule='2x')
  c.train.global_batch_size = 32      # lr 0.04; ceil(117266/32) = 3665.
  assert optimizer.decay_boundaries(c) == [16 * 3665, 22 * 3665]
  np.testing.assert_allclose(_lr(c, 0), 0.04 * 0.001, rtol=1e-5)
  np.testing.assert_allclose(_lr(c, 600), 0.04, rtol=1e-7)
  np.testing.assert_allclose(_lr(c, 16 * 3665), 0.004, rtol=1e-6)
  np.testing.assert_allclose(_lr(c, 22 * 3665), 0.0004, rtol=1e-6)
  c.train.max_steps = 7
  assert optimizer.total_steps(c) == 7


@pytest.mark.parametrize('clip', [0.0, 0.5])
def test_sgd_matches_torch(clip):
  torch = pytest.importorskip('torch')
  c = small_config(grad_clip_norm=clip)   # lr 0.01 * warm-up over 4 steps
  rs = np.random.default_rng(0)
  params = {'w': rs.normal(size=(3, 2)).astype(np.float32),
            'b': rs.normal(size=(2,)).astype(np.float32)}
  grads = [{k: rs.normal(size=v.shape).astype(np.float32)
            for k, v in params.items()} for _ in range(3)]

  tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in
             params.items()}
  opt = torch.optim.SGD(list(tparams.values()), lr=0.01, momentum=0.9,
                        weight_decay=1e-4)
  for i, g in enumerate(grads):
    for k, p in tparams.items():
      p.grad = torch.tensor(g[k])
    if clip:
      torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
    # mmcv sets the group lr before every iteration.
    opt.param_groups[0]['lr'] = _lr(c, i)
    opt.step()

  tx, _ = optimizer.make_optimizer(c)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, upd)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]),
                               tparams[k].detach().numpy(), rtol=1e-6,
                               atol=1e-7)


def _paths(mask, value):
  out = []
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if m == value:
      out.append('/'.join(str(e.key) for e in path))
  return sorted(out)


def test_masks_caffe_and_pytorch():
  task = StandInTask()
  # Masks depend on the parameter paths only.
  v = jax.eval_shape(task.init_variables, jax.random.key(0), make_batch(0, 1))
  caffe = optimizer.trainable_mask(v['params'], 1, bn_trainable=False)
  assert _paths(caffe, True) == [
      'backbone/layer2_0/conv1/kernel', 'backbone/layer2_0/downsample_0/kernel',
      'head/bias', 'head/kernel', 'neck/bias', 'neck/kernel']
  pyt = optimizer.trainable_mask(v['params'], 1, bn_trainable=True)
  assert _paths(pyt, False) == [
      'backbone/bn1/bias', 'backbone/bn1/scale', 'backbone/conv1/kernel',
      'backbone/layer1_0/bn1/bias', 'backbone/layer1_0/bn1/scale',
      'backbone/layer1_0/conv1/kernel']
  none = optimizer.trainable_mask(v['params'], -1, bn_trainable=True)
  assert _paths(none, False) == []
  stem = optimizer.trainable_mask(v['params'], 0, bn_trainable=True)
  assert _paths(stem, False) == ['backbone/bn1/bias', 'backbone/bn1/scale',
                                 'backbone/conv1/kernel']
  from_cfg = optimizer.trainable_mask_from_config(v['params'], small_config())
  assert from_cfg == caffe


def test_frozen_params_do_not_move():
  task = StandInTask(bn_trainable=True)
  batch = make_batch(0, 2)
  v = jax.jit(task.init_variables)(jax.random.key(0), batch)
  mask = task.frozen_mask(v['params'])
  c = small_config(warmup_steps=0, grad_clip_norm=1.0)
  tx, _ = optimizer.make_optimizer(c, mask)

  @jax.jit
  def step(params):
    grads = jax.grad(lambda p: task.loss_fn(p, v['batch_stats'], batch,
                                            jax.random.key(1),
                                            jnp.float32)[0])(params)
    upd, _ = tx.update(grads, tx.init(params), params)
    return (optax.apply_updates(params, upd),
            optimizer.masked_global_norm(grads, mask),
            optax.global_norm(grads))

  new, n, full = step(v['params'])
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, v['params'])
  assert moved == mask
  # The reported norm only counts trainable gradients.
  assert 0 < float(n) < float(full)
