"""gs:// paths against a real GCS emulator on 127.0.0.1 (tests/gcs_emulator.py), no mocks: a gs://
workdir trained, SIGTERMed, resumed, evaluated and sampled through the real command line, and the
TFDS data_dir, export, import_teacher and workdir protection on gs://. The gs:// tests are skipped
when gcp-storage-emulator or gcsfs is not installed (the `test` extra installs both)."""
import json
import os
import re
import struct
import sys

import jax
import numpy as np
import pytest
from etils import epath

from conftest import (ROOT, TINY_JOB_TOTAL, run_tiny_job, sigterm_mid_phase, start_tiny_job,
                      tiny_config, tiny_job_final_state)
from gcs_emulator import Emulator, available
from tract_jax import checkpoints, config_checks, data, export, import_teacher, paths
from tract_jax import workdir as workdirs
from tract_jax.errors import ConfigError

needs_emulator = pytest.mark.skipif(bool(available()), reason=f'GCS emulator {available()}')
# Phase ends and the signal still save; fewer periodic saves keep the single-threaded emulator quick.
FEWER_SAVES = '--config.checkpoint_every=100'


@pytest.fixture(scope='module')
def gcs():
  """The emulator, with this process's environment pointing gcsfs, tensorstore and array_record at
  it for the module's tests (the jobs started from here inherit it)."""
  with Emulator() as emulator, pytest.MonkeyPatch.context() as env:
    for key, value in emulator.env.items():
      env.setenv(key, value)
    yield emulator


