"""Run by test_multidevice.py in a subprocess with 8 simulated CPU devices: the driver end to end
on two meshes, the way a pod user runs it (teacher job, then TRACT and BTD from that teacher's
checkpoint, evaluate and sample), leaving a TRACT run interrupted mid-phase for the 1-device resume
in the test. Prints one JSON line of results."""
import json
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import chex  # noqa: E402

chex.set_n_cpu_devices(8)  # before JAX starts its backend: 8 simulated CPU devices

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402  (also sets the tests' compilation cache)
from tract_jax import steps, train  # noqa: E402


class Interrupt(Exception):
  pass


def interrupted_at(at_step):
  """Train steps built from now on raise Interrupt at update `at_step` (a crash mid-phase)."""
  original = steps.make_train_step

  def make(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def wrapped(state, batch):
      if int(state.step) == at_step:
        raise Interrupt()
      return step_fn(state, batch)

    return wrapped

  steps.make_train_step = make
  return original


def main(root):
  out = {'num_devices': len(jax.devices())}
  teacher_dir = os.path.join(root, 'teacher')
  train.train_and_evaluate(tiny_config('teacher'), teacher_dir)

  # TRACT on a data-8 mesh from the teacher checkpoint, stopped at update 9 (checkpoint 8).
  tract = tiny_config('tract', teacher_checkpoint=teacher_dir)
  original = interrupted_at(9)
  try:
    train.train_and_evaluate(tract, os.path.join(root, 'tract'))
    out['tract_interrupted'] = False
  except Interrupt:
    out['tract_interrupted'] = True
  finally:
    steps.make_train_step = original

  # BTD on an FSDP 2x4 mesh (small leaves sharded too), then evaluate and sample its workdir there.
  btd = tiny_config('btd', teacher_checkpoint=teacher_dir, time_schedule='16,8,4')
  btd.mesh.update(data=2, fsdp=4, fsdp_min_size=64)
  btd_dir = os.path.join(root, 'btd')
  result = train.train_and_evaluate(btd, btd_dir)
  out['btd_rmse'] = result['rmse_student_vs_teacher']
  btd.mode = 'evaluate'
  out['btd_evaluate'] = train.train_and_evaluate(btd, btd_dir)
  btd.mode = 'sample'
  sampled = train.train_and_evaluate(btd, btd_dir)
  out['btd_samples_shape'] = list(np.load(sampled['samples'])['images'].shape)
  print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1])
