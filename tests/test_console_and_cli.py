"""What a person sees from the tools: names, refusals, the console, pictures.

Issue 19's predict / export / console items, checked on the quickstart
model (random weights, one 128x128 bucket, batch 1):

- ``predict``: equal file names in different directories keep distinct names
  in results.json and in ``--vis-dir`` (``d1/x.png``, ``d2/x.png``); an
  ``--output`` that is a directory or lies in a missing directory is refused
  with its exact message;
- export: an edited ``contract.json`` (mean), one whose batch or bucket
  disagrees with its program, each refused with its message, in process, and
  ``predict --exported`` on an edited contract ends in one ``error:`` line
  (last line, exit 1, no traceback);
- console: about ten metric lines per training run; other libraries' INFO
  records dropped and ours kept (absl
  ``--verbosity`` keeps all), log lines written above a progress bar, a long
  mismatch list summarised (count, first lines, full list in the named file,
  error line self-contained), ``--help`` exits 0, a missing config file is
  ``config file not found: PATH``, a corrupt PNG is "corrupt or truncated"
  (a ``train.py`` run's console is checked by tests/test_quickstart.py, on
  the run it makes anyway);
- pictures of 128 px images are 512 px with captions inside the picture and
  apart;
- ``python -m msrcnn_jax.data.synthetic --out DIR`` writes a dataset the
  COCO source reads.

Cost on the 2-core CPU VM shared by 4 jobs, measured: about 50 s (the two
``predict --exported`` subprocesses 28 s, the ``train.py --help`` /
missing-config subprocesses 11 s, the export fixture's lowering 7 s, the
rest in process in a few seconds).
"""

import json
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import assert_one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


# ------------------------------------------------------------------ predict
def test_equal_basenames_keep_distinct_names():
  from msrcnn_jax import predict  # pylint: disable=g-import-not-at-top
  assert predict.image_names(['a/x.png', 'b/y.png']) == ['x.png', 'y.png']
  assert predict.image_names(['d1/x.png', 'd2/x.png']) == ['d1/x.png',
                                                           'd2/x.png']
  assert predict.image_names(['p/d1/x.png', 'p/q/d2/x.png', 'p/z.png']) == [
      'd1/x.png', 'q/d2/x.png', 'z.png']
  assert predict.picture_names(['d1/x.jpg', 'd2/x.png']) == ['d1/x.png',
                                                             'd2/x.png']
  assert predict.picture_names(['x.png', 'x.jpg', 'y.jpg']) == [
      'x.png', 'x.jpg.png', 'y.png']


def test_output_refused_before_any_work(tmp_path):
  from msrcnn_jax import errors, predict  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError) as e:
    predict.check_outputs(str(tmp_path), None)
  assert str(e.value) == (f'--output {tmp_path} is a directory; give the '
                          'path of the JSON file to write')
  out = str(tmp_path / 'nowhere' / 'results.json')
  with pytest.raises(errors.UserError) as e:
    predict.check_outputs(out, None)
  assert str(e.value) == (f'--output {out}: directory '
                          f'{tmp_path / "nowhere"} does not exist')
  (tmp_path / 'vis').write_text('')
  with pytest.raises(errors.UserError, match='is a file, not a directory'):
    predict.check_outputs(str(tmp_path / 'r.json'), str(tmp_path / 'vis'))
  predict.check_outputs(str(tmp_path / 'r.json'), str(tmp_path / 'v'))


def test_corrupt_png_is_corrupt_or_truncated(tmp_path):
  from msrcnn_jax.data import image_io  # pylint: disable=g-import-not-at-top
  ok, png = cv2.imencode('.png', np.full((64, 64, 3), 7, np.uint8))
  assert ok
  bad = tmp_path / 'bad.png'
  bad.write_bytes(png.tobytes()[:40])
  with pytest.raises(image_io.ImageReadError) as e:
    image_io.imread(str(bad))
  assert str(e.value).startswith(
      f'cannot decode image {bad}: corrupt or truncated PNG file (40 bytes')
  assert image_io.header_problem(str(bad)) == 'corrupt or truncated PNG file'
  empty = tmp_path / 'empty.jpg'
  empty.write_bytes(b'')
  assert image_io.header_problem(str(empty)) == 'empty file (0 bytes)'
  other = tmp_path / 'notes.xyz'
  other.write_text('not an image')
  with pytest.raises(image_io.ImageReadError,
                     match='not an image format OpenCV can read'):
    image_io.imread(str(other))


