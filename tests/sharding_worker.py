"""Run by test_parallel.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before
JAX starts, so this cannot share the pytest process). Prints one JSON line of results."""
import json
import os
import sys
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chex  # noqa: E402

chex.set_n_cpu_devices(8)  # before JAX starts its backend: 8 simulated CPU devices

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402
from tract_jax import checkpoints, data, methods, parallel, steps  # noqa: E402
from tract_jax.models import factory  # noqa: E402

MESHES = {'1dev': (1, 1, 1), 'dp8': (8, 1, 8), 'fsdp2x4': (2, 4, 8)}  # data, fsdp, devices used
FSDP_MIN = 64  # small, so that the tiny model's larger leaves really get sharded


def perturbed_params(config):
  model = factory.build_model(config.model)
  params = factory.init_params(model, (8, 8, 1), 0)
  # (tiny_config's shapes are used throughout; ch_mult=(1,) keeps compiles short)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def one_step(method, mesh):
  config = tiny_config(method if method != 'teacher' else 'tract')
  config.optimizer.eps = 1e-3  # smooth in the gradient: compares sharding, not Adam's sign(g)
  config.batch_size = 16
  config.model.ch_mult = (1,)  # one level: the fewest ops that still exercise every block type
  config.model.attn_resolutions = (8,)
  if method == 'btd':
    config.time_schedule = '16,8'
  params = perturbed_params(config)
  source = data.load_digits()
  batch = parallel.global_batch(source.get(np.arange(16)), mesh)
  config.mesh.fsdp_min_size = FSDP_MIN
  config.teacher_training.update(learning_rate=1e-3, warmup_steps=0, dropout=0.0, ema_decay=0.9,
                                 batch_size=16)
  step, state = steps.build_train_step(config, methods.get(method), mesh, params)[:2]
  for _ in range(2):
    state, metrics = step(state, batch)
  sharded = sum(1 for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated)
  return float(metrics['loss']), jax.tree.map(parallel.to_host, state), sharded, state


def main():
  devices = jax.devices()
  out = {'num_devices': len(devices)}
  saved = {}
  for method in ('teacher', 'tract', 'btd'):
    ref = None
    for name, (dp, fsdp, n) in MESHES.items():
      mesh = parallel.make_mesh(dp, fsdp, devices[:n])
      loss, host_state, sharded, state = one_step(method, mesh)
      if ref is None:
        ref = (loss, host_state)
        diff = 0.0
      else:
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))) if a.size else 0.0,
                                             ref[1].params, host_state.params))
        diff = max(diffs)
      out[f'{method}/{name}'] = {'loss': loss, 'loss_ref': ref[0], 'max_param_diff': diff,
                                 'sharded_leaves': sharded}
      if method == 'tract':
        saved[name] = (state, mesh)
  # Checkpoint cross-restore: 8-device FSDP -> 1 device, and 1 device -> 8-device FSDP.
  for src, dst in (('fsdp2x4', '1dev'), ('1dev', 'fsdp2x4')):
    directory = tempfile.mkdtemp()
    state, _ = saved[src]
    with checkpoints.StateCheckpoints(directory) as ckpts:
      ckpts.save(2, state, wait=True)
    like = saved[dst][0]
    with checkpoints.StateCheckpoints(directory) as ckpts:
      restored = ckpts.restore(like)
    same = all(np.array_equal(parallel.to_host(a), parallel.to_host(b))
               for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    shardings_ok = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(like),
                                                                jax.tree.leaves(restored)))
    out[f'restore/{src}->{dst}'] = {'equal': same, 'target_shardings': shardings_ok}
  print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
  main()
