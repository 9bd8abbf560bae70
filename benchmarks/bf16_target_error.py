"""How much bf16 teacher / self-teacher forwards move the TRACT target, at small and large gaps.

  python benchmarks/bf16_target_error.py [--config=configs/demo.py] [--train_steps=400] \
      [--batch=256] [--json=out.json]

The network is the config's UNet (the demo's 8x8 model by default), briefly trained as a teacher on
the embedded digits (--train_steps of Adam on the denoising loss, float32; 0 = random init with the
zero-initialised output layers replaced by small random weights), so that its predictions look like
a teacher's. The same float32 parameters serve as teacher and self-teacher, as at the start of phase 0.

For each phase below, one batch of TRACT examples (real digits, fresh noise, times drawn as
losses.tract_times draws them on a T = 1024 grid) is pushed through losses.tract_target twice:
with float32 forwards (the reference) and with bf16 forwards (UNet(dtype=bfloat16): float32
parameters, bf16 convolutions/matmuls/activations, float32 output). Reported, as relative L2 errors
over the batch (bf16 vs float32):
  - x_hat1: the teacher's prediction (a single bf16 forward);
  - target x*: the TRACT target;
  - weighted: the target error weighted like the loss (w(t0) = max(SNR(t0), 1));
  - vs step: the target error relative to || x* - x_hat1 ||, the part of the target that the
    self-teacher's jump adds to the teacher's own prediction (what TRACT distils beyond one step);
  - bf16 z: the target if the DDIM states z1, z2 were ROUNDED to bf16 and the target formed by the
    z-space inverse (diffusion.ddim_inverse) - i.e. what happens when the DDIM arithmetic itself is
    done in bf16. This is why only the networks run in bf16.

Why the weights do not amplify the network error: two_step_target_weights writes the target as
x* = w1 x_hat1 + w2 x_hat2 with w1 = sigma2 sin(phi0 - phi1) / (sigma1 sin(phi0 - phi2)),
w2 = sigma0 sin(phi1 - phi2) / (sigma1 sin(phi0 - phi2)); for t0 > t1 >= t2 both are in [0, 1] and
w1 + w2 = 1 (printed below): the target is a convex combination, so an error e in each prediction
gives at most e in the target, whatever the gap. The amplification the issue worries about lives in
the z-space form x* = (sigma2 z0 - sigma0 z2) / (sigma2 alpha0 - sigma0 alpha2): its denominator is
about a (t0 - t2) ~ 1.5e-3 for a 1/1024 gap, so an error in z2 that is not itself proportional to
the gap (e.g. bf16 rounding of z2, relative 2^-9) is multiplied by sigma0 / denominator ~ 700
(printed as "z amp"). Errors of the predictions enter z2 multiplied by sigma-differences of size
~gap, so they cancel against that denominator, and the weights form is exact in float32.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import timed_step  # noqa: E402  (benchmarks/timed_step.py)
from tract_jax import data, diffusion, losses  # noqa: E402
from tract_jax.models import factory  # noqa: E402

T = 1024
# (label, teacher step, student step, student step count) in grid units of T = 1024: the phases of
# the paper's 1024 -> 32 -> 1 schedule; the demo's 64 -> 8 -> 1 phases as 16/1024 and 128/1024 gaps.
PHASES = [('1024->32 (gap 1/1024)', 1, 32, 32), ('64->8 (gap 1/64)', 16, 128, 8),
          ('32->1 (gap 1/32)', 32, 1024, 1), ('8->1 (gap 1/8)', 128, 1024, 1)]


def digits():
  """The embedded digits (N, 8, 8, 1) in [-1, 1]."""
  source = data.load_digits()
  return source.get(np.arange(len(source)))['image']


def train_teacher(model, denoise, images, steps, batch, seed, log):
  """Init, then `steps` Adam steps (lr 1e-3) of the denoising loss (spec section 6), float32."""
  import optax
  x0 = jnp.asarray(images[:1])
  params = jax.jit(lambda k: model.init(k, x0, jnp.zeros((1,)), train=False)['params'])(
      jax.random.PRNGKey(seed))
  if steps == 0:  # random network: give the zero-initialised output layers small random weights
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [jnp.where(l == 0, 0.02 * jax.random.normal(k, l.shape), l) for l, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, x, rng):
    loss_fn = lambda p: losses.teacher_loss(p, denoise, x, None, rng, reduction='mean',
                                             dropout=False)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for i in range(steps):
    x = jnp.asarray(images[rng.integers(0, len(images), batch)])
    params, opt_state, loss = step(params, opt_state, x, jax.random.PRNGKey(i))
    if (i + 1) % max(1, steps // 4) == 0:
      log(f'  teacher step {i + 1}/{steps}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)')
  return params


def make_eval(denoise):
  """Jitted: (params, x, eps, i0, i1, i2) -> dict of the target (losses.tract_target), both
  predictions, the loss weight and the target formed with bf16-rounded z1, z2 (z-space inverse)."""

  @jax.jit
  def evaluate(params, x, eps, i0, i1, i2):
    _, t0, target = losses.tract_target(denoise, params, params, x, eps, None, i0, i1, i2,
                                         teacher_steps=T, clip_x=True)
    t1, t2 = i1.astype(jnp.float32) / T, i2.astype(jnp.float32) / T
    z0 = diffusion.q_sample(x, eps, t0)
    x_hat1 = jnp.clip(denoise(params, z0, t0, None), -1.0, 1.0)
    round16 = lambda z: z.astype(jnp.bfloat16).astype(jnp.float32)
    z1 = diffusion.ddim_step(z0, x_hat1, t0, t1)
    x_hat2 = jnp.clip(denoise(params, z1, t1, None), -1.0, 1.0)
    z2 = jnp.where(diffusion.bcast(i1 == i2, z1), z1, diffusion.ddim_step(z1, x_hat2, t1, t2))
    target_z16 = diffusion.ddim_inverse(round16(z0), round16(z2), t0, t2)
    return {'target': target, 'x_hat1': x_hat1, 'x_hat2': x_hat2, 'target_z16': target_z16,
            'weight': diffusion.snr_weight(t0)}

  return evaluate


def _rel(a, b, weight=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d2 = np.sum(np.square(a - b).reshape(len(a), -1), axis=1)
  b2 = np.sum(np.square(b).reshape(len(b), -1), axis=1)
  w = np.ones(len(a)) if weight is None else np.asarray(weight, np.float64)
  return float(np.sqrt(np.sum(w * d2) / np.sum(w * b2)))


def measure(config, train_steps, batch, seed, log=print):
  """config: a job config on the digits (its model is measured)."""
  if config.data.name != 'digits':
    raise SystemExit('this benchmark trains on the embedded digits: use a digits config')
  images = digits()
  model32, model16 = (factory.build_model(timed_step.with_model_options(config.model, dtype=d))
                      for d in ('float32', 'bfloat16'))
  den32, den16 = (factory.make_denoiser(m, config.model.mean_type) for m in (model32, model16))
  log(f'teacher: {train_steps} training steps (0 = random weights)')
  params = train_teacher(model32, den32, images, train_steps, 64, seed, log)
  log(f'  {sum(int(np.prod(l.shape)) for l in jax.tree.leaves(params)):,} parameters')
  eval32, eval16 = make_eval(den32), make_eval(den16)

  # The UNet alone: raw output and x_hat, bf16 vs float32, at uniformly random t.
  rng = np.random.default_rng(seed + 7)
  x = jnp.asarray(images[rng.integers(0, len(images), batch)])
  eps = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
  t = jnp.asarray(rng.uniform(0.0, 1.0, batch).astype(np.float32))
  z = diffusion.q_sample(x, eps, t)
  raw = lambda m: jax.jit(lambda p, z, t: m.apply({'params': p}, z, diffusion.logsnr_schedule(t),
                                                  train=False))(params, z, t)
  out32, out16 = raw(model32), raw(model16)
  unet = {'raw_output_rel_l2': _rel(out16, out32),
          'raw_output_max_abs': float(jnp.max(jnp.abs(out16 - out32))),
          'output_dtype': str(out16.dtype)}
  log(f'UNet output bf16 vs float32 (t ~ U(0,1), batch {batch}): relative L2 '
      f'{unet["raw_output_rel_l2"]:.2e}, max abs {unet["raw_output_max_abs"]:.2e}, output dtype '
      f'{unet["output_dtype"]}')

  rows = []
  for label, semi, step, nseg in PHASES:
    row_arr = jnp.asarray([semi, step, nseg], jnp.int32)
    i0, i1, i2 = losses.tract_times(jax.random.PRNGKey(seed + semi), row_arr, batch)
    r32 = eval32(params, x, eps, i0, i1, i2)
    r16 = eval16(params, x, eps, i0, i1, i2)
    t0, t1, t2 = (np.asarray(i, np.float64) / T for i in (i0, i1, i2))
    w1, w2 = diffusion.two_step_target_weights(jnp.asarray(t0, jnp.float32),
                                               jnp.asarray(t1, jnp.float32),
                                               jnp.asarray(t2, jnp.float32))
    w1, w2 = np.asarray(w1), np.asarray(w2)
    interior = np.asarray(i1 != i2)
    # z-space amplification: coefficient of z2 in x* = (sigma2 z0 - sigma0 z2) / (sigma2 alpha0 - sigma0 alpha2)
    a0, s0 = (np.asarray(v, np.float64) for v in diffusion.alpha_sigma(jnp.asarray(t0)))
    a2, s2 = (np.asarray(v, np.float64) for v in diffusion.alpha_sigma(jnp.asarray(t2)))
    z_amp = s0 / np.abs(s2 * a0 - s0 * a2)
    step_norm = np.asarray(r32['target']) - np.asarray(r32['x_hat1'])
    dev = np.asarray(r16['target']) - np.asarray(r32['target'])
    row = {
        'phase': label, 'teacher_gap': semi / T, 'segment': step / T,
        'w1_range': [float(w1.min()), float(w1.max())],
        'w2_range': [float(w2.min()), float(w2.max())],
        'w_sum_max_dev': float(np.max(np.abs(w1 + w2 - 1))),
        'z_amp_max': float(z_amp.max()), 'z_amp_median': float(np.median(z_amp)),
        'x_hat1_rel': _rel(r16['x_hat1'], r32['x_hat1']),
        'x_hat2_rel': _rel(r16['x_hat2'], r32['x_hat2']),
        'target_rel': _rel(r16['target'], r32['target']),
        'target_rel_weighted': _rel(r16['target'], r32['target'], r32['weight']),
        'target_vs_step': float(np.linalg.norm(dev[interior]) /
                                max(np.linalg.norm(step_norm[interior]), 1e-30))
                          if interior.any() else None,
        'target_z16_rel': _rel(r32['target_z16'], r32['target']),
        'interior_fraction': float(interior.mean()),
    }
    rows.append(row)
  return {'model': config.model.to_dict(), 'train_steps': train_steps, 'batch': batch, 'T': T,
          'unet': unet,
          'rows': rows, 'jax_version': jax.__version__, 'device': jax.devices()[0].device_kind}


def format_table(result):
  head = (f'{"phase":<22} {"w1 range":>15} {"w2 range":>15} {"z amp":>7} {"x_hat1":>8} '
          f'{"target":>8} {"weighted":>8} {"vs step":>8} {"bf16 z":>8}')
  lines = [head, '-' * len(head)]
  for r in result['rows']:
    vs = f'{r["target_vs_step"]:8.2e}' if r['target_vs_step'] is not None else f'{"n/a":>8}'
    lines.append(
        f'{r["phase"]:<22} {r["w1_range"][0]:7.4f}-{r["w1_range"][1]:.4f} '
        f'{r["w2_range"][0]:7.4f}-{r["w2_range"][1]:.4f} {r["z_amp_max"]:7.0f} '
        f'{r["x_hat1_rel"]:8.2e} {r["target_rel"]:8.2e} {r["target_rel_weighted"]:8.2e} {vs} '
        f'{r["target_z16_rel"]:8.2e}')
  u = result['unet']
  lines.append(f'relative L2 errors, bf16 forwards vs float32, batch {result["batch"]}; UNet raw '
               f'output alone: {u["raw_output_rel_l2"]:.2e}. z amp = max sigma0 / |sigma2 alpha0 - '
               'sigma0 alpha2| (what an error in z2 is multiplied by in the z-space inverse); '
               'w1 + w2 = 1 and both lie in [0, 1].')
  return '\n'.join(lines)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Job configuration file on the digits (its model is measured).')
  flags.DEFINE_integer('train_steps', 400, 'Teacher training steps before measuring.')
  flags.DEFINE_integer('batch', 256, 'Examples measured.')
  flags.DEFINE_integer('seed', 0, 'Seed.')
  flags.DEFINE_string('json', None, 'Also write the results here.')


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  result = measure(args.config, args.train_steps, args.batch, args.seed)
  print(format_table(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
