"""The method record, and what several records share.

A method is one `Method`: its name (config.method), its parametrisation (how its networks are read
and sampled, methods/parametrisations.py), its time-schedule rule, its optimiser, its loss closure
and a few flags. Everything else in the package (phases, config_checks, steps, train, evaluator,
export, the benchmarks) asks the record and never compares method names.
"""
import dataclasses
from typing import Any, Callable, Optional, Tuple

from tract_jax import state
from tract_jax.errors import ConfigError

Schedule = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Parametrisation:
  """How a network is conditioned and sampled: DDIM's cosine VP schedule or EDM's sigma grid.

  make_denoiser(model, config) -> denoise(params, x, t_or_sigma, labels, dropout_rng=None) -> x_hat.
  make_sampler(model, config) -> jitted sample(params, noise (B, H, W, C), num_steps, labels (B,) or
    None) -> (B, H, W, C) images in [-1, 1]; num_steps is traced (one compile for every count).
  sampler_sidecar(config, num_steps) -> the JSON fields export writes so that a file can be sampled
    without this package (network inputs, schedule or grid, the step rule).
  check_config(config): its start-up checks (ConfigError, one line).
  """
  name: str                  # what config.parametrisation says: 'ddim' or 'edm'
  label: str                 # how tables name its sampler: 'DDIM', 'EDM'
  make_denoiser: Callable
  make_sampler: Callable
  sampler_sidecar: Callable
  check_config: Callable[[Any], None]


def _no_checks(config) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  make_optimizer(config) -> optax.GradientTransformation.
  make_loss(config, model, teacher_model, plan) -> loss_fn(params, state, batch, rng) ->
    (loss, metrics): `model` is the network being trained (dropout as the builder chose),
    `teacher_model` the frozen teacher's (its computation dtype; None for a teacher job), `plan`
    the phases.PhasePlan (None for a teacher job). The batch is {'image': (B, H, W, C) float32,
    'label': (B,) int32}; `state` is the steps.TrainState whose teacher, self-teacher and phase
    the loss may read.
  schedule(time_schedule, teacher_steps) -> the validated schedule S_0 = T > ... > S_K from
    config.time_schedule (text or ints; ConfigError, one line, otherwise); None for a method that
    trains a teacher.
  default_schedule(teacher_steps) -> the schedule the benchmarks time when the config is written
    for another method.
  check_config(config): start-up checks of this method only.
  """
  name: str
  parametrisation: Parametrisation
  make_optimizer: Callable
  make_loss: Callable
  schedule: Optional[Callable[[Any, int], Schedule]] = None
  default_schedule: Optional[Callable[[int], Schedule]] = None
  has_self_teacher: bool = False   # a self-teacher EMA (config.sema) in the state
  student_dropout: bool = False    # config.student_dropout applies to the student
  warmup_in_samples: bool = False  # optimizer.warmup_samples, not optimizer.warmup_steps
  sanitize_grads: bool = False     # non-finite gradient entries replaced (state.finite_grads)
  check_config: Callable[[Any], None] = _no_checks

  @property
  def distils(self) -> bool:
    """True for a distillation method (it has phases); False for teacher training."""
    return self.schedule is not None


# ---- what several records share ----------------------------------------------------------------
def labels(batch, config):
  """The batch's class labels (B,) for a class-conditional model, else None."""
  return batch['label'] if config.model.num_classes else None


def parse_schedule(text, field: str = 'time_schedule') -> Schedule:
  """'1024,32,1' -> (1024, 32, 1). Accepts a string or a sequence of ints."""
  if not isinstance(text, str):
    return tuple(int(v) for v in text)
  parts = [p.strip() for p in text.split(',') if p.strip()]
  try:
    return tuple(int(p) for p in parts)
  except ValueError:
    raise ConfigError(f'{field}={text!r}: expected comma-separated integers such as '
                      '"1024,32,1"') from None


def teacher_optimizer(config):
  """Teacher training's Adam (spec section 6): config.teacher_training's rate, warm-up (in steps)
  and clipping, config.optimizer's moments."""
  tc, opt = config.teacher_training, config.optimizer
  return state.make_optimizer(tc.learning_rate, tc.warmup_steps, tc.grad_clip, opt.b1, opt.b2,
                              opt.eps)


def distillation_optimizer(config):
  """TRACT's and BTD's Adam (spec section 3): config.optimizer, warm-up counted in steps."""
  opt = config.optimizer
  return state.make_optimizer(opt.learning_rate, opt.warmup_steps, opt.grad_clip, opt.b1, opt.b2,
                              opt.eps)
