"""Training losses against mmdetection 2.28.2 (``train.npz`` of the fixtures).

The RPN head outputs of the training step are not stored in ``train.npz``,
but its input equals ``chelsea.npz``'s and BN is frozen (norm_eval), so the
stored test-mode RPN maps are the training-step outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import fixture_path, load_npz
from msrcnn_jax.modeling.heads.box_head import rcnn_loss
from msrcnn_jax.modeling.heads.mask_head import mask_loss
from msrcnn_jax.modeling.heads.maskiou_head import maskiou_loss
from msrcnn_jax.modeling.roi_heads import select_class
from msrcnn_jax.modeling.rpn import rpn_loss


def _train(set_name):
  with np.load(fixture_path(set_name, 'train.npz')) as d:
    return {k: d[k] for k in d.files}


def _rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def test_rpn_loss_matches_mmdet(tiny_set):
  d = _train(tiny_set)
  c = load_npz(tiny_set, 'chelsea')
  np.testing.assert_array_equal(c['input'], d['input'])
  cls = [c[f'rpn_cls_p{l}'].transpose(0, 2, 3, 1) for l in range(2, 7)]
  reg = [c[f'rpn_reg_p{l}'].transpose(0, 2, 3, 1) for l in range(2, 7)]
  labels = (d['rpn.targets.0'] == 0).astype(np.float32)[None]
  out = jax.jit(rpn_loss)(cls, reg, labels, d['rpn.targets.1'][None],
                          d['rpn.targets.2'][None],
                          d['rpn.targets.3'][None])
  for lvl in range(5):
    want_cls = d[f'rpn.loss.loss_rpn_cls.{lvl}']
    want_box = d[f'rpn.loss.loss_rpn_bbox.{lvl}']
    assert _rel(out['loss_rpn_cls_levels'][lvl], want_cls) < 1e-4
    if want_box == 0:
      assert float(out['loss_rpn_bbox_levels'][lvl]) == 0.0
    else:
      assert _rel(out['loss_rpn_bbox_levels'][lvl], want_box) < 1e-4
  assert _rel(out['loss_rpn_cls'], d['losses.loss_rpn_cls']) < 1e-4
  assert _rel(out['loss_rpn_bbox'], d['losses.loss_rpn_bbox']) < 1e-4


def test_rpn_loss_hand_case_and_batch_normaliser():
  # Two images, one level of 1x1x2 anchors. Image 0: anchor 0 positive,
  # anchor 1 negative; image 1: no sample at all (max(#,1) still counts).
  cls = [jnp.array([[[[2.0, -1.0]]], [[[5.0, 5.0]]]])]
  reg = [jnp.array([[[[0.5, 0, 0, 0, 9, 9, 9, 9]]], [[[9.0] * 8]]])]
  labels = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  lw = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  bt = jnp.zeros((2, 2, 4)).at[0, 0, 0].set(0.25)
  bw = jnp.zeros((2, 2, 4)).at[0, 0].set(1.0)
  out = rpn_loss(cls, reg, labels, lw, bt, bw)
  avg = 4.0   # (1 + 1) + (max(0,1) + max(0,1))
  want_cls = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / avg
  np.testing.assert_allclose(out['loss_rpn_cls'], want_cls, rtol=1e-6)
  np.testing.assert_allclose(out['loss_rpn_bbox'], 0.25 / avg, rtol=1e-6)


def test_rcnn_loss_matches_mmdet(tiny_set):
  d = _train(tiny_set)
  out = jax.jit(rcnn_loss)(d['rcnn.head_out.0'], d['rcnn.head_out.1'],
                           d['rcnn.targets.0'], d['rcnn.targets.1'],
                           d['rcnn.targets.2'], d['rcnn.targets.3'])
  assert _rel(out['loss_cls'], d['rcnn.loss.loss_cls']) < 1e-4
  assert _rel(out['loss_bbox'], d['rcnn.loss.loss_bbox']) < 1e-4
  np.testing.assert_allclose(out['acc'], d['rcnn.loss.acc'][0], atol=1e-3)


def test_rcnn_loss_ignores_padding(tiny_set):
  d = _train(tiny_set)
  pad = 64
  cls = np.concatenate([d['rcnn.head_out.0'],
                        np.full((pad, 81), 7.0, np.float32)])
  box = np.concatenate([d['rcnn.head_out.1'],
                        np.full((pad, 320), 7.0, np.float32)])
  labels = np.concatenate([d['rcnn.targets.0'], np.zeros(pad, np.int64)])
  lw = np.concatenate([d['rcnn.targets.1'], np.zeros(pad, np.float32)])
  bt = np.concatenate([d['rcnn.targets.2'], np.ones((pad, 4), np.float32)])
  bw = np.concatenate([d['rcnn.targets.3'], np.ones((pad, 4), np.float32)])
  out = rcnn_loss(cls[None], box[None], labels[None], lw[None], bt[None],
                  bw[None])
  assert _rel(out['loss_cls'], d['rcnn.loss.loss_cls']) < 1e-4
  assert _rel(out['loss_bbox'], d['rcnn.loss.loss_bbox']) < 1e-4


def _pos(d):
  gt = d['rcnn.sample.pos_assigned_gt_inds']
  return d['gt_labels'][gt]


def test_mask_loss_matches_mmdet(tiny_set):
  d = _train(tiny_set)
  labels = jnp.asarray(_pos(d))
  logits = select_class(jnp.asarray(d['mask.pred'].transpose(0, 2, 3, 1)),
                        labels)
  p = labels.shape[0]
  got = mask_loss(logits, d['mask.targets'], jnp.ones((p,), bool))
  assert _rel(got, d['mask.loss.loss_mask'][0]) < 1e-4
  # Padded rows contribute nothing; no positive gives 0.
  pad_logits = jnp.concatenate([logits, jnp.full((3, 28, 28), 4.0)])
  pad_t = np.concatenate([d['mask.targets'], np.zeros((3, 28, 28))])
  valid = jnp.arange(p + 3) < p
  assert _rel(mask_loss(pad_logits, pad_t, valid),
              d['mask.loss.loss_mask'][0]) < 1e-4
  assert float(mask_loss(pad_logits, pad_t, valid & False)) == 0.0


def test_maskiou_loss_matches_mmdet(tiny_set):
  d = _train(tiny_set)
  labels = jnp.asarray(_pos(d))
  pred = select_class(jnp.asarray(d['maskiou.pred']), labels)
  p = labels.shape[0]
  got = maskiou_loss(pred, jnp.asarray(d['maskiou.targets']),
                     jnp.ones((p,), bool))
  assert _rel(got, d['maskiou.loss.loss_mask_iou']) < 1e-4
  # Zero targets (and padding) are excluded; none at all gives 0.
  valid = jnp.ones((p,), bool).at[0].set(False)
  t = jnp.asarray(d['maskiou.targets'])
  sel = np.asarray(valid & (t > 0))
  want = 0.5 * np.mean((np.asarray(pred)[sel] - np.asarray(t)[sel]) ** 2)
  np.testing.assert_allclose(maskiou_loss(pred, t, valid), want, rtol=1e-6)
  assert float(maskiou_loss(pred, jnp.zeros((p,)), valid)) == 0.0


def test_loss_gradients_are_finite_and_zero_on_padding():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  p = 6
  valid = jnp.arange(p) < 4
  labels = jnp.array([3, 0, 79, 5, 0, 0])
  targets = (jax.random.uniform(k1, (p, 28, 28)) > 0.5).astype(jnp.float32)
  iou_t = jnp.array([0.5, 0.0, 0.8, 0.3, 0.9, 0.9])

  def total(mask_logits, iou_pred, cls, box):
    m = select_class(mask_logits, labels)
    out = mask_loss(m, targets, valid)
    out += maskiou_loss(select_class(iou_pred, labels), iou_t, valid)
    r = rcnn_loss(cls, box, jnp.where(valid, labels, 80),
                  valid.astype(jnp.float32), jnp.ones((p, 4)),
                  jnp.ones((p, 4)) * valid[:, None])
    return out + r['loss_cls'] + r['loss_bbox']

  args = (jax.random.normal(k2, (p, 28, 28, 80)),
          jax.random.uniform(k3, (p, 80)), jnp.zeros((p, 81)),
          jnp.zeros((p, 320)))
  grads = jax.grad(total, argnums=(0, 1, 2, 3))(*args)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    assert not np.asarray(g)[4:].any()
  gm = np.asarray(grads[0])
  # Only each RoI's GT-class channel gets a mask gradient.
  assert gm[0, :, :, 3].any() and not np.delete(gm[0], 3, axis=-1).any()
  # MaskIoU: RoI 1 has target 0 -> excluded.
  assert not np.asarray(grads[1])[1].any() and np.asarray(grads[1])[0, 3]
