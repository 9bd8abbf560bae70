"""The train state (everything needed to resume bit-for-bit), its creation on a mesh, the optimiser,
the bias-corrected EMA math (spec section 3) and the phase change.

The state is created already sharded (`jax.jit(..., out_shardings=...)`), and the shardings it gets
are the restore target of its checkpoints, so resuming on another mesh needs nothing extra.
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from tract_jax import parallel
from tract_jax.default_config import FSDP_MIN_SIZE


@flax.struct.dataclass
class TrainState:
  """Everything needed to resume bit-for-bit. Distillation fields are None for the teacher job."""
  step: jax.Array            # int32: updates done
  phase: jax.Array           # int32: phase whose teacher is in teacher_params
  params: Any                # student (or teacher being trained)
  opt_state: Any
  ema_params: Any            # evaluation EMA
  ema_count: jax.Array       # int32: EMA updates since the last reset
  sema_params: Any           # TRACT self-teacher (None otherwise)
  sema_count: jax.Array
  teacher_params: Any        # frozen teacher of the current phase (None for the teacher job)
  rng: jax.Array             # uint32 key data
  nonfinite_count: jax.Array  # int32: updates skipped because the loss or a gradient was not finite
  first_nonfinite: jax.Array  # int32: step number of the first such update, -1 if none


def make_optimizer(learning_rate, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, *,
                   warmup_samples=0, batch_size=1):
  """Adam with global-norm clipping (none if grad_clip <= 0) and an optional linear warm-up,
  counted either in updates (warmup_steps; spec sections 3 and 6) or, as EDM and the TRACT-EDM
  release count it (docs/SPEC_EDM.md section 4), in training samples: lr * min(step * batch_size /
  warmup_samples, 1) at update `step` (0-based)."""
  if warmup_steps > 0 and warmup_samples > 0:
    raise ValueError('give warmup_steps or warmup_samples, not both')
  if warmup_steps > 0:
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                               optax.constant_schedule(learning_rate)], [warmup_steps])
  elif warmup_samples > 0:
    def lr(count):
      return learning_rate * jnp.minimum(count.astype(jnp.float32) * batch_size / warmup_samples,
                                         1.0)
  else:
    lr = learning_rate
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  return optax.chain(*parts, optax.adam(lr, b1=b1, b2=b2, eps=eps))


def finite_grads(grads):
  """Non-finite gradient entries replaced as the TRACT-EDM release does before each update:
  NaN -> 0, +inf -> 1e5, -inf -> -1e5."""
  return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5), grads)


def log_momentum(m: float) -> float:
  """log(m) in float64 on the host; -inf for m = 0 (the EMA is then a plain copy)."""
  return math.log(m) if m > 0 else -math.inf


def ema_update(ema, new, count, log_m: float):
  """Bias-corrected EMA (spec section 3): n += 1; d = (1 - m) / (1 - m^n); ema += d (new - ema).

  log_m = log(m) from `log_momentum`; d = expm1(log m) / expm1(n log m) keeps full float32 accuracy
  for m = 0.99996 (1 - m in float32 would lose 3 digits).
  """
  count = count + 1
  if log_m == -math.inf:  # m = 0: plain copy
    decay = jnp.float32(1.0)
  else:
    decay = jnp.expm1(jnp.float32(log_m)) / jnp.expm1(count.astype(jnp.float32) * log_m)
  ema = jax.tree.map(lambda e, p: e + decay * (p - e), ema, new)
  return ema, count


def _new_state(params, tx, rng_seed, *, sema=False, teacher=None) -> TrainState:
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the step donates the whole state
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  # Copies throughout: the state is donated to the step, the caller's arrays must survive it.
  return TrainState(step=zero(), phase=zero(), params=copy(params), opt_state=tx.init(params),
                    ema_params=copy(params), ema_count=zero(),
                    sema_params=copy(params) if sema else None, sema_count=zero(),
                    teacher_params=None if teacher is None else copy(teacher),
                    rng=jax.random.PRNGKey(rng_seed), nonfinite_count=zero(),
                    first_nonfinite=jnp.full((), -1, jnp.int32))


def create_state(params, tx, rng_seed, mesh, fsdp_min_size=FSDP_MIN_SIZE, *, sema=False,
                 teacher=None, abstract=False):
  """The initial train state, created already sharded on the mesh. Returns (state, shardings).

  The student, both EMAs (and the teacher, if given) start from `params`; the first EMA update
  copies the student anyway (bias correction). abstract=True: nothing is allocated or run, the
  state is ShapeDtypeStructs carrying their shardings (`params` may be ShapeDtypeStructs too), what
  a step can be lowered and compiled for.
  """
  init = lambda p, t: _new_state(p, tx, rng_seed, sema=sema, teacher=t)
  shapes = jax.eval_shape(init, params, teacher)
  shardings = parallel.tree_shardings(shapes, mesh, fsdp_min_size)
  if abstract:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        shardings), shardings
  return jax.jit(init, out_shardings=shardings)(params, teacher), shardings


def advance_phase(state: TrainState, reset_ema: bool) -> TrainState:
  """Phase change: the evaluation EMA becomes the teacher; student, self-teacher and optimiser go on."""
  teacher = jax.tree.map(jnp.copy, state.ema_params)
  count = jnp.zeros_like(state.ema_count) if reset_ema else state.ema_count
  return state.replace(phase=state.phase + 1, teacher_params=teacher, ema_count=count)
