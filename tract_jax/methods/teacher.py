"""Teacher training with the DDIM parametrisation (spec section 6): the denoising loss
w(t) ||x_hat(z_t, t) - x||^2, t ~ U(0, 1) or on the T-grid, on the real batch."""
from tract_jax import losses
from tract_jax.errors import ConfigError
from tract_jax.methods import base, parametrisations


def make_loss(config, model, teacher_model, plan):
  del teacher_model, plan
  tc = config.teacher_training
  denoise = parametrisations.DDIM.make_denoiser(model, config)

  def loss_fn(params, state, batch, rng):
    del state
    return losses.teacher_loss(params, denoise, batch['image'], base.labels(batch, config), rng,
                               reduction=tc.loss_reduction, time_sampling=tc.time_sampling,
                               teacher_steps=config.teacher_steps, dropout=tc.dropout > 0)

  return loss_fn


def check_config(config) -> None:
  """The teacher job trains (mode=train) at least one step."""
  steps = config.teacher_training.train_steps
  if steps < 1 and config.mode == 'train':
    raise ConfigError(f'teacher_training.train_steps={steps}: the teacher job needs at least one '
                      'step')


METHOD = base.Method(name='teacher', parametrisation=parametrisations.DDIM,
                     make_optimizer=base.teacher_optimizer, make_loss=make_loss,
                     check_config=check_config)
