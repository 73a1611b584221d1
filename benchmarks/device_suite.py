r"""One-command accelerator suite: speed, memory, compile time and parity.

On a GPU machine (estimated 6-8 minutes on one H200, mostly compiles; not
yet run on one). Its image lacks ml_collections, pycocotools and
tensorboardX, and the parity section imports the CPU test module (pytest):
here, ``bash ../shared/tools/device_wheels.sh pytest pluggy iniconfig``, then
in the device call (carry ``.whl``):

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 timeout 560 \
      python3 benchmarks/device_suite.py --out $OUT/suite

Each section writes ``suite.json`` as soon as it ends, so a run stopped by its
time limit keeps what it measured; ``--sections`` reruns a part.

On the CPU, to check it runs (quickstart config, one inference program, one
train step, one parity set; minutes on 2 cores):

  python benchmarks/device_suite.py --smoke --out /tmp/suite

Sections (``--sections``, default all):
  inference: images/s and latency (median of ``--iters`` calls after a
    warm-up) and compile time for R-50 caffe and X-101-64x4d at 1333x800
    (padded 800x1344), batch 1 and 8, bfloat16 and float32; random weights
    (identity-initialised residual blocks keep them finite; speed does not
    depend on values).
  train: R-50 train step (benchmarks/train_step.py) at per-device batch
    2/4/8, bfloat16: compile time, step time, images/s, the compiled step's
    temporaries and the device's peak bytes in use so far.
  parity: the mmdetection fixture sets (tests/fixtures/mmdet) through the
    jitted detector on this device, checked with the CPU tests' own matcher
    and tolerances (tests/test_end_to_end_parity.py); then in bfloat16,
    reported as the share of mmdetection's detections (score >= 0.3) matched
    with the same label, box IoU >= 0.9 and |score diff| <= 0.05 (stated
    bf16 tolerance: >= 90%). The fixtures' random weights amplify any
    perturbation (0.3% input noise in float32 becomes 35% at C5 on the CPU),
    so the float32 model on the bf16-rounded input runs beside it; where
    that baseline also misses 90%, bf16 is reported as not assessable on
    the fixture.

Writes ``suite.json`` (every figure) to ``--out`` and prints a short table
last. Reads only files inside the repository.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, 'benchmarks'),
                os.path.join(_ROOT, 'tests')]

from msrcnn_jax.modeling.detector import MaskScoringRCNN, init_variables  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string('out', 'device_suite', 'Output directory.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny config and shapes (CPU).')
_SECTIONS = flags.DEFINE_list('sections', ['inference', 'train', 'parity'],
                              'Sections to run.')
_ITERS = flags.DEFINE_integer('iters', 10, 'Timed calls per measurement.')

R50 = 'configs/ms_rcnn_r50_caffe_fpn_1x_coco.py'
X101 = 'configs/ms_rcnn_x101_64x4d_fpn_1x_coco.py'
SMOKE = 'configs/quickstart_synthetic.py'
BF16_TOL = dict(score_thr=0.3, iou=0.9, score=0.05, min_matched=0.9)


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'suite_config', os.path.join(_ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.model.backbone.zero_init_residual = True
  return cfg


def _median_time(fn, iters: int) -> float:
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def inference_section(smoke: bool, iters: int) -> list[dict[str, Any]]:
  """Inference speed per (config, batch, dtype)."""
  rows = []
  configs = [SMOKE] if smoke else [R50, X101]
  batches = [1] if smoke else [1, 8]
  dtypes = ['bfloat16'] if smoke else ['bfloat16', 'float32']
  for path in configs:
    cfg = load_config(path)
    h, w = (128, 128) if smoke else (800, 1333)
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    variables = jax.device_put(init_variables(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    for b in batches:
      images = np.zeros((b, ph, pw, 3), np.float32)
      images[:, :h, :w] = rng.normal(0, 50, (b, h, w, 3))
      args = (jax.device_put(images),
              jax.device_put(np.tile([[h, w]], (b, 1)).astype(np.int32)),
              jax.device_put(np.tile([[ph, pw]], (b, 1)).astype(np.int32)),
              jax.device_put(np.ones((b, 4), np.float32)))
      for dtype in dtypes:
        model = MaskScoringRCNN(cfg, dtype=jnp.dtype(dtype))
        fwd = jax.jit(model.apply)
        t0 = time.perf_counter()
        compiled = fwd.lower(variables, *args).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(variables, *args))
        step = _median_time(lambda: compiled(variables, *args), iters)
        row = dict(config=cfg.name, batch=b, dtype=dtype,
                   image=f'{h}x{w}', compile_s=compile_s,
                   latency_ms=step * 1e3, images_per_s=b / step)
        print(f'inference {cfg.name} b{b} {dtype}: compile {compile_s:.1f} s'
              f', {step * 1e3:.1f} ms, {b / step:.1f} images/s', flush=True)
        rows.append(row)
  return rows


def train_section(smoke: bool, iters: int) -> list[dict[str, Any]]:
  """R-50 train step per per-device batch (bfloat16)."""
  import train_step as train_bench  # pylint: disable=g-import-not-at-top
  cfg = load_config(SMOKE if smoke else R50)
  cfg.train.compute_dtype = 'bfloat16'
  rows = []
  n = jax.device_count()
  for per_dev in ([1] if smoke else [2, 4, 8]):
    r = train_bench.benchmark(cfg, per_dev * n, iters)
    row = dict(config=cfg.name, per_device_batch=per_dev, devices=n,
               dtype='bfloat16', compile_s=r['compile_s'],
               step_ms=r['step_s'] * 1e3, images_per_s=r['images_per_s'],
               peak_memory=r['memory'], finite=r['finite'])
    print(f'train {cfg.name} {per_dev}/device: compile {r["compile_s"]:.1f}'
          f' s, {r["step_s"] * 1e3:.1f} ms/step, {r["images_per_s"]:.1f} '
          f'images/s, peak {r["memory"]}', flush=True)
    rows.append(row)
  return rows


def _bf16_matched(ref_entries, rec) -> tuple[int, int]:
  """(matched, total) of mmdetection's detections above the score bar."""
  import test_end_to_end_parity as parity  # pylint: disable=g-import-not-at-top
  tol = BF16_TOL
  ref = [e for e in ref_entries if e['score'] >= tol['score_thr']]
  if not ref:
    return 0, 0
  boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in
                    (e['bbox'] for e in ref)], np.float64)
  if len(rec['scores']) == 0:
    return 0, len(ref)
  ious = parity._iou(boxes, rec['boxes'].astype(np.float64))  # pylint: disable=protected-access
  matched = 0
  for i, e in enumerate(ref):
    ok = ((ious[i] >= tol['iou']) & (rec['labels'] == e['label']) &
          (np.abs(rec['scores'] - e['score']) <= tol['score']))
    matched += bool(np.any(ok))
  return matched, len(ref)