def _event_tags(data_bytes: bytes):
  """(step, tag) of every scalar in a TensorBoard event file (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  out, pos = [], 0
  while pos < len(data_bytes):
    (length,) = struct.unpack('<Q', data_bytes[pos:pos + 8])
    event = event_pb2.Event.FromString(data_bytes[pos + 12:pos + 12 + length])
    out += [(event.step, value.tag) for value in event.summary.value]
    pos += 12 + length + 4
  return out


def _logged_steps(summary: epath.Path, key: str):
  lines = [line for line in summary.read_text().splitlines() if key in line]
  return sorted(int(re.search(r'"step": (\d+)', line).group(1)) for line in lines)


@pytest.mark.slow
@needs_emulator
def test_gs_workdir_train_sigterm_resume_evaluate_sample(gcs, tiny_job_reference):
  """The tiny job (teacher, then TRACT 16 -> 4 -> 1) with --workdir=gs://...: SIGTERM mid-phase saves
  to the bucket and exits 75; the same command resumes from the bucket and ends bit-identical to an
  uninterrupted local run; evaluate and sample read the bucket and write their outputs there."""
  workdir = f'gs://{gcs.bucket}/runs/tiny'
  run = epath.Path(workdir)
  proc = start_tiny_job(workdir, FEWER_SAVES)
  returncode, out = sigterm_mid_phase(proc)
  assert returncode == 75, out[-3000:]
  stopped_at = int(re.search(r'Interrupted: signal 15 at step (\d+)', out).group(1))
  assert checkpoints.is_complete(run / 'checkpoints' / str(stopped_at))
  assert checkpoints.is_complete(run / 'teacher' / 'ema_params')

  code, out = run_tiny_job(workdir, FEWER_SAVES)
  assert code == 0, out[-3000:]
  assert f'Teacher already trained: {workdir}/teacher/ema_params' in out
  assert f'Resumed tract at step {stopped_at} from {workdir}/checkpoints' in out
  final = tiny_job_final_state(workdir)
  assert len(final) == len(tiny_job_reference)
  assert all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(final, tiny_job_reference))
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # nothing went to a local folder 'gs:'

  # What a workdir holds, all in the bucket; the logs of both runs joined (staged, then copied).
  for name in ('config.json', 'result.json', 'teacher_samples_16.npz', 'teacher_16steps.png',
               'phase0_student_4steps.png', 'phase1_student_1steps.png',
               'teacher/ema_params'):
    assert (run / name).exists(), name
  assert checkpoints.newest_params(workdir) == (f'{workdir}/phase_1_ema', 'student', 1)
  assert _logged_steps(run / 'summary.jsonl', 'tract/loss') == list(range(1, TINY_JOB_TOTAL + 1))
  assert _logged_steps(run / 'teacher' / 'summary.jsonl', 'teacher/loss') == list(range(1, 7))
  events = sorted((run / 'tensorboard').iterdir())
  assert len(events) == 2  # one event file per run
  tags = [t for f in events for t in _event_tags(f.read_bytes())]
  assert sorted(s for s, tag in tags if tag == 'tract/loss') == list(range(1, TINY_JOB_TOTAL + 1))
  assert 'eval/rmse_vs_teacher' in {tag for _, tag in tags}

  # Both read-only modes at once (they write different files): scores, and samples to gs://.
  samples = f'gs://{gcs.bucket}/outputs/samples.npz'
  jobs = [start_tiny_job(workdir, '--config.mode=evaluate'),
          start_tiny_job(workdir, '--config.mode=sample', f'--config.eval.output={samples}')]
  for job in jobs:
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
  scores = json.loads((run / 'eval_1steps.json').read_text())
  result = json.loads((run / 'result.json').read_text())
  assert scores['params'] == f'{workdir}/phase_1_ema'
  assert scores['rmse_vs_teacher'] == pytest.approx(result['rmse_student_vs_teacher'], rel=1e-5)
  assert paths.load_npz(samples)['images'].shape == (8, 8, 8, 1)
  assert epath.Path(f'gs://{gcs.bucket}/outputs/samples.png').read_bytes()[:4] == b'\x89PNG'


def _random_params(config, seed):
  like = import_teacher.abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten(like)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves])


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@needs_emulator
def test_tfds_export_import_and_overwrite_on_gs(gcs, tmp_path):
  root = f'gs://{gcs.bucket}/misc'
  # TFDS data_dir in the bucket: metadata through etils.epath, records through array_record's
  # own GCS client (google-cloud-cpp).
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import input_pipeline  # noqa: E402  (benchmarks/input_pipeline.py, the writer test_data uses)
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  input_pipeline.write_tfds_split(str(tmp_path / 'tfds'), 'cifar10', images, [3, 0, 9, 1, 5])
  for local in sorted((tmp_path / 'tfds').rglob('*')):
    if local.is_file():
      paths.copy_file(local, f'{root}/tfds/{local.relative_to(tmp_path / "tfds")}')
  source = data.load_source(_data_config('cifar10', f'{root}/tfds'))
  batch = source.get(np.arange(5)[::-1])
  np.testing.assert_array_equal(batch['image'], images[::-1].astype(np.float32) / 127.5 - 1.0)
  assert 'tensorflow' not in sys.modules

  config = tiny_config()
  # Export from a gs:// workdir to gs://, read back; import that file as a teacher into gs://,
  # which then passes the start-up check and restores.
  student = _random_params(config, 1)
  checkpoints.save_params(f'{root}/run/phase_1_ema', student)
  meta = export.export_params(f'{root}/run', config, f'{root}/student.msgpack')
  assert meta['sample_steps'] == 1 and meta['params_file'] == 'student.msgpack'
  params, loaded_meta = export.load_exported(f'{root}/student.msgpack')
  _assert_same(params, student)
  assert loaded_meta['sample_steps'] == 1
  import_teacher.import_teacher(f'{root}/student.msgpack', config, f'{root}/teacher')
  assert epath.Path(f'{root}/teacher/import_info.json').exists()
  config.teacher_checkpoint = f'{root}/teacher'
  config_checks.validate_config(config)
  _assert_same(checkpoints.load_params(f'{root}/teacher', import_teacher.abstract_params(config)),
               student)

  # Workdir protection: an incompatible run is refused, overwrite=True deletes it from the bucket.
  workdirs.record_config(config, f'{root}/run')
  paths.write_bytes(f'{root}/run/teacher_1steps.png', b'png')
  config.seed = 7
  with pytest.raises(ConfigError, match='seed: 0 -> 7'):
    workdirs.protect(config, f'{root}/run')
  config.overwrite = True
  workdirs.protect(config, f'{root}/run')
  left = {p.name for p in epath.Path(f'{root}/run').iterdir()} if epath.Path(
      f'{root}/run').exists() else set()
  assert left <= {'config.json'}, left


def _data_config(name, data_dir):
  import ml_collections
  return ml_collections.ConfigDict({'name': name, 'data_dir': data_dir, 'image_size': 0,
                                    'random_flip': False, 'workers': 0, 'prefetch': 2})


@pytest.mark.parametrize('path,message', [
    ('az://container/run', "workdir='az://container/run': az:// paths are not supported (local "
                           'paths, gs://, s3:// are)'),
    ('://run', "workdir='://run': not a valid URL"),
])
def test_unsupported_schemes_are_one_line_errors(path, message):
  with pytest.raises(ConfigError) as error:
    paths.check('workdir', path)
  assert str(error.value).startswith(message) and '\n' not in str(error.value)


def test_a_missing_backend_is_a_one_line_error():
  import importlib.util
  if importlib.util.find_spec('s3fs') is not None:
    pytest.skip('s3fs is installed here')
  with pytest.raises(ConfigError, match=r"^workdir='s3://b/run': s3:// paths need the s3fs "
                                        r'package, which is not installed \(pip install s3fs\)$'):
    paths.check('workdir', 's3://b/run')
  paths.check('workdir', '/tmp/run')  # local paths pass
  paths.check('workdir', '')
