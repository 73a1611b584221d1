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
timed image.
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


def main():
  script = sys.argv[1]
  sys.argv = sys.argv[1:]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  time.perf_counter = _marking_perf_counter
  try:
    runpy.run_path(script, run_name='__main__')
  finally:
    time.perf_counter = _perf_counter
  cpu = [b - a for a, b in zip(_marks[0::2], _marks[1::2])]
  print(f'CPU s/img: min {min(cpu):.3f}, median {statistics.median(cpu):.3f} '
        f'(n={len(cpu)}); load average {os.getloadavg()}')


if __name__ == '__main__':
  main()
