"""Run by the slow tier's `pod_run` fixture (conftest.py) in ONE subprocess with 8 simulated CPU
devices (the device count is fixed before JAX starts, so this cannot share the pytest process):

- the driver as a pod user runs it: the tiny job (teacher, then TRACT) on a data-8 mesh, every
  checkpoint kept (the 1-device resume and the 2-process comparison read them); BTD on an FSDP 2x4
  mesh from the session's teacher checkpoint, then evaluate and sample that workdir there;
- one sharded update of the teacher, TRACT and BTD steps on an FSDP 2x4 mesh (TRACT on data-8 too)
  against the same update on 1 device, and state checkpoints restored across those meshes.

  python tests/pod_job.py ROOT TEACHER_CHECKPOINT

Prints one JSON line of results ('RESULT {...}')."""
import json
import os
import sys
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)  # before JAX starts its backend

import numpy as np  # noqa: E402

from tiny import tiny_config, tiny_job_config  # noqa: E402
from tract_jax import checkpoints, data, methods, parallel, steps, train  # noqa: E402
from tract_jax.models import factory  # noqa: E402

MESHES = {'1dev': (1, 1, 1), 'dp8': (8, 1, 8), 'fsdp2x4': (2, 4, 8)}  # data, fsdp, devices used
FSDP_MIN = 64  # small, so that the tiny model's larger leaves really get sharded


def driver_runs(root, teacher):
  out = {}
  # The tiny job on data-8, every checkpoint kept.
  tract = tiny_job_config()
  tract.keep_checkpoints = 100
  result = train.train_and_evaluate(tract, os.path.join(root, 'tract'))
  out['tract_ratio'] = result['ratio']
  # BTD on an FSDP 2x4 mesh (small leaves sharded too), then evaluate and sample its workdir there.
  btd = tiny_config('btd', teacher_checkpoint=teacher, time_schedule='16,8,4')
  btd.mesh.update(data=2, fsdp=4, fsdp_min_size=FSDP_MIN)
  btd_dir = os.path.join(root, 'btd')
  out['btd_result'] = train.train_and_evaluate(btd, btd_dir)
  btd.mode = 'evaluate'
  out['btd_evaluate'] = train.train_and_evaluate(btd, btd_dir)
  btd.mode = 'sample'
  sampled = train.train_and_evaluate(btd, btd_dir)
  out['btd_samples_shape'] = list(np.load(sampled['samples'])['images'].shape)
  return out


def perturbed_params(config):
  model = factory.build_model(config.model)
  params = factory.init_params(model, (8, 8, 1), 0)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def one_step(method, mesh):
  """Two updates of `method`'s step on `mesh`: (loss, host state, sharded leaves, state)."""
  config = tiny_config(method if method != 'teacher' else 'tract')
  config.optimizer.eps = 1e-3  # smooth in the gradient: compares sharding, not Adam's sign(g)
  config.batch_size = 16
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


def sharding_checks():
  devices = jax.devices()
  out = {}
  saved = {}
  for method in ('teacher', 'tract', 'btd'):
    ref = None
    for name, (dp, fsdp, n) in MESHES.items():
      if name == 'dp8' and method != 'tract':
        continue  # the driver's teacher runs on data-8 too (test_multidevice); BTD on FSDP 2x4
      mesh = parallel.make_mesh(dp, fsdp, devices[:n])
      loss, host_state, sharded, state = one_step(method, mesh)
      if ref is None:
        ref = (loss, host_state)
        diff = 0.0
      else:
        diffs = jax.tree.leaves(jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b))) if a.size else 0.0, ref[1].params,
            host_state.params))
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
  return out


def main(root, teacher):
  out = {'num_devices': len(jax.devices())}
  out.update(driver_runs(root, teacher))
  out['sharding'] = sharding_checks()
  print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
  main(*sys.argv[1:3])