def parity_section(smoke: bool) -> list[dict[str, Any]]:
  """Fixture sets vs mmdetection on this device: float32 exact, bf16 loose."""
  import conftest  # pylint: disable=g-import-not-at-top
  import test_end_to_end_parity as parity  # pylint: disable=g-import-not-at-top
  rows = []
  sets = sorted(conftest.SET_IMAGES)[:1] if smoke else sorted(
      conftest.SET_IMAGES)
  for set_name in sets:
    images = conftest.SET_IMAGES[set_name]
    results = conftest.load_results(set_name)
    row = dict(set=set_name)
    try:
      records, _ = parity._run(set_name, images)  # pylint: disable=protected-access
      for name in images:
        ref = [e for e in results if e['image'] == f'{name}.png']
        parity._assert_matches(ref, records[name],  # pylint: disable=protected-access
                               conftest.PARITY_TOL[set_name])
      row['float32'] = 'pass'
    except AssertionError as e:
      row['float32'] = f'FAIL: {e}'
    # bfloat16: the same model and weights with bf16 convolutions/dense.
    # The fixtures' weights are random, and a random deep network amplifies
    # any perturbation (measured on the CPU: 0.3% input noise in float32
    # becomes 35% at C5), so the float32 model fed the bf16-rounded input is
    # run beside it: where that baseline also misses the bar, the fixture
    # cannot judge bf16 and the row says so instead of passing or failing.
    cfg, variables, _ = parity._model(set_name)  # pylint: disable=protected-access
    from msrcnn_jax import postprocess  # pylint: disable=g-import-not-at-top
    from msrcnn_jax.inference import batch_by_bucket  # pylint: disable=g-import-not-at-top
    items = parity._items(cfg, images)  # pylint: disable=protected-access

    def share_matched(dtype, round_input):
      fn = jax.jit(MaskScoringRCNN(cfg, dtype=dtype).apply)
      matched = total = 0
      for batch in batch_by_bucket(items, 1, cfg.data):
        image = jnp.asarray(batch['image'])
        if round_input:
          image = image.astype(jnp.bfloat16).astype(jnp.float32)
        out = jax.device_get(fn(variables, image, batch['img_shape'],
                                batch['pad_shape'], batch['scale_factor']))
        meta = [dict(image_id=int(batch['image_id'][0]),
                     file_name=batch['file_name'][0],
                     ori_shape=tuple(batch['ori_shape'][0]))]
        rec = postprocess.outputs_to_records(out, meta)[0]
        name = images[rec['image_id']]
        ref = [e for e in results if e['image'] == f'{name}.png']
        m, t = _bf16_matched(ref, rec)
        matched, total = matched + m, total + t
      return matched, total

    matched, total = share_matched(jnp.bfloat16, False)
    base_m, base_t = share_matched(jnp.float32, True)
    share = matched / total if total else 1.0
    base = base_m / base_t if base_t else 1.0
    bar = BF16_TOL['min_matched']
    if share >= bar:
      verdict = 'pass'
    elif base < bar:
      verdict = (f'n/a ({share:.0%} matched; float32 with bf16-rounded input '
                 f'{base:.0%}: the random-weight fixture amplifies rounding)')
    else:
      verdict = f'FAIL ({share:.0%} matched)'
    row.update(bf16_matched=matched, bf16_total=total,
               f32_rounded_input_matched=base_m, bfloat16=verdict)
    print(f'parity {set_name}: float32 {row["float32"][:80]}, bfloat16 '
          f'{matched}/{total} matched, float32 with bf16-rounded input '
          f'{base_m}/{base_t} -> {verdict}', flush=True)
    rows.append(row)
  return rows


