"""BTD, progressive distillation (spec section 4): every phase halves the step count, T, T/2, ...;
the student matches the two-step target of its frozen teacher."""
import jax.numpy as jnp

from tract_jax import losses
from tract_jax.errors import ConfigError
from tract_jax.methods import base, parametrisations


def halving_schedule(teacher_steps: int, final_steps: int = 1) -> base.Schedule:
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


def validate_schedule(schedule, teacher_steps: int) -> base.Schedule:
  """An explicit halving schedule from T, or '' (halve down to 1 step)."""
  schedule = base.parse_schedule(schedule)
  if not schedule:
    return halving_schedule(teacher_steps)
  text = ','.join(str(s) for s in schedule)
  if len(schedule) < 2 or schedule[0] != teacher_steps or any(
      a != 2 * b for a, b in zip(schedule, schedule[1:])):
    raise ConfigError(f'time_schedule={text!r}: BTD schedules halve each phase from teacher_steps='
                      f'{teacher_steps} (e.g. "{teacher_steps},{teacher_steps // 2},..."); '
                      'leave it empty to go down to 1 step')
  return schedule


def make_loss(config, model, teacher_model, plan):
  """The BTD loss against the state's frozen teacher of its phase (phase row traced)."""
  ddim = parametrisations.DDIM
  denoise, teacher_denoise = ddim.make_denoiser(model, config), ddim.make_denoiser(teacher_model,
                                                                                  config)
  table = jnp.asarray(plan.phase_table())

  def loss_fn(params, state, batch, rng):
    return losses.btd_loss(params, denoise, state.teacher_params, batch['image'],
                           base.labels(batch, config), rng, table[state.phase],
                           teacher_steps=plan.teacher_steps, reduction=config.loss_reduction,
                           teacher_denoise=teacher_denoise)

  return loss_fn


METHOD = base.Method(name='btd', parametrisation=parametrisations.DDIM,
                     make_optimizer=base.distillation_optimizer, make_loss=make_loss,
                     schedule=validate_schedule, default_schedule=halving_schedule)
