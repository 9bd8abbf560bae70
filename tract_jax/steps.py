"""The jitted update step: one update core, and the one builder that plugs a method into it.

`build_train_step(config, method, mesh, params)` is how training and every benchmark get a step: it
builds the networks, asks the method record (methods/) for its optimiser and loss, creates the
sharded train state and jits the update. `make_train_step(loss_fn, tx, ...)` is the core:
`step(state, batch) -> (state, metrics)` with the per-step RNG (folded from the state's key and
step, so a resumed run draws the same numbers), value_and_grad of `loss_fn(params, state, batch,
rng) -> (loss, metrics)`, the optimiser step, the EMA updates and the non-finite guard, jitted once
with the state donated. The distillation phase is a traced value (a row of the phase table read
from state.phase), so one compiled step serves every phase.
"""
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from tract_jax import parallel, phases, seeds
from tract_jax.methods import Method
from tract_jax.models import factory
from tract_jax.state import TrainState, create_state, ema_update, finite_grads, log_momentum


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


class TrainStep(NamedTuple):
  """What `build_train_step` returns."""
  step: Callable                   # jitted (state, batch) -> (state, metrics); the state is donated
  state: TrainState                # the initial state (ShapeDtypeStructs when abstract)
  state_sharding: Any
  plan: Optional[phases.PhasePlan]  # None for teacher training
  batch_size: int                  # the global batch the method trains with
  seed: int                        # the seed of the state's RNG, and of its input pipeline


def build_train_step(config, method: Method, mesh, params, plan=None, *,
                     abstract: bool = False) -> TrainStep:
  """The jitted train step of `method` for `config` on `mesh`, and its initial state.

  Teacher training (method.distils False) starts from `params` with config.teacher_training's
  dropout, batch and EMA decay and the state RNG config.seed. A distillation method starts student,
  EMAs and teacher from `params` (the teacher); plan: its phases.PhasePlan (default: the config's);
  dropout 0 unless the method has student dropout (spec section 3); the state RNG config.seed +
  seeds.DISTILLATION. The networks are config.model's (its dtype, teacher_dtype and remat).
  abstract=True: `params` may be ShapeDtypeStructs and the state is, too: the step can be lowered
  and compiled, not run (benchmarks on paper-size models).
  """
  if method.distils:
    plan = plan or phases.plan_of(config, method.name)
    dropout = config.student_dropout if method.student_dropout else 0.0
    seed, batch_size = config.seed + seeds.DISTILLATION, config.batch_size
    ema_momentum = plan.ema_momentum
    sema_momentum = config.sema if method.has_self_teacher else None
    teacher_model = factory.build_model(config.model, teacher=True)
  else:
    tc = config.teacher_training
    dropout, seed, batch_size, ema_momentum = tc.dropout, config.seed, tc.batch_size, tc.ema_decay
    sema_momentum, teacher_model, plan = None, None, None
  model = factory.build_model(config.model, dropout=dropout, trained=True)
  tx = method.make_optimizer(config)
  state, state_sharding = create_state(
      params, tx, seed, mesh, config.mesh.fsdp_min_size, sema=method.has_self_teacher,
      teacher=params if method.distils else None, abstract=abstract)
  loss_fn = method.make_loss(config, model, teacher_model, plan)
  step = make_train_step(loss_fn, tx, ema_momentum=ema_momentum, sema_momentum=sema_momentum,
                         mesh=mesh, state_sharding=state_sharding,
                         sanitize_grads=method.sanitize_grads)
  return TrainStep(step, state, state_sharding, plan, batch_size, seed)
