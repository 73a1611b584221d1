r"""mmdetection's seconds per image with CPU seconds beside the wall ones.

  THREADS=2 MMDET_ENV/bin/python benchmarks/mmdet_cpu_seconds.py \
      ../shared/tools/bench_mmdet.py CASE_DIR CONFIG_NAME IMAGE [N]

Runs ``bench_mmdet.py`` (mmdetection 2.28.2 ``simple_test`` incl. mask
pasting, batch 1; in the reference environment of
``../shared/tools/setup_mmdet_reference.sh``) unchanged and, after its own
line (wall median / min / max), prints the CPU seconds (``process_time``:
all threads of the process) of the same timed calls, min and median, and
the load average: the figures to set beside ``benchmarks/inference.py
--image`` on the same image and checkpoint. It records ``process_time`` at
every ``time.perf_counter`` call of the script, which calls it twice per
timed image. Also prints, per stage of ``simple_test``, the min / median
wall and CPU seconds of the timed calls (the warm-up call left out):
backbone + FPN (``extract_feat``), RPN + proposals (``simple_test_rpn``),
the RoI box stage (``simple_test_bboxes``), the mask stage (mask head,
MaskIoU head and pasting: ``MaskScoringRoIHead.simple_test_mask``) and, of
it, the pasting (``FCNMaskHead.get_seg_masks``).
"""

import os
import runpy
import statistics
import sys
import time

_marks = []
_perf_counter = time.perf_counter


def _marking_perf_counter():
  _marks.append(time.process_time())
  return _perf_counter()


def _timed_stages():
  """Wraps simple_test's stages; returns {stage: [(wall, cpu) per call]}."""
  # pylint: disable=g-import-not-at-top
  from mmdet.models.dense_heads import dense_test_mixins
  from mmdet.models.detectors.two_stage import TwoStageDetector
  from mmdet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
  from mmdet.models.roi_heads.mask_scoring_roi_head import MaskScoringRoIHead
  from mmdet.models.roi_heads.test_mixins import BBoxTestMixin
  calls = {}
  for stage, owner, name in (
      ('backbone+FPN', TwoStageDetector, 'extract_feat'),
      ('RPN+proposals', dense_test_mixins.BBoxTestMixin, 'simple_test_rpn'),
      ('RoI box stage', BBoxTestMixin, 'simple_test_bboxes'),
      ('mask+MaskIoU+paste', MaskScoringRoIHead, 'simple_test_mask'),
      ('  of which paste', FCNMaskHead, 'get_seg_masks')):
    fn = getattr(owner, name)
    calls[stage] = []

    def wrapper(*a, _fn=fn, _stage=stage, **kw):
      t, c = _perf_counter(), time.process_time()
      try:
        return _fn(*a, **kw)
      finally:
        calls[_stage].append((_perf_counter() - t, time.process_time() - c))
    setattr(owner, name, wrapper)
  return calls


def main():
  script = sys.argv[1]
  sys.argv = sys.argv[1:]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  calls = _timed_stages()
  time.perf_counter = _marking_perf_counter
  try:
    runpy.run_path(script, run_name='__main__')
  finally:
    time.perf_counter = _perf_counter
  cpu = [b - a for a, b in zip(_marks[0::2], _marks[1::2])]
  print(f'CPU s/img: min {min(cpu):.3f}, median {statistics.median(cpu):.3f} '
        f'(n={len(cpu)}); load average {os.getloadavg()}')
  for stage, times in calls.items():
    wall, cpu = zip(*times[1:]) if len(times) > 1 else ((0.,), (0.,))
    print(f'  {stage:20s} wall {min(wall):6.3f} / '
          f'{statistics.median(wall):6.3f}   CPU {min(cpu):6.3f} / '
          f'{statistics.median(cpu):6.3f}')


if __name__ == '__main__':
  main()