# ----------------------------------------------------------------- console
def _record(pathname, level=logging.INFO, msg='hello'):
  return logging.LogRecord('x', level, pathname, 1, msg, (), None)


def test_other_libraries_info_records_dropped_ours_kept():
  from msrcnn_jax import console  # pylint: disable=g-import-not-at-top
  f = console.QuietLibrariesFilter()
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  ours = os.path.join(ROOT, 'msrcnn_jax', 'training', 'trainer.py')
  assert not f.filter(_record(orbax))
  assert not f.filter(_record('/site-packages/jax/_src/xla_bridge.py',
                              msg="Unable to initialize backend 'tpu'"))
  assert f.filter(_record(ours))
  assert f.filter(_record(orbax, logging.WARNING, 'disk full'))
  assert not f.filter(_record(orbax, logging.WARNING,
                              'Metadata file does not exist: /x/_METADATA'))
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  stream = handler.python_handler.stream
  try:
    console.configure_logging(verbose=True)
    assert not any(isinstance(x, console.QuietLibrariesFilter)
                   for x in handler.filters)
    console.configure_logging(verbose=False)
    assert sum(isinstance(x, console.QuietLibrariesFilter)
               for x in handler.filters) == 1
  finally:   # as it was, for the tests after this one
    handler.python_handler.stream = stream
    for x in list(handler.filters):
      if isinstance(x, console.QuietLibrariesFilter):
        handler.removeFilter(x)


def test_log_lines_are_written_above_the_progress_bar(capsys):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from msrcnn_jax import console  # pylint: disable=g-import-not-at-top
  stream = console._AboveProgressBars()  # pylint: disable=protected-access
  bar = tqdm(total=4, file=sys.stderr, desc='train', mininterval=0)
  bar.update(1)
  stream.write('I trainer.py] step 1/4 loss=3.0')
  stream.write('\n')
  bar.update(1)
  bar.close()
  err = capsys.readouterr().err
  lines = [l.split('\r')[-1] for l in err.split('\n')]
  assert 'I trainer.py] step 1/4 loss=3.0' in lines, repr(err)


def test_console_metric_lines_about_ten_per_run():
  from msrcnn_jax.training.trainer import console_log_every  # pylint: disable=g-import-not-at-top
  # The quickstart: 1400 steps logged every 20 -> a console line every 140
  # steps (10 lines; TensorBoard keeps all 70).
  assert console_log_every(20, 1400) == 140
  # Short runs keep every log step: 40 steps every 5 -> 8 lines.
  assert console_log_every(5, 40) == 5
  assert console_log_every(1, 2) == 1
  for log_every, steps in ((20, 1400), (50, 90000), (20, 310), (1, 37)):
    every = console_log_every(log_every, steps)
    assert every % log_every == 0
    assert steps // every <= 14, (log_every, steps, every)


def test_long_mismatch_list_summarised_in_a_file():
  from msrcnn_jax import errors, variables  # pylint: disable=g-import-not-at-top
  expected = {f'params/p{i}': (3, 3) for i in range(319)}
  got = {f'params/p{i}': (4, 3) for i in range(319)}
  with pytest.raises(variables.VariablesMismatchError) as e:
    variables.check_variables(expected, {'params': {
        f'p{i}': np.zeros((4, 3)) for i in range(319)}}, source='ck',
                              model='qs', made_for='other')
  del got
  first, context = errors.summarise_context(str(e.value))
  assert first.startswith("ck does not fit config 'qs': 319 mis-shaped "
                          "variables (the checkpoint was written for config "
                          "'other') (full list: ")
  path = first.rsplit('(full list: ', 1)[1].rstrip(')')
  with open(path) as f:
    full = f.read().splitlines()
  os.remove(path)
  assert len(full) == 320
  assert len(context) == errors.CONTEXT_SHOWN + 1
  assert context[-1] == f'  ... and 314 more (all in {path})'
  assert context[0] == ('  shape: params/p0 has (4, 3), the model expects '
                        '(3, 3)')


