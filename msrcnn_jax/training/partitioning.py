"""Devices, mesh and shardings for data-parallel training (jit + NamedSharding).

One 1-D mesh with axis ``'data'`` spans every device of every host. The train
state is replicated (``P()``), batches are split along their leading axis
(``P('data')``). Each host feeds only its own slice of the global batch
(``process_count`` hosts x ``local_batch`` images); :func:`host_batch_to_global`
assembles the global ``jax.Array`` without moving data between hosts.

Multi-host start-up (:func:`maybe_initialize_distributed`) must run before the
first JAX computation (before ``jax.devices()``).
"""

from __future__ import annotations

import glob
import os
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msrcnn_jax.errors import ConfigError

PyTree = Any
DATA_AXIS = 'data'


def _env_int(name: str, default: int = 0) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def _on_tpu_vm() -> bool:
  """True on a Cloud TPU VM (the TPU device files exist)."""
  if os.environ.get('TPU_SKIP_MDS_QUERY') is not None:
    return False
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def distributed_environment() -> str | None:
  """Which multi-process launcher the environment shows, if any.

  Returns:
    'env' (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
    ``JAX_PROCESS_ID``), 'slurm' (``srun`` with more than one task),
    'ompi' (``mpirun`` with more than one rank), 'tpu' (a Cloud TPU VM;
    JAX finds the pod's workers itself) or None for a single process.
    ``MSRCNN_DISTRIBUTED=0`` forces None, ``=1`` forces 'auto'.
  """
  force = os.environ.get('MSRCNN_DISTRIBUTED', '').lower()
  if force in ('0', 'false', 'no'):
    return None
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'
  if 'SLURM_JOB_ID' in os.environ and 'SLURM_PROCID' in os.environ and max(
      _env_int('SLURM_STEP_NUM_TASKS'), _env_int('SLURM_NTASKS')) > 1:
    return 'slurm'
  if _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'ompi'
  if _on_tpu_vm():
    return 'tpu'
  if force in ('1', 'true', 'yes'):
    return 'auto'
  return None


def maybe_initialize_distributed(heartbeat_timeout_seconds: int = 100,
                                 initialization_timeout: int = 300) -> bool:
  """Calls ``jax.distributed.initialize`` when launched as several processes.

  A no-op for a single process (and when already initialised). With
  ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) the process count
  and id come from ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; SLURM,
  Open MPI and TPU pod slices are auto-detected by JAX. CPU collectives
  across processes go through gloo (``jax_cpu_collectives_implementation``,
  set here when it is 'none').

  Args:
    heartbeat_timeout_seconds: a process that sent no heartbeat to the
      coordinator for this long counts as dead, and then every process is
      terminated ("Terminating process because the JAX distributed service
      detected fatal errors"): a crashed host ends the run instead of
      leaving the others hanging in a collective.
    initialization_timeout: how long (s) to wait for every process to join.

  Returns:
    True if ``jax.distributed.initialize`` was called.
  """
  if jax.distributed.is_initialized():
    return False
  env = distributed_environment()
  if env is None:
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
                initialization_timeout=int(initialization_timeout))
  if env == 'env':
    kwargs['coordinator_address'] = os.environ['JAX_COORDINATOR_ADDRESS']
    if 'JAX_NUM_PROCESSES' in os.environ:
      kwargs['num_processes'] = _env_int('JAX_NUM_PROCESSES')
    if 'JAX_PROCESS_ID' in os.environ:
      kwargs['process_id'] = _env_int('JAX_PROCESS_ID')
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed initialised (%s): process %d of %d', env,
               jax.process_index(), jax.process_count())
  return True


def wait_for_all_hosts(name: str, timeout_seconds: float = 24 * 3600) -> None:
  """A barrier of all processes (no device work; a no-op for one process).

  Waits through the coordinator, so a host may spend long in host-only
  work (process 0 evaluating) while the others wait here, without the
  collective timeouts of a device barrier. Heartbeats go on meanwhile: a
  host that dies still ends the run (see :func:`maybe_initialize_distributed`).

  Args:
    name: the barrier's id, the same on every process and used once.
    timeout_seconds: an error is raised after this long.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(
      name, int(timeout_seconds * 1000))


def make_mesh(devices=None) -> Mesh:
  """A 1-D ``('data',)`` mesh over all devices of all hosts.

  Uses ``jax.make_mesh`` (topology-aware device order) and falls back to the
  plain device list where it refuses (multi-slice). Axis type is ``Auto`` so
  that jitted code needs no sharding annotations.

  Args:
    devices: optional device list (default: ``jax.devices()``).
  """
  devices = list(jax.devices() if devices is None else devices)
  auto = (jax.sharding.AxisType.Auto,)
  try:
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=auto,
                         devices=devices)
  except ValueError:
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=auto)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the full array (the train state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Checks the global batch divides over devices; returns the host batch.

  Raises:
    ConfigError: if ``global_batch_size`` is not a multiple of the device
      count (every device gets the same number of images).
  """
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise ConfigError(
        f'config.train.global_batch_size={global_batch_size} must be a '
        f'positive multiple of the number of devices ({n} = '
        f'{jax.process_count()} hosts x {jax.local_device_count()} local '
        f'devices); use e.g. {max(n, (global_batch_size // n) * n)}.')
  return global_batch_size // jax.process_count()


def host_batch_to_global(batch: PyTree, mesh: Mesh) -> PyTree:
  """Assembles host-local numpy batches into one global sharded batch.

  Args:
    batch: pytree of host-local arrays, each ``(local_batch, ...)`` with
      ``local_batch = global_batch / process_count`` (this host's images).
    mesh: the ``('data',)`` mesh.

  Returns:
    The same pytree of ``jax.Array`` with shape ``(global_batch, ...)``,
    sharded ``P('data')`` (each device holds ``global_batch / devices``
    rows; nothing crosses hosts).
  """
  sharding = batch_sharding(mesh)
  local_devices = len(mesh.local_devices)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise ValueError(
          f'host batch leaf of shape {x.shape} does not split over '
          f'{local_devices} local devices along axis 0')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def describe_devices() -> str:
  """One line: process, hosts, device counts and kinds (for the logs)."""
  d = jax.devices()
  return (f'process {jax.process_index()}/{jax.process_count()}, '
          f'{jax.device_count()} devices ({jax.local_device_count()} local), '
          f'backend {jax.default_backend()}, kind {d[0].device_kind}')
