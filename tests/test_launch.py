"""launch/tpu_vm.sh and launch/gpu.sh: syntax, shellcheck, the commands --dry-run prints (with a
gcloud on PATH that fails if called), and the remote shell commands run locally with fakes."""
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
GPU = os.path.join(ROOT, 'launch', 'gpu.sh')
OVERRIDES = ['--config.batch_size=256', "--config.note=it's a b"]


def write_script(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def env(tmp_path):
  """PATH with a gcloud that records any call and fails; TMPDIR in tmp_path."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_script(bin_dir / 'gcloud', f'#!/bin/sh\necho "$@" >> {tmp_path}/gcloud_called\nexit 1\n')
  return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', TMPDIR=str(tmp_path))


def launch(script, *args, env, cwd=None, expect_rc=0):
  result = subprocess.run(['bash', script, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=30)
  assert result.returncode == expect_rc, result.stderr
  return result


def commands(stdout):
  return [line for line in stdout.splitlines() if line and not line.startswith('#')]


def remote_command(line):
  """The --command=... of a printed `gcloud ... ssh` line."""
  words = shlex.split(line)
  assert words[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and '--worker=all' in words
  (command,) = [w[len('--command='):] for w in words if w.startswith('--command=')]
  return command


@pytest.mark.parametrize('script', [TPU, GPU])
def test_syntax_and_shellcheck(script):
  subprocess.run(['bash', '-n', script], check=True)
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed')
  result = subprocess.run(['shellcheck', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_dry_run(env, tmp_path):
  out = launch(TPU, '--name', 'tract-test', '--zone', 'us-central2-b', '--accelerator', 'v4-16',
               '--spot', '--config', 'configs/cifar10_tract.py', '--workdir=gs://bucket/run',
               '--dry-run', '--', *OVERRIDES, env=env).stdout
  lines = commands(out)
  assert lines[0].startswith('gcloud compute tpus tpu-vm describe tract-test --zone=us-central2-b')
  assert lines[1] == ('gcloud compute tpus tpu-vm create tract-test --zone=us-central2-b '
                      '--accelerator-type=v4-16 --version=tpu-ubuntu2204-base --spot')
  assert 'pgrep' in remote_command(lines[2])
  assert lines[3].startswith(f'git -C {ROOT} ls-files -z') and '| tar -C' in lines[3]
  assert lines[4].startswith('gcloud compute tpus tpu-vm scp ') and '--worker=all' in lines[4]
  install = remote_command(lines[6])
  assert 'python3.11 -m venv tract_venv' in install and 'pip install -q -e ".[tpu]"' in install
  start = remote_command(lines[7])
  assert 'nohup' in start and '$HOME/tract_jax_run.log' in start
  argv = shlex.split(start.split('nohup ', 1)[1].split(' >>', 1)[0])
  assert argv == ['$HOME/tract_venv/bin/python', '-m', 'tract_jax.main',
                  '--config=configs/cifar10_tract.py', '--workdir=gs://bucket/run', *OVERRIDES]
  assert len(lines) == 8
  assert not (tmp_path / 'gcloud_called').exists()


def test_tpu_dry_run_teacher_and_data_on_gs(env, tmp_path):
  """--teacher and --data-dir become the job's teacher_checkpoint and data.data_dir on every worker,
  before the user's overrides; gs:// paths raise no warning."""
  result = launch(TPU, '--name', 'n', '--zone', 'z', '--config', 'configs/cifar10_tract.py',
                  '--workdir', 'gs://b/runs/c10', '--teacher', 'gs://b/teachers/cifar10',
                  '--data-dir=gs://b/tensorflow_datasets', '--dry-run', '--', *OVERRIDES, env=env)
  start = remote_command(commands(result.stdout)[7])
  argv = shlex.split(start.split('nohup ', 1)[1].split(' >>', 1)[0])
  assert argv[1:] == ['-m', 'tract_jax.main', '--config=configs/cifar10_tract.py',
                      '--workdir=gs://b/runs/c10', '--config.teacher_checkpoint=gs://b/teachers/cifar10',
                      '--config.data.data_dir=gs://b/tensorflow_datasets', *OVERRIDES]
  assert 'warning' not in result.stderr
  assert not (tmp_path / 'gcloud_called').exists()


def test_tpu_dry_run_queued_repo(env, tmp_path):
  out = launch(TPU, '--name', 'q1', '--zone', 'europe-west4-a', '--project', 'proj', '--queued',
               '--repo', 'https://github.com/me/tract_jax.git', '--branch', 'dev', '--config',
               'configs/demo.py', '--workdir', 'gs://b/r', '--dry-run', env=env).stdout
  lines = commands(out)
  assert lines[1] == ('gcloud compute tpus queued-resources create q1 --node-id=q1 '
                      '--zone=europe-west4-a --project=proj --accelerator-type=v4-8 '
                      '--runtime-version=tpu-ubuntu2204-base')
  assert lines[2].startswith('gcloud compute tpus queued-resources describe q1') and \
      'state.state' in lines[2]
  assert 'git clone --quiet --depth=1 --branch=dev https://github.com/me/tract_jax.git tract_jax' \
      in remote_command(lines[4])
  assert all('--project=proj' in line for line in lines if line.startswith('gcloud'))
  assert '--spot' not in out and ' scp ' not in out
  assert not (tmp_path / 'gcloud_called').exists()


@pytest.mark.parametrize('args,message', [
    (['--zone', 'z', '--config', 'c.py', '--workdir', 'gs://b'], '--name is required'),
    (['--name', 'n', '--zone', 'z', '--config', 'c.py'], '--workdir is required'),
    (['--name', 'n', '--zone'], '--zone needs a value'),
    (['--name', 'n', '--zone', 'z', '--config', 'c', '--workdir', 'w', '--copy', '--repo', 'u'],
     'not both'),
    (['--bogus'], 'unknown argument: --bogus'),
])
def test_tpu_bad_arguments(args, message, env):
  assert message in launch(TPU, *args, '--dry-run', env=env, expect_rc=2).stderr


def test_tpu_remote_commands_work(env, tmp_path):
  """Runs the printed copy/extract and start commands locally, with HOME in tmp_path and a fake
  python: the code arrives, and the start command returns while the job keeps running."""
  out = launch(TPU, '--name', 'local', '--zone', 'z', '--config', 'configs/demo.py',
               '--workdir', 'gs://b/r', '--dry-run', '--', *OVERRIDES, env=env).stdout
  lines = commands(out)
  home = tmp_path / 'home'
  (home / 'tract_venv' / 'bin').mkdir(parents=True)
  remote = dict(env, HOME=str(home))
  subprocess.run(['bash', '-c', lines[3]], check=True, env=remote)  # git ls-files | tar
  shutil.copy(shlex.split(lines[4])[5], home / 'tract_jax_src.tgz')  # what scp does
  subprocess.run(['bash', '-c', remote_command(lines[5])], check=True, env=remote)
  assert (home / 'tract_jax' / 'tract_jax' / 'data' / 'pipeline.py').is_file()
  assert (home / 'tract_jax' / 'launch' / 'tpu_vm.sh').is_file()

  write_script(home / 'tract_venv' / 'bin' / 'python',
               f'#!/bin/sh\necho $$ > {tmp_path}/pid\nprintf "%s\\n" "$@" > {tmp_path}/argv\n'
               'exec sleep 30\n')
  start = time.perf_counter()
  result = subprocess.run(['bash', '-c', remote_command(lines[7])], env=remote, timeout=20,
                          capture_output=True, text=True)  # pipes: would hang if the job held them
  try:
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.perf_counter() - start < 15
    assert 'started, log in' in result.stdout
    assert (tmp_path / 'argv').read_text().splitlines() == [
        '-m', 'tract_jax.main', '--config=configs/demo.py', '--workdir=gs://b/r', *OVERRIDES]
    assert 'starts' in (home / 'tract_jax_run.log').read_text()
  finally:
    if (tmp_path / 'pid').exists():
      os.kill(int((tmp_path / 'pid').read_text()), signal.SIGTERM)


def test_gpu_dry_run(env, tmp_path):
  out = launch(GPU, '--config', 'configs/cifar10_tract.py', '--workdir', 'runs/c10',
               '--venv', str(tmp_path / 'venv'), '--coordinator', '10.0.0.2:1234',
               '--num-processes', '2', '--process-id', '1', '--mem-fraction', '.8',
               '--background', '--dry-run', '--', *OVERRIDES, env=env, cwd=tmp_path).stdout
  lines = commands(out)
  venv = tmp_path / 'venv'
  assert lines[:4] == [f'cd {ROOT}', f'python3.11 -m venv {venv}',
                       f'{venv}/bin/pip install -q -U pip',
                       f"{venv}/bin/pip install -q -e '.[cuda]'"]
  assert lines[4] == f'mkdir -p {tmp_path}/runs/c10'
  assert lines[5].endswith(f' >> {tmp_path}/runs/c10/run.log 2>&1 < /dev/null &')
  words = shlex.split(lines[5].split(' >> ')[0])
  assert words[:2] == ['nohup', 'env']
  assert words[2:6] == ['XLA_PYTHON_CLIENT_MEM_FRACTION=.8', 'JAX_COORDINATOR_ADDRESS=10.0.0.2:1234',
                        'JAX_NUM_PROCESSES=2', 'JAX_PROCESS_ID=1']
  assert words[6:13] == [f'{venv}/bin/python', '-m', 'tract_jax.main',
                         '--config=configs/cifar10_tract.py', f'--workdir={tmp_path}/runs/c10',
                         *OVERRIDES]
  assert not venv.exists()


@pytest.mark.parametrize('args,message', [
    (['--workdir', 'w'], '--config is required'),
    (['--config', 'c', '--workdir', 'w', '--coordinator', 'h:1'], 'together'),
    (['--config', 'c', '--workdir', 'w', '--coordinator', 'h:1', '--num-processes', '2',
      '--process-id', '2'], 'must be below'),
    (['--config', 'c', '--workdir', 'w', '--mem-fraction', '1.5'], 'expected a number'),
])
def test_gpu_bad_arguments(args, message, env):
  assert message in launch(GPU, *args, '--dry-run', env=env, expect_rc=2).stderr


def test_gpu_runs_the_job(env, tmp_path):
  """Not a dry run: an existing venv whose python prints what it was given."""
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  write_script(tmp_path / 'venv' / 'bin' / 'python',
               '#!/bin/sh\necho "fraction=$XLA_PYTHON_CLIENT_MEM_FRACTION gpus=$CUDA_VISIBLE_DEVICES"'
               '\nprintf "%s\\n" "$@"\n')
  result = launch(GPU, '--config=configs/demo.py', '--workdir', str(tmp_path / 'w'), '--venv',
                  str(tmp_path / 'venv'), '--no-install', '--gpus', '0,1', '--', *OVERRIDES,
                  env=env)
  assert result.stdout.splitlines() == [
      'fraction=0.9 gpus=0,1', '-m', 'tract_jax.main', '--config=configs/demo.py',
      f'--workdir={tmp_path}/w', *OVERRIDES]
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9' in result.stderr  # the '+ command' echo
