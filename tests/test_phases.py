"""Time schedules and phase plans."""
import math

import pytest

from tract_jax import phases
from tract_jax.errors import ConfigError


def test_paper_cifar10_plan():
  plan = phases.make_plan('tract', 1024, '1024,32,1', 96 * 2**20, 256, 1e-3)
  assert plan.schedule == (1024, 32, 1) and plan.num_phases == 2
  assert plan.steps_per_phase == 196_608
  assert round(plan.ema_momentum, 8) == 0.99996487
  assert math.isclose(plan.ema_momentum ** plan.steps_per_phase, 1e-3, rel_tol=1e-9)
  assert plan.phase_table().tolist() == [[1, 32, 32], [32, 1024, 1]]
  assert plan.phase_of_step(0) == 0 and plan.phase_of_step(196_607) == 0
  assert plan.phase_of_step(196_608) == 1 and plan.phase_of_step(10**9) == 1


def test_one_phase_schedule():
  plan = phases.make_plan('tract', 1024, '1024,1', 1000, 10, 1e-3)
  assert plan.num_phases == 1 and plan.steps_per_phase == 100
  assert plan.phase_table().tolist() == [[1, 1024, 1]]


@pytest.mark.parametrize('text,match', [
    ('1024', 'at least two'),
    ('512,1', 'first entry'),
    ('1024,32,32,1', 'strictly decreasing'),
    ('1024,1,32', 'strictly decreasing'),
    ('1024,48,1', 'divide'),
    ('1024,a,1', 'comma-separated'),
    ('1024,0', 'positive'),
])
def test_invalid_tract_schedules_name_the_value(text, match):
  with pytest.raises(ConfigError, match=match) as info:
    phases.make_plan('tract', 1024, text, 10**6, 256, 1e-3)
  assert 'time_schedule=' in str(info.value)


def test_btd_schedules():
  assert phases.make_plan('btd', 8, '', 300, 10, 1e-3).schedule == (8, 4, 2, 1)
  assert phases.make_plan('btd', 8, '8,4', 300, 10, 1e-3).schedule == (8, 4)
  with pytest.raises(ConfigError, match='halve'):
    phases.make_plan('btd', 8, '8,2', 300, 10, 1e-3)
  with pytest.raises(ConfigError, match='power of two'):
    phases.make_plan('btd', 96, '', 300, 10, 1e-3)


def test_plan_rejects_bad_sizes():
  with pytest.raises(ConfigError, match='train_samples'):
    phases.make_plan('tract', 16, '16,4,1', 10, 8, 1e-3)
  with pytest.raises(ConfigError, match='ema_residual'):
    phases.make_plan('tract', 16, '16,1', 1000, 8, 1.5)
