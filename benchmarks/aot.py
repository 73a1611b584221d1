r"""Ahead-of-time compilation of inference and the train step, no device needed.

  # The GPU target (H200 numbers) needs XLA's CUDA compiler: in a separate
  # virtualenv, pip install -e '.[accel]'; or PYTHONPATH=$PWD:build/accel
  # after .ci/run's build/accel line. TPU topologies need '.[tpu-aot]'.
  JAX_PLATFORMS=cpu python benchmarks/aot.py --target=gpu --chips=4 \
      --configs=configs/ms_rcnn_r50_caffe_fpn_1x_coco.py --batch=2 --dtypes=bfloat16
  JAX_PLATFORMS=cpu python benchmarks/aot.py --target=tpu --topology=v5e:2x2 \
      --configs=configs/ms_rcnn_r50_caffe_fpn_1x_coco.py --batch=2 --programs=inference
  python benchmarks/aot.py --target=local ...          # the backend this process has

Inputs are abstract (``jax.ShapeDtypeStruct``): the parameters come from
``jax.eval_shape`` of the initialiser, the batch is ``--batch`` images per
chip of the config's first bucket (800x1344), sharded over the chips as
``train.py`` shards it. No weights are created and nothing runs.

Per (config, per-chip batch, compute dtype, program) it prints the lower and
compile times, the per-chip memory of the compiled program
(``memory_analysis()``: arguments, outputs, temporaries, generated code, total
against the chip's HBM), XLA's FLOPs and bytes per image where the backend
reports a cost analysis (TPU, CPU; the GPU compiler returns none), and, with
``--stages``, the same for each stage compiled on its own:

  inference: backbone+FPN | RPN+proposals | RoI box stage (RoIAlign 7x7, box
    head, multiclass NMS) | mask+MaskIoU (RoIAlign 14x14, mask head, MaskIoU)
  train: the four forward stages at training shapes (proposals with
    nms_pre 2000, 512 sampled RoIs, 128 positive mask RoIs), then derived:
    targets+losses = loss forward - the forward stages, backward = value and
    grad - loss forward, optimizer = full step - value and grad.
  Derived rows are differences of FLOPs, bytes and compile time, and of
    per-chip memory for backward and optimizer (what value-and-grad adds to
    the loss forward, what the full step adds to value-and-grad).

``--audit`` prints the sequential-work audit of each compiled program: every
``while`` loop (``lax.while_loop``/``fori_loop``/``scan``/``map``) with its
trip count (XLA's ``known_trip_count`` where static, else "dynamic"), the
source line that made it, nesting and what its body holds (fusions, gathers,
scatters, dots, convolutions, sorts); and all gathers/scatters with the
number of elements they move. XLA's cost analysis counts a loop body once,
whatever its trip count: read FLOPs of programs with loops with that in mind.

``--json PATH`` also writes every figure. Run TPU compiles one at a time (one
libtpu process per machine); they take minutes each on a small CPU.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import time
from typing import Any, Callable

if not any(a.startswith('--target=local') for a in sys.argv):
  # The default backend stays the CPU; accelerators are compile targets only.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

_TARGET = flags.DEFINE_enum('target', 'gpu', ['gpu', 'tpu', 'local'],
                            'Compile target.')
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:2x2',
                                'TPU topology name (--target=tpu).')
_CHIPS = flags.DEFINE_integer('chips', 4, 'GPUs in the target (--target=gpu).')
_CONFIGS = flags.DEFINE_list(
    'configs', ['configs/ms_rcnn_r50_caffe_fpn_1x_coco.py'], 'Config files.')
_BATCH = flags.DEFINE_list('batch', ['2'], 'Per-chip batch sizes.')
_DTYPES = flags.DEFINE_list('dtypes', ['bfloat16'], 'Compute dtypes.')
_PROGRAMS = flags.DEFINE_list('programs', ['inference', 'train'],
                              'Programs to compile: inference, train.')
_STAGES = flags.DEFINE_bool('stages', False, 'Per-stage breakdown.')
_AUDIT = flags.DEFINE_bool('audit', False, 'Loop and gather/scatter audit.')
_BUCKET = flags.DEFINE_list('bucket', [], 'Image (h, w); default: the '
                            "config's first bucket.")
_JSON = flags.DEFINE_string('json', '', 'Write all figures to this file.')

GiB = 2 ** 30

# The H200 (SXM) as XLA's GPU compiler sees it: the H100's GpuTargetConfig
# (openxla/xla PR #25919) with the H200's HBM3e size and bandwidth.
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 7
}
runtime_version {
  major: 12
  minor: 8
  patch: 0
}
device_description_str: "NVIDIA H200"
"""
H200_HBM_BYTES = 150754820096  # 143771 MiB, as nvidia-smi reports it

