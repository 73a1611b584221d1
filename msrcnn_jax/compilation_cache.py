"""JAX's persistent compilation cache, on by default for the command lines.

A full-size detector program takes tens of seconds (GPU, CPU) to minutes
(TPU) to compile; with the cache a rerun of ``train.py`` (resume), ``predict``
or ``evaluate`` with the same config, batch and bucket loads the compiled
executable from disk instead. Entries are keyed by the program, the compiler
flags and the device kind, so one directory serves every backend.

Where: ``$MSRCNN_COMPILATION_CACHE`` if set (``0``/``off``/``none``: no
cache), else JAX's own ``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``
if already set, else ``$XDG_CACHE_HOME/msrcnn_jax/jax`` (default
``~/.cache/msrcnn_jax/jax``).
"""

from __future__ import annotations

import os

from absl import logging
import jax

_OFF = ('0', 'off', 'none', 'false', 'no')


def default_cache_dir() -> str | None:
  """The directory :func:`enable` uses, or None when the cache is off."""
  env = os.environ.get('MSRCNN_COMPILATION_CACHE')
  if env is not None:
    return None if env.strip().lower() in _OFF else env
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'msrcnn_jax', 'jax')


def enable(cache_dir: str | None = None) -> str | None:
  """Turns the persistent compilation cache on; returns its directory.

  Call once, before the first compilation. Programs that compile in under
  a second are not stored (JAX's default threshold). A directory that cannot
  be created leaves the cache off with a warning (never an error: the cache
  only saves time).

  Args:
    cache_dir: directory (default :func:`default_cache_dir`).
  """
  cache_dir = cache_dir or default_cache_dir()
  if not cache_dir:
    return None
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:
    logging.warning('Compilation cache off: cannot create %s (%s)',
                    cache_dir, e)
    return None
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  logging.info('Persistent compilation cache: %s', cache_dir)
  return cache_dir
