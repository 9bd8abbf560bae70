"""TRACT and BTD targets against a float64 NumPy re-implementation of spec sections 4-5.

The networks are small deterministic stand-ins (elementwise functions of z, t and a parameter), so the
reference can evaluate them exactly in float64 and the comparison isolates the target arithmetic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tract_jax import losses as methods, phases

T = 1024


# ---- float64 reference ------------------------------------------------------------------------------
def ref_alpha_sigma(t):
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  logsnr = -2.0 * np.log(np.tan(a * t + b))
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def b4(v):
  return np.asarray(v, np.float64)[:, None, None, None]


def ref_net(p, z, t):
  """Stand-in x-prediction network; outputs beyond [-1, 1] exercise the clipping."""
  return 1.3 * np.tanh(p['w'] * z + p['b'] * b4(t) + 0.1)


def jax_net(p, z, t, labels):
  del labels
  return 1.3 * jnp.tanh(p['w'] * z + p['b'] * t[:, None, None, None] + 0.1)


def ref_ddim(z_t, x_hat, t, s, clip):
  if clip:
    x_hat = np.clip(x_hat, -1, 1)
  at, st = ref_alpha_sigma(t)
  as_, ss = ref_alpha_sigma(s)
  return b4(as_) * x_hat + b4(ss) * (z_t - b4(at) * x_hat) / b4(st)


def ref_inverse(z_t, z_s, t, s):
  at, st = ref_alpha_sigma(t)
  as_, ss = ref_alpha_sigma(s)
  return (b4(ss) * z_t - b4(st) * z_s) / (b4(ss) * b4(at) - b4(st) * b4(as_))


def ref_tract_target(teacher, sema, x, eps, i0, i1, i2):
  t0, t1, t2 = i0 / T, i1 / T, i2 / T
  a0, s0 = ref_alpha_sigma(t0)
  z0 = b4(a0) * x + b4(s0) * eps
  z1 = ref_ddim(z0, ref_net(teacher, z0, t0), t0, t1, clip=True)
  z2 = ref_ddim(z1, ref_net(sema, z1, t1), t1, t2, clip=True)
  z2 = np.where(b4(i1 == i2) > 0, z1, z2)  # t1 == t2: z2 = z1
  return ref_inverse(z0, z2, t0, t2)


def ref_btd_target(teacher, x, eps, i0, i1, i2):
  t0, t1, t2 = i0 / T, i1 / T, i2 / T
  a0, s0 = ref_alpha_sigma(t0)
  z0 = b4(a0) * x + b4(s0) * eps
  x_hat1 = ref_net(teacher, z0, t0)
  z1 = ref_ddim(z0, x_hat1, t0, t1, clip=False)  # BTD does not clip while training
  x_hat2 = ref_net(teacher, z1, t1)
  z2 = ref_ddim(z1, x_hat2, t1, t2, clip=False)
  return np.where(b4(i2 == 0) > 0, x_hat2, ref_inverse(z0, z2, t0, t2))


TEACHER = {'w': 0.9, 'b': -0.4}
SEMA = {'w': 1.1, 'b': 0.3}


def _inputs(n, seed):
  rng = np.random.default_rng(seed)
  x = np.clip(rng.normal(0, 0.5, (n, 4, 4, 2)), -1, 1).astype(np.float32)
  eps = rng.normal(size=(n, 4, 4, 2)).astype(np.float32)
  return x, eps


def _rel(ours, ref):
  return np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref))


def _check_tract(i0, i1, i2, seed):
  x, eps = _inputs(len(i0), seed)
  params = jax.tree.map(jnp.float32, (TEACHER, SEMA))
  z0, t0, target = methods.tract_target(jax_net, *params, x, eps, None, *(jnp.asarray(i, jnp.int32) for i in (i0, i1, i2)),
                                        teacher_steps=T)
  ref = ref_tract_target(TEACHER, SEMA, x.astype(np.float64), eps.astype(np.float64), i0, i1, i2)
  assert _rel(target, ref) < 1e-4
  np.testing.assert_allclose(t0, i0 / T, rtol=0, atol=0)
  return ref


PLAN = phases.make_plan('tract', T, '1024,32,1', 96 * 2**20, 256, 1e-3)


@pytest.mark.parametrize('phase', [0, 1])
def test_tract_targets_every_phase_of_1024_32_1(phase):
  semi, step, num_segments = (int(v) for v in PLAN.phase_table()[phase])
  r = step // semi
  # Every kind of example: top segment, bottom segment (t2 = 0), j = 0, j = r - 1 (t1 == t2), and
  # random draws, near t = 1, 0.5 and 0.
  rows = []
  for seg in (num_segments, (num_segments + 1) // 2, 1):
    for j in (0, 1, r - 2, r - 1):
      index = seg * step
      i0 = index - j * semi
      rows.append((i0, i0 - semi, index - step))
  i0, i1, i2 = (np.array(v) for v in zip(*rows))
  assert np.any(i1 == i2) and np.any(i2 == 0) and np.any(i0 == T)
  _check_tract(i0, i1, i2, seed=phase)


@pytest.mark.parametrize('phase', [0, 1])
def test_tract_sampled_times_follow_the_spec(phase):
  row = jnp.asarray(PLAN.phase_table()[phase])
  semi, step, num_segments = (int(v) for v in row)
  i0, i1, i2 = (np.asarray(v) for v in methods.tract_times(jax.random.PRNGKey(phase), row, 4096))
  r = step // semi
  index = i2 + step
  assert np.all(index % step == 0) and index.min() >= step and index.max() <= T
  j = (index - i0) // semi
  assert np.all((index - i0) % semi == 0)
  assert set(np.unique(j)) == set(range(r))  # every j in 0..r-1 is drawn
  assert np.all(i1 == i0 - semi) and np.all(i1 >= i2)
  assert np.all((i1 == i2) == (j == r - 1))
  if num_segments > 1:
    assert len(np.unique(index)) == num_segments
  _check_tract(i0[:24], i1[:24], i2[:24], seed=10 + phase)


def test_tract_boundary_target_is_the_teacher_prediction():
  i0, i1, i2 = np.array([33, 64, 1024]), np.array([32, 63, 1023]), np.array([32, 63, 1023])
  ref = _check_tract(i0, i1, i2, seed=3)
  x, eps = _inputs(3, 3)
  a0, s0 = ref_alpha_sigma(i0 / T)
  z0 = b4(a0) * x.astype(np.float64) + b4(s0) * eps.astype(np.float64)
  np.testing.assert_allclose(ref, np.clip(ref_net(TEACHER, z0, i0 / T), -1, 1), atol=1e-9)


BTD_PLAN = phases.make_plan('btd', T, '', 10 * 256, 256, 1e-3)


def test_btd_schedule_halves_to_one():
  assert BTD_PLAN.schedule == (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
  assert BTD_PLAN.num_phases == 10


@pytest.mark.parametrize('phase', [0, 5, 9])
def test_btd_targets(phase):
  row = BTD_PLAN.phase_table()[phase]
  semi, step, n = (int(v) for v in row)
  assert step == 2 * semi and n == T // step
  i0, i1, i2 = (np.asarray(v) for v in methods.btd_times(jax.random.PRNGKey(phase), jnp.asarray(row), 512))
  assert np.all(i0 % step == 0) and i0.min() >= step and i0.max() <= T
  assert np.all(i1 == i0 - semi) and np.all(i2 == i0 - step)
  # Include both ends explicitly: s = 0 (the target is the second teacher x_hat) and t = 1.
  i0 = np.concatenate([i0[:10], [step, T]])
  i1, i2 = i0 - semi, i0 - step
  x, eps = _inputs(len(i0), phase)
  _, _, target = methods.btd_target(jax_net, jax.tree.map(jnp.float32, TEACHER), x, eps, None,
                                    *(jnp.asarray(i, jnp.int32) for i in (i0, i1, i2)), teacher_steps=T)
  ref = ref_btd_target(TEACHER, x.astype(np.float64), eps.astype(np.float64), i0, i1, i2)
  assert _rel(target, ref) < 1e-4


@pytest.mark.parametrize('reduction,factor', [('sum', 32.0), ('mean', 1.0)])
def test_loss_reduction_and_weight(reduction, factor):
  """loss = mean_b w(t) * (sum or mean over pixels) of the squared error; pixel-sum = C*H*W * mean."""
  x, _ = _inputs(8, 5)
  params = {'w': jnp.float32(0.0), 'b': jnp.float32(0.0)}
  row = jnp.asarray(PLAN.phase_table()[0])
  rng = jax.random.PRNGKey(0)
  loss, _ = methods.tract_loss(params, jax_net, TEACHER, SEMA, jnp.asarray(x), None, rng, row,
                               teacher_steps=T, reduction=reduction)
  # Rebuild the same examples and the loss by hand.
  k_times, k_eps = jax.random.split(rng)
  i0, i1, i2 = methods.tract_times(k_times, row, 8)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  _, t0, target = methods.tract_target(jax_net, TEACHER, SEMA, jnp.asarray(x), eps, None, i0, i1, i2,
                                       teacher_steps=T)
  pred = np.full(x.shape, 1.3 * np.tanh(0.1))
  a, s = ref_alpha_sigma(np.asarray(t0, np.float64))
  w = np.maximum(a**2 / s**2, 1.0)
  per_pixel = np.mean((pred - np.asarray(target)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(float(loss), np.mean(w * per_pixel * factor), rtol=1e-4)


# ---- class labels: every network of a conditional model gets the example's label -----------------
LABELLED = {'teacher': {'w': 0.9, 'b': -0.4, 'c': 0.15}, 'sema': {'w': 1.1, 'b': 0.3, 'c': -0.2},
            'student': {'w': 0.7, 'b': 0.2, 'c': 0.25}}


def ref_net_labelled(p, labels):
  """The float64 stand-in with a label term, for one label vector: (z, t) -> x_hat."""
  return lambda z, t: 1.3 * np.tanh(p['w'] * z + p['b'] * b4(t) + p['c'] * b4(labels) + 0.1)


def jax_net_labelled(p, z, t, labels):
  shift = p['c'] * labels.astype(jnp.float32)[:, None, None, None]
  return 1.3 * jnp.tanh(p['w'] * z + p['b'] * t[:, None, None, None] + shift + 0.1)


def ref_tract_target_of(teacher_net, sema_net, x, eps, i0, i1, i2):
  t0, t1, t2 = i0 / T, i1 / T, i2 / T
  a0, s0 = ref_alpha_sigma(t0)
  z0 = b4(a0) * x + b4(s0) * eps
  z1 = ref_ddim(z0, teacher_net(z0, t0), t0, t1, clip=True)
  z2 = np.where(b4(i1 == i2) > 0, z1, ref_ddim(z1, sema_net(z1, t1), t1, t2, clip=True))
  return ref_inverse(z0, z2, t0, t2)


def test_labels_reach_the_teacher_and_the_self_teacher():
  """The TRACT target of a conditional model equals the float64 reference in which the teacher and
  the self-teacher both see each example's label; a target built with either network unlabelled,
  or with the labels permuted, is far from it."""
  i0 = np.array([1024, 1000, 700, 512, 300, 64, 40, 50])
  i1, i2 = i0 - 1, (i0 - 1) // 32 * 32
  assert np.all(i1 != i2)  # the self-teacher step is taken in every example
  x, eps = _inputs(len(i0), 7)
  labels = np.array([0, 3, 9, 1, 7, 2, 5, 8])
  permuted = labels[::-1]
  p = {k: jax.tree.map(jnp.float32, v) for k, v in LABELLED.items()}

  def ours(lab):
    return methods.tract_target(jax_net_labelled, p['teacher'], p['sema'], x, eps,
                                jnp.asarray(lab), *(jnp.asarray(i, jnp.int32) for i in (i0, i1, i2)),
                                teacher_steps=T)[2]

  def ref(teacher_labels, sema_labels):
    return ref_tract_target_of(ref_net_labelled(LABELLED['teacher'], teacher_labels),
                               ref_net_labelled(LABELLED['sema'], sema_labels),
                               x.astype(np.float64), eps.astype(np.float64), i0, i1, i2)

  target = ours(labels)
  assert _rel(target, ref(labels, labels)) < 1e-4
  none = np.zeros_like(labels)
  assert _rel(target, ref(none, labels)) > 1e-2  # a teacher without labels gives another target
  assert _rel(target, ref(labels, none)) > 1e-2  # so does a self-teacher without labels
  assert _rel(ours(permuted), ref(permuted, permuted)) < 1e-4
  assert _rel(ours(permuted), np.asarray(target, np.float64)) > 1e-2


def test_labels_reach_the_student_and_both_btd_teacher_calls():
  x, eps = _inputs(8, 8)
  labels = jnp.asarray([0, 3, 9, 1, 7, 2, 5, 8])
  p = {k: jax.tree.map(jnp.float32, v) for k, v in LABELLED.items()}
  row = jnp.asarray(PLAN.phase_table()[1])
  rng = jax.random.PRNGKey(3)
  loss, _ = methods.tract_loss(p['student'], jax_net_labelled, p['teacher'], p['sema'],
                               jnp.asarray(x), labels, rng, row, teacher_steps=T)
  # The same examples rebuilt by hand: the student's prediction with the labels ...
  k_times, k_eps = jax.random.split(rng)
  i0, i1, i2 = methods.tract_times(k_times, row, 8)
  noise = jax.random.normal(k_eps, x.shape, x.dtype)
  z0, t0, target = methods.tract_target(jax_net_labelled, p['teacher'], p['sema'], jnp.asarray(x),
                                        noise, labels, i0, i1, i2, teacher_steps=T)
  a, s = ref_alpha_sigma(np.asarray(t0, np.float64))
  weight = np.maximum(a**2 / s**2, 1.0)

  def by_hand(student_labels):
    pred = np.asarray(jax_net_labelled(p['student'], z0, t0, student_labels), np.float64)
    return np.mean(weight * np.sum((pred - np.asarray(target, np.float64)) ** 2, axis=(1, 2, 3)))

  np.testing.assert_allclose(float(loss), by_hand(labels), rtol=1e-4)
  assert abs(float(loss) / by_hand(labels[::-1]) - 1) > 1e-2  # ... not with other labels

  # BTD: both teacher half-steps see the labels.
  i0 = np.array([1024, 512, 256, 64, 8, 4])
  i1, i2 = i0 - 2, i0 - 4
  lab = np.array([1, 4, 9, 0, 6, 2])
  _, _, btd = methods.btd_target(jax_net_labelled, p['teacher'], x[:6], eps[:6], jnp.asarray(lab),
                                 *(jnp.asarray(i, jnp.int32) for i in (i0, i1, i2)), teacher_steps=T)

  def ref_btd(first, second):
    t0, t1, t2 = i0 / T, i1 / T, i2 / T
    a0, s0 = ref_alpha_sigma(t0)
    z0 = b4(a0) * x[:6].astype(np.float64) + b4(s0) * eps[:6].astype(np.float64)
    z1 = ref_ddim(z0, ref_net_labelled(LABELLED['teacher'], first)(z0, t0), t0, t1, clip=False)
    x_hat2 = ref_net_labelled(LABELLED['teacher'], second)(z1, t1)
    z2 = ref_ddim(z1, x_hat2, t1, t2, clip=False)
    return np.where(b4(i2 == 0) > 0, x_hat2, ref_inverse(z0, z2, t0, t2))  # s = 0: x_hat2

  assert _rel(btd, ref_btd(lab, lab)) < 1e-4
  assert _rel(btd, ref_btd(lab, 0 * lab)) > 1e-2 and _rel(btd, ref_btd(0 * lab, lab)) > 1e-2
