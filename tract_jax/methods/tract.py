"""TRACT (spec section 5): a schedule T = S_0 > S_1 > ... > S_K whose entries divide T; each phase
distils its S_k-step teacher into an S_{k+1}-step student against the two-step target of the
teacher and the self-teacher (an EMA of the student)."""
import jax.numpy as jnp

from tract_jax import losses
from tract_jax.errors import ConfigError
from tract_jax.methods import base, parametrisations


def validate_schedule(schedule, teacher_steps: int, field: str = 'time_schedule') -> base.Schedule:
  """TRACT's rule (also TRACT-EDM's): at least two entries, S_0 = T, strictly decreasing, every
  entry dividing T."""
  schedule = base.parse_schedule(schedule, field)
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


def one_phase(teacher_steps: int) -> base.Schedule:
  """T -> 1 in one phase."""
  return (int(teacher_steps), 1)


def make_loss(config, model, teacher_model, plan):
  """The TRACT loss against the state's frozen teacher and self-teacher of its phase; the phase row
  is read from the state (a traced value), so one compiled step serves every phase."""
  ddim = parametrisations.DDIM
  denoise, teacher_denoise = ddim.make_denoiser(model, config), ddim.make_denoiser(teacher_model,
                                                                                  config)
  table = jnp.asarray(plan.phase_table())

  def loss_fn(params, state, batch, rng):
    return losses.tract_loss(params, denoise, state.teacher_params, state.sema_params,
                             batch['image'], base.labels(batch, config), rng, table[state.phase],
                             teacher_steps=plan.teacher_steps, reduction=config.loss_reduction,
                             clip_x=config.clip_x, teacher_denoise=teacher_denoise)

  return loss_fn


METHOD = base.Method(name='tract', parametrisation=parametrisations.DDIM,
                     make_optimizer=base.distillation_optimizer, make_loss=make_loss,
                     schedule=validate_schedule, default_schedule=one_phase,
                     has_self_teacher=True)
