"""benchmarks/throughput.py times every method through the shared step builder, TRACT-EDM
included, and compiles from abstract shapes (in-process, tiny models)."""
import os
import sys

import pytest

from conftest import tiny_config
from tiny import tiny_edm_job_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))

import throughput  # noqa: E402  (benchmarks/throughput.py)
from tract_jax.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.slow  # benchmark runs: compiles of every method's step


def _tiny(method, **overrides):
  return tiny_config(method, **overrides)


def test_edm_methods_are_timed():
  config = tiny_edm_job_config()  # the slow tier's end-to-end EDM run: its steps' programs
  assert throughput.default_what(config) == ['teacher', 'tract_edm', 'sample']
  result = throughput.run_benchmarks(config, 8, 1, sample_steps=[1, 2], peak_size=64,
                                     log=lambda *a: None)
  rows = {r['name']: r for r in result['benchmarks']}
  assert list(rows) == ['teacher step', 'tract_edm step', 'EDM 1 step', 'EDM 2 steps']
  assert rows['tract_edm step']['note'] == 'schedule 8,2,1'
  for row in rows.values():
    assert row['ms_per_call'] > 0 and row['flops_per_call'] > 0
  # TRACT-EDM: Heun teacher (2 calls, lax.cond with the Euler branch counted at its costliest),
  # self-teacher, student forward and backward: more than a teacher step's forward and backward.
  assert rows['tract_edm step']['flops_per_call'] > 1.4 * rows['teacher step']['flops_per_call']


def test_compile_only_with_remat_and_one_line_errors():
  config = _tiny('btd', time_schedule='')
  result = throughput.run_benchmarks(config, 8, 1, what=['tract'], compile_only=True,
                                     remat='blocks', log=lambda *a: None)
  (row,) = result['benchmarks']
  assert row['name'] == 'tract step' and 'ms_per_call' not in row
  assert row['note'] == 'schedule 16,1'  # the config is BTD's: TRACT's default schedule, T -> 1
  assert 0 < row['flops_per_call'] <= row['lowered_flops']  # model FLOPs: without remat's recompute
  with pytest.raises(ConfigError, match="allowed with method 'teacher' or 'tract_edm', not 'btd'"):
    throughput.run_benchmarks(_tiny('tract_edm', parametrisation='edm', teacher_steps=8,
                                    time_schedule='8,1'), 8, 1, what=['btd'], compile_only=True)
  with pytest.raises(ConfigError, match='--what: unknown'):
    throughput.run_benchmarks(config, 8, 1, what=['tract', 'nope'], compile_only=True)