def test_help_exits_0_and_missing_config_is_named(tmp_path):
  proc = _run('train.py', '--help')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--workdir' in proc.stdout
  missing = str(tmp_path / 'no_such_config.py')
  assert_one_error_line(_run('train.py', f'--config={missing}'))
  assert _run('train.py', f'--config={missing}').stderr.strip() == (
      f'error: config file not found: {missing} (--config)')


# ---------------------------------------------------------------- pictures
def test_small_images_drawn_at_a_legible_size(tmp_path):
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.ops.masks import encode_rle  # pylint: disable=g-import-not-at-top
  boxes = np.array([[100, 0, 128, 40], [96, 2, 127, 44], [0, 100, 30, 128]],
                   np.float32)
  masks = []
  for x1, y1, x2, y2 in boxes.astype(int):
    m = np.zeros((128, 128), np.uint8)
    m[y1:y2, x1:x2] = 1
    masks.append(encode_rle(m))
  rec = dict(boxes=boxes, scores=np.array([0.9, 0.8, 0.7]),
             labels=np.array([0, 1, 2]), mask_iou=np.array([0.5, 0.6, 0.7]),
             masks=masks)
  path = tmp_path / 'vis' / 'a.png'
  drawn = visualize.save_visualization(str(path), np.full(
      (128, 128, 3), 90, np.uint8), rec, ('rectangle', 'ellipse', 'triangle'))
  assert drawn.shape == (512, 512, 3)
  assert Image.open(path).size == (512, 512)
  # Captions: inside the picture and apart, also for boxes at the corners.
  canvas = ImageDraw.Draw(Image.new('RGB', (512, 512)))
  font = visualize._font(512)  # pylint: disable=protected-access
  placed = []
  for b in boxes * 4:
    visualize._place_caption(  # pylint: disable=protected-access
        canvas, 'rectangle 0.90 | mIoU 0.50', font, tuple(b), (512, 512),
        placed)
  for i, (x1, y1, x2, y2) in enumerate(placed):
    assert 0 <= x1 and 0 <= y1 and x2 <= 512 and y2 <= 512, placed[i]
    for u1, v1, u2, v2 in placed[:i]:
      assert not (x1 < u2 and u1 < x2 and y1 < v2 and v1 < y2), placed


# --------------------------------------------------------------- synthetic
def test_synthetic_main_writes_a_coco_dataset(tmp_path, capsys):
  from msrcnn_jax.data import coco, synthetic  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'shapes')
  assert synthetic.main(['--out', out, '--num-train', '3', '--num-val', '2',
                         '--seed', '5']) == 0
  printed = capsys.readouterr().out
  assert f'--config.data.coco_dir={out}' in printed
  for split, n in (('train', 3), ('val', 2)):
    src = coco.CocoSource(out, split, train=False)
    assert len(src) == n
    assert os.path.isfile(os.path.join(out, split, src[0]['file_name']))
  with open(os.path.join(out, 'annotations', 'instances_val.json')) as f:
    first = json.load(f)
  synthetic.main(['--out', out, '--num-train', '3', '--num-val', '2',
                  '--seed', '5'])
  with open(os.path.join(out, 'annotations', 'instances_val.json')) as f:
    assert json.load(f) == first
  with pytest.raises(SystemExit):
    synthetic.main(['--out', out, '--num-classes', '9'])


