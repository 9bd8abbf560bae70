"""The jitted update steps: one update core, and the loss of each job plugged into it.

`make_train_step(loss_fn, ...)` builds `step(state, batch) -> (state, metrics)`: the per-step RNG
(folded from the state's key and step, so a resumed run draws the same numbers), value_and_grad of
`loss_fn(params, state, batch, rng) -> (loss, metrics)`, the optimiser step, the EMA updates, and
the non-finite guard. It is jitted once with the state donated; the distillation phase is a traced
value (a row of the phase table), so one compiled step serves every phase.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from tract_jax import edm, methods, parallel, phases
from tract_jax.state import TrainState, ema_update, finite_grads, log_momentum


def _labels(batch, conditional: bool):
  return batch['label'] if conditional else None


def teacher_loss_fn(denoise, *, reduction, time_sampling, teacher_steps, conditional, dropout):
  """Teacher training (spec section 6): the denoising loss on the real batch."""

  def loss_fn(params, state, batch, rng):
    del state
    return methods.teacher_loss(params, denoise, batch['image'], _labels(batch, conditional), rng,
                                reduction=reduction, time_sampling=time_sampling,
                                teacher_steps=teacher_steps, dropout=dropout)

  return loss_fn


def distill_loss_fn(denoise, plan: phases.PhasePlan, *, reduction, clip_x, conditional,
                    teacher_denoise=None):
  """TRACT (spec section 5) or BTD (section 4) against the state's frozen teacher of its phase.

  teacher_denoise runs the teacher and self-teacher forwards (None = `denoise`)."""
  table = jnp.asarray(plan.phase_table())

  def loss_fn(params, state: TrainState, batch, rng):
    row = table[state.phase]
    common = dict(denoise=denoise, teacher_params=state.teacher_params, x=batch['image'],
                  labels=_labels(batch, conditional), rng=rng, phase_row=row,
                  teacher_steps=plan.teacher_steps, reduction=reduction,
                  teacher_denoise=teacher_denoise)
    if plan.method == 'tract':
      return methods.tract_loss(params, sema_params=state.sema_params, clip_x=clip_x, **common)
    return methods.btd_loss(params, **common)

  return loss_fn


def edm_teacher_loss_fn(net, *, reduction, conditional, dropout):
  """EDM teacher training (docs/SPEC_EDM.md, for the demo and user-trained teachers): EDM's loss.
  net: edm.make_network(model)."""

  def loss_fn(params, state, batch, rng):
    del state
    return edm.teacher_loss(params, net, batch['image'], _labels(batch, conditional), rng,
                            reduction=reduction, dropout=dropout)

  return loss_fn


def edm_distill_loss_fn(net, plan: phases.PhasePlan, *, reduction, clip_x, conditional,
                        teacher_net=None, dropout=False):
  """TRACT-EDM (docs/SPEC_EDM.md section 3) against the state's frozen teacher of its phase.

  Phase 0's teacher (the original EDM teacher) takes Heun steps; a later phase's teacher is the
  previous phase's student and takes its own section-2 steps (the release has one phase only).
  net / teacher_net: edm.make_network of the student's / the teacher's model."""
  table = jnp.asarray(plan.phase_table())
  grid = edm.Grid(plan.teacher_steps)

  def loss_fn(params, state: TrainState, batch, rng):
    heun = True if plan.num_phases == 1 else state.phase == 0
    return edm.tract_loss(params, net, grid, state.teacher_params, state.sema_params,
                          batch['image'], _labels(batch, conditional), rng, table[state.phase],
                          teacher_heun=heun, clip_x=clip_x, reduction=reduction,
                          teacher_net=teacher_net, dropout=dropout)

  return loss_fn


def _update(state: TrainState, batch, *, loss_fn, tx, log_ema: float, log_sema,
            sanitize_grads: bool = False):
  """One update; a non-finite loss or gradient leaves params, optimiser state and EMAs untouched
  (the update is skipped and counted), so NaNs never reach the state. sanitize_grads (TRACT-EDM):
  non-finite gradient entries are replaced first (state.finite_grads), so only the loss counts."""
  # The second key of the split, as when the flip key was drawn here (flips now happen in the input
  # pipeline): runs made before that change reproduce bit for bit.
  rng = jax.random.split(jax.random.fold_in(state.rng, state.step))[1]
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch, rng)
  if sanitize_grads:
    grads = finite_grads(grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema, ema_count = ema_update(state.ema_params, params, state.ema_count, log_ema)
  new = state.replace(params=params, opt_state=opt_state, ema_params=ema, ema_count=ema_count)
  if log_sema is not None:
    sema_params, sema_count = ema_update(state.sema_params, params, state.sema_count, log_sema)
    new = new.replace(sema_params=sema_params, sema_count=sema_count)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  bad = jnp.logical_not(finite)
  new = new.replace(
      step=state.step + 1,
      nonfinite_count=state.nonfinite_count + bad.astype(jnp.int32),
      first_nonfinite=jnp.where(bad & (state.first_nonfinite < 0), state.step, state.first_nonfinite))
  return new, dict(metrics, grad_norm=grad_norm)


def make_train_step(loss_fn, tx, *, ema_momentum: float, sema_momentum=None, mesh=None,
                    state_sharding=None, sanitize_grads: bool = False):
  """jit of one update with the state donated. With a mesh the state keeps its shardings and the
  batch is split over the devices (XLA inserts the gradient all-reduce / FSDP gathers)."""
  step_fn = functools.partial(
      _update, loss_fn=loss_fn, tx=tx, log_ema=log_momentum(ema_momentum),
      log_sema=None if sema_momentum is None else log_momentum(sema_momentum),
      sanitize_grads=sanitize_grads)
  if mesh is None:
    return jax.jit(step_fn, donate_argnums=0)
  return jax.jit(step_fn, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)
