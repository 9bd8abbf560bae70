"""The command line: config files, --config overrides, one-line errors for bad configs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'


def run_main(tmp_path, *overrides, config='configs/demo.py', xla_flags=''):
  cmd = [sys.executable, '-m', 'tract_jax.main', f'--config={config}', f'--workdir={tmp_path}',
         *overrides]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize('override,expected', [
    ('--config.method=distill', "method='distill': allowed values are 'teacher', 'tract', 'btd'"),
    ('--config.time_schedule=64,10,1', "time_schedule='64,10,1': every entry must divide"),
    ('--config.time_schedule=64,8,8,1', 'strictly decreasing'),
    ('--config.model.mean_type=noise', "model.mean_type='noise': allowed values"),
    ('--config.data.name=mnist', "data.name='mnist': unknown dataset; allowed"),
    ('--config.teacher_checkpoint=/nonexistent/teacher', 'teacher_checkpoint='),
    ('--config.loss_reduction=max', "loss_reduction='max'"),
    ('--config.model.ch_mult=(1,2,2,2,2)', 'side is divisible by 16'),
    ('--config.nonfinite=ignore', "nonfinite='ignore': allowed values are 'stop', 'skip'"),
    ("--config.eval.metrics=('fid',)", "eval.inception_weights='': 'fid' in eval.metrics needs"),
    ('--config.mesh.fsdp=3', 'mesh.fsdp=3: must be a positive divisor of the 8 devices'),
    ('--config.mesh.data=4', 'data * fsdp must equal the 8 devices'),
    ('--config.batch_size=60', 'batch_size=60: must be divisible by the 8 devices'),
    ('--config.ema_reset=sometimes', "ema_reset='sometimes'"),
    ('--config.train_samples=10', 'train_samples=10: too small for 2 phases'),
    ('--config.model.dtype=float16', "model.dtype='float16': allowed values are 'float32', 'bfloat16'"),
    ('--config.model.remat=all', "model.remat='all': allowed values are 'none', 'blocks'"),
    ('--config.teacher_checkpoint=az://bucket/teacher', 'az:// paths are not supported (local paths'),
])
def test_bad_config_fails_at_start_with_one_line(tmp_path, override, expected):
  # Eight simulated devices, so that the mesh and batch checks have something to check against.
  result = run_main(tmp_path, override, xla_flags=EIGHT_DEVICES)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('Configuration error')]
  assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_config_file_and_overrides(tmp_path):
  """Overrides reach the job: a tiny teacher-only run through the real command line."""
  result = run_main(tmp_path, '--config.method=teacher', '--config.teacher_training.train_steps=2',
                    '--config.teacher_steps=4', '--config.model.ch=8', '--config.model.emb_ch=16',
                    '--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()',
                    '--config.model.num_groups=4', '--config.eval.num_samples=4', '--config.eval.sample_batch=4',
                    '--config.log_every=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert '[teacher] step 2/2' in result.stdout
  assert os.path.isdir(tmp_path / 'ema_params')
  assert os.path.exists(tmp_path / 'teacher_4steps.png')
  assert '"ch": 8' in (tmp_path / 'config.json').read_text()


def test_unsupported_remote_workdir_is_refused_not_written_locally(tmp_path):
  """A URL no installed package can reach stops at start-up with one line (gs:// itself works: see
  test_gcs.py); os.path would have turned it into a local folder 'ftp:' that dies with the machine."""
  proc = run_main('ftp://host/run')
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith('Configuration error')]
  assert len(lines) == 1 and "workdir='ftp://host/run': ftp:// paths are not supported" in lines[0]
  assert not os.path.exists(os.path.join(ROOT, 'ftp:'))