def main(argv):
  del argv
  os.chdir(_ROOT)
  out = dict(device=f'{jax.default_backend()} {jax.devices()[0].device_kind}'
             f' x {jax.device_count()}', jax=jax.__version__,
             smoke=_SMOKE.value, tolerances=dict(bf16=BF16_TOL))
  print(f'device suite on {out["device"]} (jax {jax.__version__})',
        flush=True)
  t_start = time.perf_counter()
  sections = dict(inference=lambda: inference_section(_SMOKE.value,
                                                      _ITERS.value),
                  train=lambda: train_section(_SMOKE.value, _ITERS.value),
                  parity=lambda: parity_section(_SMOKE.value))
  for name in _SECTIONS.value:
    try:
      out[name] = sections[name]()
    except Exception as e:  # pylint: disable=broad-except
      # One failing section must not lose the others' figures.
      traceback.print_exc()
      out[name] = f'error: {type(e).__name__}: {e}'
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, 'suite.json'), 'w') as f:
      json.dump(out, f, indent=1, default=str)
  out['wall_s'] = time.perf_counter() - t_start
  with open(os.path.join(_OUT.value, 'suite.json'), 'w') as f:
    json.dump(out, f, indent=1, default=str)
  print(f'\n== device suite: {out["device"]}, {out["wall_s"]:.0f} s ==')
  for r in out.get('inference') or []:
    if isinstance(r, dict):
      print(f'infer {r["config"][:22]:<22} b{r["batch"]} {r["dtype"]:<8} '
            f'{r["images_per_s"]:8.1f} img/s {r["latency_ms"]:8.1f} ms  '
            f'compile {r["compile_s"]:5.1f} s')
  for r in out.get('train') or []:
    if isinstance(r, dict):
      print(f'train {r["config"][:22]:<22} {r["per_device_batch"]}/dev bf16 '
            f'{r["images_per_s"]:8.1f} img/s {r["step_ms"]:8.1f} ms  '
            f'compile {r["compile_s"]:5.1f} s  peak {r["peak_memory"]}')
  for r in out.get('parity') or []:
    if isinstance(r, dict):
      print(f'parity {r["set"]:<26} float32 {r["float32"][:40]}  bfloat16 '
            f'{r["bfloat16"]}')
  for name in _SECTIONS.value:
    if isinstance(out.get(name), str):
      print(f'{name}: {out[name]}')


if __name__ == '__main__':
  app.run(main)
