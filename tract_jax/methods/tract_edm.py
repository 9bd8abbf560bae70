"""TRACT with EDM teachers (docs/SPEC_EDM.md sections 3-4): TRACT's schedule rule on EDM's sigma
grid; phase 0's teacher (the original EDM teacher) takes Heun steps, a later phase's teacher (the
previous student) its own section-2 steps (the release has one phase only). The release's optimiser
(warm-up in samples, no clipping by default), optional student dropout, and non-finite gradient
entries replaced before each update."""
import jax.numpy as jnp

from tract_jax import edm, state
from tract_jax.methods import base, parametrisations, tract


def validate_schedule(schedule, teacher_steps: int) -> base.Schedule:
  parametrisations.check_grid_steps(teacher_steps)
  return tract.validate_schedule(schedule, teacher_steps)


def make_optimizer(config):
  """Adam of the release: lr ramps over optimizer.warmup_samples training samples (as EDM counts
  them); global-norm clipping only if optimizer.grad_clip > 0 (the release has none)."""
  opt = config.optimizer
  return state.make_optimizer(opt.learning_rate, grad_clip=opt.grad_clip, b1=opt.b1, b2=opt.b2,
                              eps=opt.eps, warmup_samples=opt.warmup_samples,
                              batch_size=config.batch_size)


def make_loss(config, model, teacher_model, plan):
  net, teacher_net = edm.make_network(model), edm.make_network(teacher_model)
  table = jnp.asarray(plan.phase_table())
  grid = edm.Grid(plan.teacher_steps)

  def loss_fn(params, state, batch, rng):
    heun = True if plan.num_phases == 1 else state.phase == 0
    return edm.tract_loss(params, net, grid, state.teacher_params, state.sema_params,
                          batch['image'], base.labels(batch, config), rng, table[state.phase],
                          teacher_heun=heun, clip_x=config.clip_x,
                          reduction=config.loss_reduction, teacher_net=teacher_net,
                          dropout=config.student_dropout > 0)

  return loss_fn


METHOD = base.Method(name='tract_edm', parametrisation=parametrisations.EDM,
                     make_optimizer=make_optimizer, make_loss=make_loss,
                     schedule=validate_schedule, default_schedule=tract.one_phase,
                     has_self_teacher=True, student_dropout=True, warmup_in_samples=True,
                     sanitize_grads=True)