# HBM per chip of the TPU generations (topology name prefix).
TPU_HBM_GIB = {'v2': 8, 'v3': 16, 'v4': 32, 'v5e': 16, 'v5litepod': 16,
               'v5p': 95, 'v6e': 32}


# ------------------------------------------------------------------ targets
def target_devices(target: str, topology: str = 'v5e:2x2', chips: int = 4
                   ) -> tuple[list, str, float | None]:
  """``(devices, description, HBM bytes per chip or None)`` of a target.

  ``gpu``: ``chips`` abstract H200s (needs jax-cuda12-plugin/-pjrt at the
  installed JAX version); ``tpu``: the named topology (needs libtpu);
  ``local``: ``jax.devices()``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target == 'local':
    devs = jax.devices()
    stats = devs[0].memory_stats() if hasattr(devs[0], 'memory_stats') else None
    hbm = (stats or {}).get('bytes_limit')
    return devs, f'local {jax.default_backend()} ({devs[0].device_kind})', hbm
  if target == 'gpu':
    topo = topologies.get_topology_desc(
        platform='cuda', topology_name='', topology=f'1x1x{chips}',
        target_config=H200_TARGET_CONFIG)
    return list(topo.devices), f'{chips}x NVIDIA H200 (deviceless)', float(
        H200_HBM_BYTES)
  topo = topologies.get_topology_desc(topology_name=topology, platform='tpu')
  gen = topology.split(':')[0].lower()
  hbm = TPU_HBM_GIB.get(gen)
  return (list(topo.devices), f'TPU {topology} ({len(topo.devices)} chips, '
          f'{topo.devices[0].device_kind}, deviceless)',
          hbm * GiB if hbm else None)


@contextlib.contextmanager
def accelerator_defaults(target: str):
  """Within: programs are traced with the target's backend defaults.

  RoIAlign's chunk default and the packing of ResNeXt's narrow conv groups
  (``ops.grouped_conv``) follow ``jax.default_backend()``, which is the CPU
  in this process; for an accelerator target they must be the
  accelerator's (chunks of 512; packing on a TPU). Restored, with RoIAlign's trace cache cleared, on
  exit, so CPU programs traced later in the same process are unaffected.
  """
  from msrcnn_jax.ops import grouped_conv  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.ops import roi_align  # pylint: disable=g-import-not-at-top
  saved = roi_align._default_chunk  # pylint: disable=protected-access
  saved_packing = grouped_conv.packing_enabled
  if target != 'local':
    roi_align._default_chunk = lambda: 512  # pylint: disable=protected-access
  if target == 'tpu':   # ResNeXt's narrow groups packed into 128 lanes
    grouped_conv.packing_enabled = lambda: True
  roi_align._multilevel_jit.clear_cache()  # pylint: disable=protected-access
  try:
    yield
  finally:
    roi_align._default_chunk = saved  # pylint: disable=protected-access
    grouped_conv.packing_enabled = saved_packing
    roi_align._multilevel_jit.clear_cache()  # pylint: disable=protected-access


# ------------------------------------------------------- abstract programs
def _sds(shape, dtype, sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


class Programs:
  """Jitted programs of one config on a mesh, with abstract arguments.

  Args:
    config: the full config.
    mesh: 1-D ``('data',)`` mesh over the target's devices.
    per_chip: images per chip; the global batch is ``per_chip x chips``.
    dtype: compute dtype name.
    hw: padded image (h, w).
  """

  def __init__(self, config, mesh, per_chip: int, dtype: str, hw):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.modeling.detector import MaskScoringRCNN, init_variables  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.training import partitioning  # pylint: disable=g-import-not-at-top
    self.jax, self.jnp = jax, jnp
    config = ml_collections.ConfigDict(config.to_dict())
    self.b = per_chip * mesh.devices.size
    config.train.global_batch_size = self.b
    config.train.compute_dtype = dtype
    self.config = config
    self.mesh = mesh
    self.dtype = jnp.dtype(dtype)
    self.model = MaskScoringRCNN(config, dtype=self.dtype)
    self.rep = partitioning.replicated_sharding(mesh)
    self.data = partitioning.batch_sharding(mesh)
    self.h, self.w = hw
    variables = jax.eval_shape(lambda: init_variables(config,
                                                      jax.random.key(0)))
    self.variables = jax.tree.map(
        lambda s: _sds(s.shape, s.dtype, self.rep), variables)
    b, h, w = self.b, self.h, self.w
    self.images = _sds((b, h, w, 3), jnp.float32, self.data)
    self.hw2 = _sds((b, 2), jnp.int32, self.data)
    self.scale = _sds((b, 4), jnp.float32, self.data)

  def _jit(self, fn, *args):
    return self.jax.jit(fn), args

  # Inference and its stages.
  def inference(self):
    model = self.model

    def forward(v, images, img_shape, pad_shape, scale):
      return model.apply(v, images, img_shape, pad_shape, scale)
    return self._jit(forward, self.variables, self.images, self.hw2, self.hw2,
                     self.scale)

  def _abstract(self, fn, *args):
    """Output of ``fn`` as ShapeDtypeStructs sharded over the batch."""
    out = self.jax.eval_shape(fn, *args)
    return self.jax.tree.map(lambda s: _sds(s.shape, s.dtype, self.data), out)

  def _front_stages(self, rpn_cfg):
    """``(features, proposals)`` stage functions: backbone+FPN, and the RPN
    stage's head + proposals with ``rpn_cfg``'s NMS settings."""
    model = self.model

    def features(v, images, pad_shape):
      return model.apply(v, images, pad_shape, method=model.features)

    def proposals(v, feats, img_shape, pad_shape):
      def f(m):
        cls, reg = m.rpn_head.head(feats)
        return m.rpn_head.proposals(cls, reg, img_shape, pad_shape, rpn_cfg)
      return model.apply(v, method=f)
    return features, proposals

  def inference_stages(self) -> dict[str, tuple[Callable, tuple]]:
    """Stage programs of inference (see the module docstring)."""
    from msrcnn_jax.modeling.roi_heads import select_class  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.modeling.heads.box_postprocess import get_detections  # pylint: disable=g-import-not-at-top
    model, cfg, jnp = self.model, self.config, self.jnp
    r, rc = cfg.model.roi_head, cfg.test.rcnn

    features, proposals = self._front_stages(cfg.test.rpn)
    feats = self._abstract(features, self.variables, self.images, self.hw2)
    props = self._abstract(proposals, self.variables, feats, self.hw2,
                           self.hw2)

    def box_stage(v, feats, rois, roi_valid, img_shape, pad_shape, scale):
      def f(m):
        x = m.roi_head.roi_features(feats, rois, pad_shape,
                                    r.bbox_roi_extractor.output_size)
        cls, deltas = m.roi_head.bbox_head(x)
        return get_detections(
            rois, roi_valid, cls.astype(jnp.float32),
            deltas.astype(jnp.float32), img_shape=img_shape,
            scale_factor=scale, score_thr=rc.score_thr,
            iou_threshold=rc.iou_threshold, max_per_img=rc.max_per_img,
            max_candidates=rc.max_candidates,
            target_stds=tuple(r.bbox_head.target_stds))
      return model.apply(v, method=f)

    k = int(rc.max_per_img)
    dets = _sds((self.b, k, 4), jnp.float32, self.data)
    labels = _sds((self.b, k), jnp.int32, self.data)

    def mask_stage(v, feats, boxes, labels, pad_shape):
      def f(m):
        x = m.roi_head.roi_features(feats, boxes, pad_shape,
                                    r.mask_roi_extractor.output_size)
        logits = select_class(m.roi_head.mask_head(x), labels)
        return logits, m.roi_head.mask_iou_head(x, logits)
      return model.apply(v, method=f)

    return {
        'backbone+FPN': (self.jax.jit(features),
                         (self.variables, self.images, self.hw2)),
        'RPN+proposals': (self.jax.jit(proposals),
                          (self.variables, feats, self.hw2, self.hw2)),
        'RoI box stage': (self.jax.jit(box_stage),
                          (self.variables, feats, props['boxes'],
                           props['valid'],
                           self.hw2, self.hw2, self.scale)),
        'mask+MaskIoU': (self.jax.jit(mask_stage),
                         (self.variables, feats, dets, labels, self.hw2)),
    }

  # Training and its stages.
  def train_batch(self):
    d, jnp = self.config.data, self.jnp
    b, g, m = self.b, int(d.max_instances), int(d.gt_mask_crop_size)
    return dict(
        image=self.images, img_shape=self.hw2, pad_shape=self.hw2,
        scale_factor=self.scale,
        gt_boxes=_sds((b, g, 4), jnp.float32, self.data),
        gt_labels=_sds((b, g), jnp.int32, self.data),
        gt_valid=_sds((b, g), jnp.bool_, self.data),
        gt_masks=_sds((b, g, m, m), jnp.uint8, self.data))

  def _train_parts(self):
    from msrcnn_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.training import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.training.task import DetectorTask  # pylint: disable=g-import-not-at-top
    jax = self.jax
    task = DetectorTask(self.config, check_eval_source=False)
    params = self.variables['params']
    mask = task.frozen_mask(params)
    tx, schedule_fn = optimizer_lib.make_optimizer(self.config, mask)
    state = jax.eval_shape(lambda v: train_step_lib.create_train_state(
        v, tx, jax.random.key(1)), self.variables)
    state = jax.tree.map(lambda s: _sds(s.shape, s.dtype, self.rep), state)
    return task, tx, schedule_fn, mask, state, train_step_lib

  def train(self):
    task, tx, schedule_fn, mask, state, lib = self._train_parts()
    step = lib.make_train_step(task.loss_fn, tx, self.mesh,
                               compute_dtype=self.dtype,
                               schedule_fn=schedule_fn, mask=mask)
    return step, (state, self.train_batch())

  def train_stages(self) -> dict[str, tuple[Callable, tuple]]:
    """Forward stages at training shapes, loss forward, value-and-grad."""
    task, _, _, _, state, _ = self._train_parts()
    jax, jnp, model, cfg = self.jax, self.jnp, self.model, self.config
    r, t = cfg.model.roi_head, cfg.train
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.rep)
    batch = self.train_batch()

    features, proposals = self._front_stages(t.rpn_proposal)
    feats = self._abstract(features, self.variables, self.images, self.hw2)

    n_box = int(t.rcnn.num_samples)
    n_mask = int(t.rcnn.num_samples * t.rcnn.pos_fraction)

    def roi_stage(size, head):
      def fn(v, feats, rois, pad_shape):
        def f(m):
          x = m.roi_head.roi_features(feats, rois, pad_shape, size)
          return head(m, x)
        return model.apply(v, method=f)
      return fn

    def box_head(m, x):
      return m.roi_head.bbox_head(x)

    def mask_head(m, x):
      logits = m.roi_head.mask_head(x)[..., 0]
      return logits, m.roi_head.mask_iou_head(x, logits)

    def loss(params, batch_stats, batch, key):
      return task.loss_fn(params, batch_stats, batch,
                          jax.random.wrap_key_data(key), self.dtype)

    def grad(params, batch_stats, batch, key):
      return jax.value_and_grad(loss, has_aux=True)(params, batch_stats,
                                                    batch, key)

    v = self.variables
    box_rois = _sds((self.b, n_box, 4), jnp.float32, self.data)
    mask_rois = _sds((self.b, n_mask, 4), jnp.float32, self.data)
    return {
        'backbone+FPN': (jax.jit(features), (v, self.images, self.hw2)),
        'RPN+proposals': (jax.jit(proposals), (v, feats, self.hw2, self.hw2)),
        'RoI box stage': (jax.jit(roi_stage(r.bbox_roi_extractor.output_size,
                                            box_head)),
                          (v, feats, box_rois, self.hw2)),
        'mask+MaskIoU': (jax.jit(roi_stage(r.mask_roi_extractor.output_size,
                                           mask_head)),
                         (v, feats, mask_rois, self.hw2)),
        'loss forward': (jax.jit(loss), (state.params, state.batch_stats,
                                         batch, rng)),
        'value and grad': (jax.jit(grad), (state.params, state.batch_stats,
                                           batch, rng)),
    }


# ---------------------------------------------------------------- compile
def compile_program(fn, args) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles ``fn(*args)``; returns (compiled, figures)."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  fig = dict(lower_s=t1 - t0, compile_s=t2 - t1)
  fig.update(memory_figures(compiled))
  fig.update(cost_figures(compiled))
  return compiled, fig


def memory_figures(compiled) -> dict[str, float]:
  """Per-chip bytes of a compiled SPMD program (``memory_analysis()``)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {}
  fig = dict(arguments=m.argument_size_in_bytes,
             outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
             temporaries=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  fig['total'] = (fig['arguments'] + fig['outputs'] - fig['aliased'] +
                  fig['temporaries'] + fig['code'])
  return fig


def cost_figures(compiled) -> dict[str, float]:
  """XLA's FLOPs and bytes accessed per chip (None where not reported).

  A chip's program is its own share of the batch: divide by the per-chip
  batch, not the global one, for per-image figures.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return {}
  return dict(flops=cost.get('flops'), bytes=cost.get('bytes accessed'))


# ------------------------------------------------------------------ audit
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s'
                    r'([a-z][\w\-]*)\((.*)$')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
# Data-moving ops counted by the audit (the collectives move data between
# chips: with a batch-sharded program they should only reduce gradients).
_MOVES = ('gather', 'scatter', 'all-gather', 'all-reduce', 'all-to-all',
          'collective-permute', 'reduce-scatter')
_SHAPE = re.compile(r'([a-z]+\d*)\[([\d,]*)\]')


_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
             'u16': 2, 'f64': 8, 's64': 8, 'u64': 8}


def _elements(shape: str, nbytes: bool = False) -> int:
  """Elements (or bytes: ``nbytes``) of the array shapes in ``shape``."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    n = _ITEMSIZE.get(dtype, 4) if nbytes else 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n
  return total


def _source(line: str, frames: dict[int, str]) -> str:
  m = re.search(r'source_file="([^"]+)" source_line=(\d+)', line)
  if m:
    return f'{os.path.basename(m.group(1))}:{m.group(2)}'
  m = re.search(r'stack_frame_id=(\d+)', line)
  if m and int(m.group(1)) in frames:
    return frames[int(m.group(1))]
  m = re.search(r'op_name="([^"]+)"', line)
  return m.group(1)[-60:] if m else '?'


def _stack_frames(text: str) -> dict[int, str]:
  """stack_frame_id -> innermost project 'file:line' (new HLO text format)."""
  files, locs, frames = {}, {}, {}
  section = None
  for line in text.splitlines():
    s = line.strip()
    if s in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = s
      continue
    if not s or section is None:
      if not s:
        section = None
      continue
    if section == 'FileNames':
      i, name = s.split(' ', 1)
      files[int(i)] = os.path.basename(name.strip('"'))
    elif section == 'FileLocations':
      m = re.match(r'(\d+) \{file_name_id=(\d+).*? line=(\d+)', s)
      if m:
        locs[int(m.group(1))] = f'{files.get(int(m.group(2)), "?")}:{m.group(3)}'
    elif section == 'StackFrames':
      m = re.match(r'(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?', s)
      if m:
        frames[int(m.group(1))] = (locs.get(int(m.group(2)), '?'),
                                   int(m.group(3)) if m.group(3) else None)
  out = {}
  for fid in frames:
    # Innermost frame in msrcnn_jax code (skip jax internals).
    chain, f = [], fid
    while f is not None and f in frames and len(chain) < 50:
      chain.append(frames[f][0])
      f = frames[f][1]
    ours = [c for c in chain if not c.startswith(('api.py', 'linear_util',
                                                  'traceback', 'module.py',
                                                  'transforms.py'))]
    out[fid] = ours[0] if ours else (chain[0] if chain else '?')
  return out


def computations(text: str) -> dict[str, list[str]]:
  """Instruction lines of each computation of an HLO module (text)."""
  comps: dict[str, list[str]] = collections.OrderedDict()
  cur = None
  for line in text.splitlines():
    line = re.sub(r'/\*.*?\*/', '', line)
    m = _COMP.match(line)
    if m and '=' not in line.split('{')[0]:
      cur = m.group(1)
      comps[cur] = []
      continue
    if cur is not None:
      if line.strip() == '}':
        cur = None
      else:
        comps[cur].append(line)
  return comps


def audit_hlo(text: str) -> dict[str, Any]:
  """Loops and gathers/scatters of an optimised HLO module (text).

  Returns:
    ``loops``: list of dicts (source, trip count or None, parent loop,
    body op counts); ``gathers``, ``scatters``, ``all-gathers``,
    ``all-reduces``, ...: per source line, count and the largest number of
    elements moved (result elements; update elements of a scatter).
  """
  frames = _stack_frames(text)
  comps = computations(text)
  # Which computations each computation calls (fusions, loops, calls).
  calls = {c: set(re.findall(r'(?:calls|body|condition|to_apply|'
                             r'branch_computations)=\{?%?([\w.\-]+)',
                             '\n'.join(lines)))
           for c, lines in comps.items()}

  def reach(c, seen=None):
    seen = set() if seen is None else seen
    if c in seen or c not in comps:
      return seen
    seen.add(c)
    for d in calls.get(c, ()):
      reach(d, seen)
    return seen

  loops, owner = [], {}
  for c, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if not m or m.group(3) != 'while':
        continue
      body = re.search(r'body=%?([\w.\-]+)', line).group(1)
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      inside = collections.Counter()
      for bc in reach(body):
        for bl in comps[bc]:
          im = _INSTR.match(bl)
          if im and im.group(3) in ('fusion', 'gather', 'scatter', 'dot',
                                    'convolution', 'sort', 'while',
                                    'custom-call', 'all-reduce'):
            inside[im.group(3)] += 1
      loops.append(dict(name=m.group(1), comp=c, body=body,
                        source=_source(line, frames),
                        trip=int(trip.group(1)) if trip else None,
                        ops=dict(inside)))
      owner[body] = len(loops) - 1
  for lp in loops:  # parent loop: the loop whose body reaches this one
    lp['parent'] = next((loops[owner[b]]['source'] for b in owner
                         if b != lp['body'] and lp['comp'] in reach(b)),
                        None)
  moves = {k: collections.defaultdict(lambda: [0, 0]) for k in _MOVES}
  for lines in comps.values():
    for line in lines:
      m = _INSTR.match(line)
      if not m or m.group(3).replace('-start', '') not in moves:
        continue
      kind = m.group(3).replace('-start', '')
      if kind != 'scatter':
        n = _elements(m.group(2))
      else:  # the update operand is the last shaped operand
        n = _elements(m.group(4).split(')')[0].split('%')[-1]) or _elements(
            m.group(2))
      e = moves[kind][_source(line, frames)]
      e[0] += 1
      e[1] = max(e[1], n)
  out = dict(loops=loops)
  out.update({f'{k}s': {s: tuple(v) for s, v in moves[k].items()}
              for k in _MOVES})
  return out


def print_audit(name: str, audit: dict[str, Any]) -> None:
  print(f'  audit of {name}: {len(audit["loops"])} while loops')
  for lp in audit['loops']:
    trip = lp['trip'] if lp['trip'] is not None else 'dynamic'
    ops = ', '.join(f'{v} {k}' for k, v in sorted(lp['ops'].items()))
    nest = f' (inside {lp["parent"]})' if lp['parent'] else ''
    print(f'    while {lp["source"]}{nest}: trip {trip}; body: {ops}')
  for kind in (f'{k}s' for k in _MOVES):
    if not audit[kind]:
      continue
    items = sorted(audit[kind].items(), key=lambda kv: -kv[1][1])
    total = sum(v[0] for v in audit[kind].values())
    print(f'    {total} {kind}; largest (source: count, max elements):')
    for src, (cnt, n) in items[:6]:
      print(f'      {src}: {cnt}, {n:,}')


# ------------------------------------------------------------------ report
def _fmt_bytes(n):
  return '-' if n is None else f'{n / GiB:.2f}'


def _row(label: str, fig: dict[str, Any], images: int, hbm) -> str:
  flops = fig.get('flops')
  nbytes = fig.get('bytes')
  total = fig.get('total')
  if fig.get('derived'):
    mem = ''
    if 'total' in fig:
      mem = (f' temp {_fmt_bytes(fig["temporaries"])} total '
             f'{_fmt_bytes(total)}')
    return (f'  {label:<16} (difference of the rows above) compile '
            f'{fig.get("compile_s", 0):6.1f} s | GiB/chip{mem or " -"} | '
            f'GFLOP/img {"-" if flops is None else f"{flops / images / 1e9:.1f}"} '
            f'GB/img {"-" if nbytes is None else f"{nbytes / images / 1e9:.2f}"}')
  frac = f'{100 * total / hbm:.0f}%' if (total and hbm) else '-'
  return (f'  {label:<16} lower {fig.get("lower_s", 0):6.1f} s  compile '
          f'{fig.get("compile_s", 0):6.1f} s | GiB/chip args '
          f'{_fmt_bytes(fig.get("arguments"))} temp '
          f'{_fmt_bytes(fig.get("temporaries"))} code '
          f'{_fmt_bytes(fig.get("code"))} total {_fmt_bytes(total)} ({frac} '
          f'HBM) | GFLOP/img '
          f'{"-" if flops is None else f"{flops / images / 1e9:.1f}"} '
          f'GB/img {"-" if nbytes is None else f"{nbytes / images / 1e9:.2f}"}')


def _derive(stages: dict[str, dict], order: list[tuple[str, str, list[str]]]
            ) -> None:
  """Adds difference rows to ``stages``: FLOPs, bytes and compile time;
  per-chip memory (temporaries, total) only where one program is taken from
  a larger one (the peak of separately compiled stages does not add up)."""
  for name, whole, parts in order:
    if whole not in stages or any(p not in stages for p in parts):
      continue
    fig = {}
    memory = ('temporaries', 'total') if len(parts) == 1 else ()
    for key in ('flops', 'bytes', 'compile_s') + memory:
      vals = [stages[p].get(key) for p in parts]
      if stages[whole].get(key) is not None and None not in vals:
        fig[key] = stages[whole][key] - sum(vals)
    fig['derived'] = True
    stages[name] = fig


def run(target: str, topology: str, chips: int, configs: list[str],
        batches: list[int], dtypes: list[str], programs: list[str],
        stages: bool, audit: bool, bucket=None) -> list[dict[str, Any]]:
  """Compiles every combination; prints and returns the figures."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  devices, desc, hbm = target_devices(target, topology, chips)
  with accelerator_defaults(target):
    return _run(devices, desc, hbm, configs, batches, dtypes, programs,
                stages, audit, bucket)


def _run(devices, desc, hbm, configs, batches, dtypes, programs, stages,
         audit, bucket):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.training import partitioning  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(devices)
  n = len(devices)
  print(f'target: {desc}; HBM/chip '
        f'{"?" if hbm is None else f"{hbm / GiB:.1f} GiB"}', flush=True)
  results = []
  for path in configs:
    config = config_flags.load_config_file(path) if hasattr(
        config_flags, 'load_config_file') else _load(path)
    hw = tuple(int(v) for v in (bucket or config.data.buckets[0]))
    for per_chip in batches:
      for dtype in dtypes:
        progs = Programs(config, mesh, per_chip, dtype, hw)
        head = (f'{config.name} | {per_chip}/chip x {n} = {progs.b} images '
                f'{hw[0]}x{hw[1]} | {dtype}')
        print(head, flush=True)
        for prog in programs:
          fn, args = getattr(progs, prog)()
          compiled, fig = compile_program(fn, args)
          print(_row(prog, fig, per_chip, hbm), flush=True)
          rec = dict(target=desc, device_kind=devices[0].device_kind,
                     config=config.name, per_chip=per_chip, chips=n,
                     dtype=dtype, program=prog, hw=hw,
                     hbm_bytes=hbm, **fig)
          if audit:
            rec['audit'] = audit_hlo(compiled.as_text())
            print_audit(prog, rec['audit'])
          del compiled
          if stages:
            st = {}
            for sname, (sfn, sargs) in getattr(progs, f'{prog}_stages')(
                ).items():
              _, st[sname] = compile_program(sfn, sargs)
            if prog == 'train':
              st['step'] = fig
              fwd = ['backbone+FPN', 'RPN+proposals', 'RoI box stage',
                     'mask+MaskIoU']
              _derive(st, [('targets+losses', 'loss forward', fwd),
                           ('backward', 'value and grad', ['loss forward']),
                           ('optimizer', 'step', ['value and grad'])])
              del st['step']
            for sname, sfig in st.items():
              label = sname + (' (diff)' if sfig.get('derived') else '')
              print('  ' + _row(label, sfig, per_chip, hbm)[2:], flush=True)
            rec['stages'] = st
          results.append(rec)
  return results


def _load(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('aot_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def main(argv):
  del argv
  results = run(_TARGET.value, _TOPOLOGY.value, _CHIPS.value, _CONFIGS.value,
                [int(b) for b in _BATCH.value], _DTYPES.value,
                _PROGRAMS.value, _STAGES.value, _AUDIT.value,
                [int(v) for v in _BUCKET.value] or None)
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=1, default=str)


if __name__ == '__main__':
  app.run(main)
