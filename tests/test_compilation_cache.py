"""The persistent compilation cache the command lines turn on.

A second process compiling the same program must load it from the cache
directory (JAX's own ``cache_hits`` event), and the cache can be switched off.
Cost: two short subprocesses, about 8 s.
"""

import os
import subprocess
import sys

from msrcnn_jax import compilation_cache

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROGRAM = r'''
import jax, jax.numpy as jnp
from msrcnn_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name)
    if name == '/jax/compilation_cache/cache_hits' else None)
print('dir', compilation_cache.enable())
f = jax.jit(lambda x: jnp.sin(x) @ x.T + jnp.cumsum(x, 0))
f(jnp.ones((64, 64))).block_until_ready()
print('hits', len(hits))
'''


def _run(env_extra):
  env = dict(os.environ, PYTHONPATH=_ROOT,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **env_extra)
  out = subprocess.run([sys.executable, '-c', _PROGRAM], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  lines = dict(l.split(' ', 1) for l in out.stdout.splitlines()
               if l.startswith(('dir ', 'hits ')))
  return lines['dir'], int(lines['hits'])


def test_second_process_loads_from_cache(tmp_path):
  cache = str(tmp_path / 'cache')
  d1, hits1 = _run({'MSRCNN_COMPILATION_CACHE': cache})
  assert d1 == cache and hits1 == 0
  assert os.listdir(cache), 'no cache entry written'
  d2, hits2 = _run({'MSRCNN_COMPILATION_CACHE': cache})
  assert d2 == cache and hits2 >= 1


def test_off_and_default_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('MSRCNN_COMPILATION_CACHE', 'off')
  assert compilation_cache.default_cache_dir() is None
  assert compilation_cache.enable() is None
  monkeypatch.delenv('MSRCNN_COMPILATION_CACHE')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compilation_cache.default_cache_dir() == os.path.join(
      str(tmp_path), 'msrcnn_jax', 'jax')
