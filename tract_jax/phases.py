"""The phase plan of a distillation run (spec sections 3-5).

A schedule S = (S_0 > S_1 > ... > S_K) with S_0 = T: phase k distils an S_k-step teacher into an
S_{k+1}-step student. Each method's record (methods/) owns its schedule rule (TRACT: entries that
divide T; BTD: halving). The total training length (samples) is split equally between the phases.
"""
import dataclasses
import math
from typing import Tuple

import numpy as np

from tract_jax import methods
from tract_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """Everything the loop needs to know about the phases of one run."""
  method: str                      # the distillation method's name (methods.REGISTRY)
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
  """The plan of distillation method `method` (a name in methods.REGISTRY); time_schedule is text
  ('1024,32,1') or a sequence, checked by the method's schedule rule."""
  record = methods.get(method)
  if not record.distils:
    raise ConfigError(f'method={method!r}: a phase plan exists for '
                      f'{", ".join(map(repr, methods.distilling_names()))} only')
  if teacher_steps < 1:
    raise ConfigError(f'teacher_steps={teacher_steps}: must be a positive integer')
  schedule = record.schedule(time_schedule, teacher_steps)
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
  return PhasePlan(record.name, teacher_steps, schedule, steps_per_phase, momentum)


def plan_of(config, method: str = None, time_schedule=None) -> PhasePlan:
  """The plan of a config: its method (or `method`) and time_schedule (or `time_schedule`)."""
  return make_plan(method or config.method, config.teacher_steps,
                   config.time_schedule if time_schedule is None else time_schedule,
                   config.train_samples, config.batch_size, config.ema_residual)
