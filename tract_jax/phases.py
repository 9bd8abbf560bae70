"""Time schedules and the phase plan of a distillation run (spec sections 3-5).

A schedule S = (S_0 > S_1 > ... > S_K) with S_0 = T: phase k distils an S_k-step teacher into an
S_{k+1}-step student. TRACT takes any such schedule whose entries divide T; BTD halves every phase.
The total training length (samples) is split equally between the phases.
"""
import dataclasses
import math
from typing import Tuple

import numpy as np

from tract_jax.errors import ConfigError


def parse_schedule(text, field: str = 'time_schedule') -> Tuple[int, ...]:
  """'1024,32,1' -> (1024, 32, 1). Accepts a string or a sequence of ints."""
  if isinstance(text, str):
    parts = [p.strip() for p in text.split(',') if p.strip()]
    try:
      values = tuple(int(p) for p in parts)
    except ValueError:
      raise ConfigError(f'{field}={text!r}: expected comma-separated integers such as "1024,32,1"') from None
  else:
    values = tuple(int(v) for v in text)
  return values


def validate_tract_schedule(schedule: Tuple[int, ...], teacher_steps: int,
                            field: str = 'time_schedule') -> Tuple[int, ...]:
  text = ','.join(str(s) for s in schedule)
  if len(schedule) < 2:
    raise ConfigError(f'{field}={text!r}: needs at least two entries (teacher steps, student steps), '
                      f'e.g. "{teacher_steps},1"')
  if schedule[0] != teacher_steps:
    raise ConfigError(f'{field}={text!r}: the first entry must equal teacher_steps={teacher_steps}')
  if any(s < 1 for s in schedule):
    raise ConfigError(f'{field}={text!r}: every entry must be a positive integer')
  if any(a <= b for a, b in zip(schedule, schedule[1:])):
    raise ConfigError(f'{field}={text!r}: entries must be strictly decreasing')
  bad = [s for s in schedule if teacher_steps % s]
  if bad:
    raise ConfigError(f'{field}={text!r}: every entry must divide teacher_steps={teacher_steps}; '
                      f'{bad} do not')
  return schedule


def btd_schedule(teacher_steps: int, final_steps: int = 1) -> Tuple[int, ...]:
  """T, T/2, ..., final_steps (progressive distillation halves the step count every phase)."""
  if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
    raise ConfigError(f'teacher_steps={teacher_steps}: BTD halves the step count each phase, so it '
                      'must be a power of two >= 2')
  out = [teacher_steps]
  while out[-1] > final_steps:
    out.append(out[-1] // 2)
  if out[-1] != final_steps:
    raise ConfigError(f'time_schedule: BTD cannot reach {final_steps} steps by halving {teacher_steps}')
  return tuple(out)


def validate_btd_schedule(schedule: Tuple[int, ...], teacher_steps: int) -> Tuple[int, ...]:
  text = ','.join(str(s) for s in schedule)
  if len(schedule) < 2 or schedule[0] != teacher_steps or any(
      a != 2 * b for a, b in zip(schedule, schedule[1:])):
    raise ConfigError(f'time_schedule={text!r}: BTD schedules halve each phase from teacher_steps='
                      f'{teacher_steps} (e.g. "{teacher_steps},{teacher_steps // 2},..."); '
                      'leave it empty to go down to 1 step')
  return schedule


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """Everything the loop needs to know about the phases of one run."""
  method: str                      # 'tract', 'tract_edm' or 'btd'
  teacher_steps: int               # T
  schedule: Tuple[int, ...]        # S_0 = T > ... > S_K
  steps_per_phase: int
  ema_momentum: float              # evaluation EMA momentum

  @property
  def num_phases(self) -> int:
    return len(self.schedule) - 1

  @property
  def total_steps(self) -> int:
    return self.num_phases * self.steps_per_phase

  def student_steps(self, phase: int) -> int:
    return self.schedule[phase + 1]

  def phase_of_step(self, step: int) -> int:
    """Phase that the update number `step` (0-based) belongs to."""
    return min(step // self.steps_per_phase, self.num_phases - 1)

  def phase_table(self) -> np.ndarray:
    """int32 (K, 3): per phase, teacher step and student step in grid units, student step count.

    Row k = (T / S_k, T / S_{k+1}, S_{k+1}). The jitted steps index it with the phase number, so one
    compiled step serves every phase.
    """
    rows = [(self.teacher_steps // a, self.teacher_steps // b, b)
            for a, b in zip(self.schedule, self.schedule[1:])]
    return np.asarray(rows, np.int32)


def make_plan(method: str, teacher_steps: int, time_schedule, train_samples: int, batch_size: int,
              ema_residual: float) -> PhasePlan:
  if method not in ('tract', 'tract_edm', 'btd'):
    raise ConfigError(f"method={method!r}: a phase plan exists for 'tract', 'tract_edm' and 'btd' "
                      'only')
  if teacher_steps < 1:
    raise ConfigError(f'teacher_steps={teacher_steps}: must be a positive integer')
  if method == 'tract_edm' and teacher_steps < 2:
    raise ConfigError(f'teacher_steps={teacher_steps}: the EDM noise grid needs at least 2 steps '
                      '(the release uses 40)')
  schedule = parse_schedule(time_schedule)
  if method in ('tract', 'tract_edm'):
    schedule = validate_tract_schedule(schedule, teacher_steps)
  elif schedule:
    schedule = validate_btd_schedule(schedule, teacher_steps)
  else:
    schedule = btd_schedule(teacher_steps)
  if batch_size < 1:
    raise ConfigError(f'batch_size={batch_size}: must be a positive integer')
  num_phases = len(schedule) - 1
  steps_per_phase = int(train_samples) // (batch_size * num_phases)
  if steps_per_phase < 1:
    raise ConfigError(f'train_samples={train_samples}: too small for {num_phases} phases at '
                      f'batch_size={batch_size} (need at least {batch_size * num_phases})')
  if not 0.0 < ema_residual < 1.0:
    raise ConfigError(f'ema_residual={ema_residual}: must be in (0, 1)')
  momentum = math.exp(math.log(ema_residual) / steps_per_phase)
  return PhasePlan(method, teacher_steps, schedule, steps_per_phase, momentum)