# ------------------------------------------------------------------ export
@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """An export of the quickstart model (random weights), batch 1, 128x128."""
  import jax  # pylint: disable=g-import-not-at-top
  from msrcnn_jax import export  # pylint: disable=g-import-not-at-top
  from msrcnn_jax.modeling import build  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  try:
    import quickstart_synthetic  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  config = quickstart_synthetic.get_config()
  shapes = build.variable_shapes(config)
  rng = np.random.default_rng(0)

  def init(path, s):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if name.endswith(('var', 'scale')):
      return np.ones(s.shape, np.float32)
    if name.endswith(('mean', 'bias')):
      return np.zeros(s.shape, np.float32)
    return (rng.normal(size=s.shape) * 0.05).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(init, shapes)
  out = str(tmp_path_factory.mktemp('export') / 'exp')
  export.export_detector(config, variables, out, batch_size=1,
                         buckets=[(128, 128)], saved_model=False)
  return out


def _edited_copy(src, dst, edit):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'contract.json')
  with open(path) as f:
    contract = json.load(f)
  edit(contract)
  with open(path, 'w') as f:
    json.dump(contract, f)
  return dst


def test_edited_contract_refused(exported, tmp_path):
  from msrcnn_jax import serving  # pylint: disable=g-import-not-at-top
  assert serving.ExportedPredictor(exported).batch_size == 1

  def scale(c):
    c['preprocess']['std'] = [1.0, 1.0, 1.0]
  d = _edited_copy(exported, str(tmp_path / 'std'), scale)
  with pytest.raises(serving.ExportError, match=r'contract\.json is not the '
                     r'contract .*detector_128x128\.stablehlo was exported '
                     r'with \(it was edited'):
    serving.ExportedPredictor(d)

  def batch(c):
    c['batch_size'] = 2
  d = _edited_copy(exported, str(tmp_path / 'batch'), batch)
  with pytest.raises(serving.ExportError) as e:
    serving.ExportedPredictor(d)
  assert ('the contract says batch 2 and bucket 128x128, the program takes '
          'images of shape 1x128x128x3 (batch 1, bucket 128x128)') in str(
              e.value)

  def bucket(c):
    c['buckets'] = [[160, 160]]
    c['programs'] = {'160x160': c['programs']['128x128']}
  d = _edited_copy(exported, str(tmp_path / 'bucket'), bucket)
  with pytest.raises(serving.ExportError, match='bucket 160x160, the program '
                     'takes images of shape 1x128x128x3'):
    serving.ExportedPredictor(d)


def test_predict_exported_names_pictures_and_edited_contract(exported,
                                                             tmp_path):
  from msrcnn_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  paths = []
  for i, d in enumerate(('d1', 'd2')):
    img, *_ = synthetic.generate(np.random.default_rng(i), 128, 128, 4, 3)
    os.makedirs(tmp_path / d)
    paths.append(str(tmp_path / d / 'x.png'))
    cv2.imwrite(paths[-1], img)
  out, vis = tmp_path / 'results.json', tmp_path / 'vis'
  proc = _run('-m', 'msrcnn_jax.predict', '--exported', exported, '--output',
              str(out), '--vis-dir', str(vis), '--vis-score-thr', '0', *paths)
  assert proc.returncode == 0, proc.stderr[-3000:]
  entries = json.loads(out.read_text())
  assert entries and {e['image'] for e in entries} == {'d1/x.png', 'd2/x.png'}
  for d in ('d1', 'd2'):
    picture = cv2.imread(str(vis / d / 'x.png'))
    assert picture.shape == (512, 512, 3), d
  for noise in ('orbax', 'Metadata file does not exist',
                'Unable to initialize backend', 'Traceback'):
    assert noise not in proc.stderr, (noise, proc.stderr[-3000:])

  def mean(c):
    c['preprocess']['mean'] = [0.0, 0.0, 0.0]
  edited = _edited_copy(exported, str(tmp_path / 'edited'), mean)
  proc = _run('-m', 'msrcnn_jax.predict', '--exported', edited, '--output',
              str(tmp_path / 'r2.json'), *paths)
  assert_one_error_line(proc, 'contract.json is not the contract',
                         'it was edited', 'restore it or re-export')
  assert not (tmp_path / 'r2.json').exists()
