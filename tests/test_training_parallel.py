"""Data parallelism over 8 emulated CPU devices equals one device.

Runs in a subprocess because the host device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from msrcnn_jax.training import optimizer, partitioning, train_step as ts
from training_standin import StandInTask, make_batch, small_config

assert jax.device_count() == 8, jax.devices()
task = StandInTask(bn_trainable=True)
config = small_config(warmup_steps=0, grad_clip_norm=5.0)
variables = jax.jit(task.init_variables)(jax.random.key(0), make_batch(0, 1))
mask = task.frozen_mask(variables['params'])
tx, schedule = optimizer.make_optimizer(config, mask)
host_batches = [make_batch(i, 8) for i in range(2)]

def run(mesh, dtype='float32'):
  state = ts.create_train_state(variables, tx, jax.random.key(1))
  # From host copies: the step donates its input buffers.
  state = jax.device_put(jax.tree.map(np.asarray, state),
                         partitioning.replicated_sharding(mesh))
  step = ts.make_train_step(task.loss_fn, tx, mesh, compute_dtype=dtype,
                            schedule_fn=schedule, mask=mask)
  for hb in host_batches:
    batch = partitioning.host_batch_to_global(hb, mesh)
    state, metrics = step(state, batch)
  return state, jax.device_get(metrics), batch

mesh8 = partitioning.make_mesh()
mesh1 = partitioning.make_mesh(jax.devices()[:1])
s8, m8, b8 = run(mesh8)
s1, m1, b1 = run(mesh1)
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)))
moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(s8.params),
                            jax.tree.leaves(variables['params'])))
img = b8['image']
try:
  partitioning.check_batch_size(12, mesh8)
  bad_batch = None
except ValueError as e:
  bad_batch = str(e)
sb, mb, _ = run(mesh8, 'bfloat16')
print('RESULT' + json.dumps(dict(
    diff=diff, moved=moved,
    loss8=float(m8['loss']), loss1=float(m1['loss']),
    gnorm8=float(m8['grad_norm']), gnorm1=float(m1['grad_norm']),
    n_devices=len(img.sharding.device_set),
    shard_shapes=[list(s.data.shape) for s in img.addressable_shards],
    spec=[str(a) for a in img.sharding.spec],
    state_devices=len(jax.tree.leaves(s8.params)[0].sharding.device_set),
    rng_equal=bool(np.array_equal(np.asarray(s8.rng), np.asarray(s1.rng))),
    bad_batch=bad_batch,
    bf16_param_dtype=str(jax.tree.leaves(sb.params)[0].dtype),
    bf16_finite=bool(mb['finite']), bf16_loss=float(mb['loss']))))
'''


def test_eight_devices_equal_one():
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = here + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, '-c', _SCRIPT], env=env, cwd=here,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  r = json.loads(line[len('RESULT'):])
  assert r['n_devices'] == 8
  assert r['shard_shapes'] == [[1, 8, 8, 3]] * 8
  assert r['spec'] == ['data']
  assert r['state_devices'] == 8
  assert r['moved'] > 1e-4                 # the two steps changed the params
  assert r['diff'] < 1e-5, r
  assert r['loss8'] == pytest.approx(r['loss1'], rel=1e-5)
  assert r['gnorm8'] == pytest.approx(r['gnorm1'], rel=1e-5)
  assert r['rng_equal']
  assert 'multiple of the number of devices (8' in r['bad_batch']
  assert r['bf16_param_dtype'] == 'float32'
  assert r['bf16_finite']
  assert r['bf16_loss'] == pytest.approx(r['loss8'], rel=0.1)
