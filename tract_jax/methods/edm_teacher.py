"""Teacher training with the EDM parametrisation (docs/SPEC_EDM.md; for the demo and user-trained
teachers): EDM's loss, ln sigma ~ N(-1.2, 1.2^2), weighted to F space."""
from tract_jax import edm
from tract_jax.methods import base, parametrisations, teacher


def make_loss(config, model, teacher_model, plan):
  del teacher_model, plan
  tc = config.teacher_training
  net = edm.make_network(model)

  def loss_fn(params, state, batch, rng):
    del state
    return edm.teacher_loss(params, net, batch['image'], base.labels(batch, config), rng,
                            reduction=tc.loss_reduction, dropout=tc.dropout > 0)

  return loss_fn


METHOD = base.Method(name='teacher', parametrisation=parametrisations.EDM,
                     make_optimizer=base.teacher_optimizer, make_loss=make_loss,
                     check_config=teacher.check_config)
