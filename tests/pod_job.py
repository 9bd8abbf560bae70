"""Run by the slow tier's `pod_run` fixture (conftest.py) in ONE subprocess with 8 simulated CPU
devices (the device count is fixed before JAX starts, so this cannot share the pytest process).
The driver as a pod user runs it, every job on an FSDP 2x4 mesh (data 2 x fsdp 4, small leaves
sharded too), so that the sharded teacher, TRACT and BTD steps run end to end; the tests compare
their results with the same jobs on the pytest process's devices (test_multidevice):

- the tiny job (teacher, then TRACT), every checkpoint kept (the resume on the pytest process's
  devices reads them);
- BTD from the session's teacher checkpoint (written on other devices), then evaluate and sample
  that workdir;
- the session job's final train state (written on the pytest process's devices) restored straight
  into the FSDP shardings of this job's train state.

  python tests/pod_job.py ROOT TEACHER_CHECKPOINT

Prints one JSON line of results ('RESULT {...}')."""
import json
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)  # before JAX starts its backend

import numpy as np  # noqa: E402

from tiny import TINY_JOB_TOTAL, tiny_config, tiny_job_config  # noqa: E402
from tract_jax import checkpoints, methods, parallel, steps, train  # noqa: E402
from tract_jax.models import factory  # noqa: E402

FSDP_MIN = 64  # small, so that the tiny model's larger leaves really get sharded


def on_fsdp_2x4(config):
  config.mesh.update(data=2, fsdp=4, fsdp_min_size=FSDP_MIN)
  return config


def driver_runs(root, teacher):
  out = {}
  tract = on_fsdp_2x4(tiny_job_config())
  tract.keep_checkpoints = 100
  out['tract_ratio'] = train.train_and_evaluate(tract, os.path.join(root, 'tract'))['ratio']
  btd = on_fsdp_2x4(tiny_config('btd', teacher_checkpoint=teacher, time_schedule='16,8,4'))
  btd_dir = os.path.join(root, 'btd')
  out['btd_result'] = train.train_and_evaluate(btd, btd_dir)
  btd.mode = 'evaluate'
  out['btd_evaluate'] = train.train_and_evaluate(btd, btd_dir)
  btd.mode = 'sample'
  sampled = train.train_and_evaluate(btd, btd_dir)
  out['btd_samples_shape'] = list(np.load(sampled['samples'])['images'].shape)
  return out


def restore_into_fsdp(session_job):
  """The session job's last train state (its own devices) restored into FSDP 2x4 shardings, and
  into one device's, leaf by leaf."""
  config = on_fsdp_2x4(tiny_job_config())
  model = factory.build_model(config.model)

  def state_like(mesh):
    params = factory.abstract_params(model, (8, 8, 1), mesh, FSDP_MIN)
    return steps.build_train_step(config, methods.get('tract'), mesh, params, abstract=True)[1]

  fsdp = state_like(parallel.mesh_from_config(config))
  single = state_like(parallel.make_mesh(1, 1, jax.devices()[:1]))
  with checkpoints.StateCheckpoints(os.path.join(session_job, 'checkpoints')) as ckpts:
    restored = ckpts.restore(fsdp, TINY_JOB_TOTAL)
    reference = ckpts.restore(single, TINY_JOB_TOTAL)
  return {
      'equal': all(np.array_equal(parallel.to_host(a), parallel.to_host(b))
                   for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(restored))),
      'target_shardings': all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(fsdp),
                                                                        jax.tree.leaves(restored))),
      'sharded_leaves': sum(1 for x in jax.tree.leaves(restored)
                            if not x.sharding.is_fully_replicated),
      'leaves': len(jax.tree.leaves(restored))}


def main(root, teacher):
  out = {'num_devices': len(jax.devices())}
  out.update(driver_runs(root, teacher))
  out['restore_into_fsdp'] = restore_into_fsdp(os.path.dirname(teacher.rstrip('/')))
  print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
  main(*sys.argv[1:3])
