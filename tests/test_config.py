"""The config schema: every key read, wrong keys and values refused by name.

- ``--config.<unknown key>`` on train.py ends in one ``error:`` line naming
  the key (config_flags alone gives a traceback);
- ``validate`` refuses keys a config file adds, values nothing implements,
  class lists that disagree with ``model.num_classes`` and keys that do not
  apply to the chosen source / optimizer;
- every leaf key of the schema is read somewhere in the package;
- ``rpn_head.target_stds`` decodes the proposals (not only the targets);
- the case ``ncls_off_by_one`` (a 4-category COCO directory, a 3-class
  config; mmdetection's NumClassCheckHook) is refused before the first step
  with one ``error:`` line naming the categories and the model's count.
Cost: about 15 s (two train.py subprocesses that stop at start-up).
"""

import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from msrcnn_jax import config as config_lib
from msrcnn_jax.modeling import build
from msrcnn_jax.modeling.rpn import RPN, get_proposals

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CASE = os.path.join(_ROOT, 'tests', 'fixtures', 'cases', 'ncls_off_by_one')


def _train(tmp_path, *overrides):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONWARNINGS='ignore')
  return subprocess.run(
      [sys.executable, 'train.py', f'--workdir={tmp_path / "run"}',
       *overrides], cwd=_ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)


def test_unknown_override_is_one_error_line(tmp_path):
  proc = _train(tmp_path, '--config.model.roi_head.foo=1')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: unknown config key model.roi_head.foo')
  with pytest.raises(config_lib.ConfigError,
                     match='did you mean model.num_classes'):
    config_lib.check_override_flags(['--config.model.num_clases=3'])
  config_lib.check_override_flags(['--config=x.py', '--config.seed=1',
                                   '--config.data.synthetic.cache=True'])


def _refused(config, needle):
  with pytest.raises(config_lib.ConfigError, match=re.escape(needle)):
    build.validate_config(config)


def test_validate_names_the_key():
  build.validate_config(config_lib.ms_rcnn_config())
  c = config_lib.ms_rcnn_config()
  c.model.roi_head.bbox_head.num_classes = 3      # no longer a key
  _refused(c, 'unknown config key model.roi_head.bbox_head.num_classes')
  c = config_lib.ms_rcnn_config()
  c.model.roi_head.mask_roi_extractor.aligned = False
  _refused(c, 'model.roi_head.mask_roi_extractor: only mmcv RoIAlign')
  c = config_lib.ms_rcnn_config()
  c.model.num_classes = 3
  _refused(c, 'data.category_ids lists 80 entries but model.num_classes is 3')
  c = config_lib.ms_rcnn_config()
  c.data.update(source='synthetic', coco_dir='/data/coco')
  _refused(c, "data.coco_dir='/data/coco' does not apply with "
           "data.source='synthetic'")
  c = config_lib.ms_rcnn_config()
  c.train.update(optimizer='adamw', momentum=0.8)
  _refused(c, "train.momentum=0.8 does not apply with train.optimizer='adamw'")
  c = config_lib.ms_rcnn_config()
  c.train.init_skip_patterns = config_lib.FINETUNE_SKIP_PATTERNS
  _refused(c, 'does not apply without train.init_checkpoint')
  c = config_lib.ms_rcnn_config()
  c.model.backbone.base_channels = 32
  _refused(c, 'model.neck.in_channels is [256, 512, 1024, 2048] but the '
           'backbone gives [128, 256, 512, 1024] channels')
  c = config_lib.ms_rcnn_config()
  c.train.rcnn.mask_size = 14
  _refused(c, 'train.rcnn.mask_size is 14')


def test_every_schema_key_is_read():
  sources = []
  for folder, _, files in os.walk(os.path.join(_ROOT, 'msrcnn_jax')):
    for f in files:
      if f.endswith('.py') and f != 'config.py':
        with open(os.path.join(folder, f)) as fh:
          sources.append(fh.read())
  text = '\n'.join(sources)
  unread = []
  for path in config_lib._leaves(config_lib.ms_rcnn_config()):  # pylint: disable=protected-access
    name = path.rsplit('.', 1)[-1]
    if not re.search(rf"(\.{name}\b|'{name}')", text):
      unread.append(path)
  # Read only by validate(), which refuses any other value.
  refused_only = {'sampling_ratio', 'aligned'}
  assert [p for p in unread
          if p.rsplit('.', 1)[-1] not in refused_only] == [], unread


def test_rpn_target_stds_decode_the_proposals():
  c = config_lib.ms_rcnn_config()
  rs = np.random.RandomState(0)
  sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
  cls = [jnp.asarray(rs.randn(1, h, w, 3), jnp.float32) for h, w in sizes]
  reg = [jnp.asarray(rs.randn(1, h, w, 12) * 0.5, jnp.float32)
         for h, w in sizes]
  shape = jnp.asarray([[32, 32]], jnp.int32)
  kw = dict(strides=(4, 8, 16, 32, 64), scales=(8,), ratios=(0.5, 1., 2.),
            nms_pre=1000, max_per_img=1000, iou_threshold=0.7)
  for stds in ((1., 1., 1., 1.), (0.5, 0.5, 2., 2.)):
    c.model.rpn_head.target_stds = list(stds)
    out = RPN(c.model.rpn_head).apply({}, cls, reg, shape, shape, c.test.rpn,
                                      method=RPN.proposals)
    ours = (out['boxes'], out['scores'], out['valid'])
    ref = get_proposals(cls, reg, img_shape=shape, pad_shape=shape,
                        target_stds=stds, **kw)
    for a, b in zip(ours, ref):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  unit = get_proposals(cls, reg, img_shape=shape, pad_shape=shape, **kw)
  assert not np.array_equal(np.asarray(unit[0]), np.asarray(ours[0]))


def test_dataset_with_more_categories_than_the_model_is_refused(tmp_path):
  proc = _train(tmp_path, '--config.data.source=coco',
                f'--config.data.coco_dir={_CASE}',
                '--config.data.train_split=train',
                '--config.data.val_split=val')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert (f'{_CASE} (train) has 4 categories (1:cat1, 2:cat2, 3:cat3, '
          '4:cat4) but the model has model.num_classes=3') in errors[0]
  assert 'step 1/' not in proc.stdout + proc.stderr
  # Same count, other ids: predictions would name the wrong categories.
  c = config_lib.ms_rcnn_config()
  with pytest.raises(config_lib.ConfigError, match=r'category ids \(2, 3'):
    config_lib.check_dataset_classes(
        c, tuple(range(2, 82)), tuple(map(str, range(80))), 'ds')
