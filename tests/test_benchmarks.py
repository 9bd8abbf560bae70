"""The benchmark scripts: throughput and scaling end to end on a tiny model, quality's building blocks
plus one tiny distillation through its whole pipeline (the full --quick run takes minutes)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, 'benchmarks')
sys.path.insert(0, BENCHMARKS)

import quality  # noqa: E402  (benchmarks/quality.py)
import quality_sweep  # noqa: E402  (benchmarks/quality_sweep.py)

# The tests' tiny model (tests/tiny.py): its programs are in the session's compilation cache.
TINY_JOB = '--config=tests/tiny_job.py'


def run_script(name, *args, timeout=300):
  result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_host_sync_tiny(tiny):
  """The host-read benchmark runs the tiny TRACT step both ways and reports two positive times."""
  import host_sync
  out = host_sync.measure(tiny(), 'tract', 8, steps=2, rounds=1, log=lambda *a: None)
  assert set(out) == {'no_read', 'read_per_step'} and min(out.values()) > 0


@pytest.mark.slow
def test_throughput_tiny(tmp_path):
  out = tmp_path / 'throughput.json'
  cache = jax.config.jax_compilation_cache_dir or 'none'  # the tests' cache: reruns load compiles
  stdout = run_script('throughput.py', TINY_JOB, '--batch=8', '--steps=2',
                      '--peak_size=256', f'--json={out}', f'--compile_cache={cache}',
                      '--what=teacher,tract,btd,sample,fid', '--fid_batch=2', '--fid_size=75')
  result = json.loads(out.read_text())
  rows = {r['name']: r for r in result['benchmarks']}
  assert list(rows) == ['teacher step', 'tract step', 'btd step', 'DDIM 1 step', 'DDIM 8 steps',
                        'DDIM 16 steps', 'FID features']
  for name, row in rows.items():
    assert name in stdout
    assert row['ms_per_call'] > 0 and row['images_per_s'] > 0
    assert row['batch'] == (2 if name == 'FID features' else 8)
    assert row['flops_per_call'] > 0 and 0 < row['fraction_of_peak']
  for name in ('teacher step', 'tract step', 'btd step', 'DDIM 1 step', 'FID features'):
    row = rows[name]
    assert row['compile_s'] == pytest.approx(row['lower_s'] + row['xla_compile_s'])
    if cache != 'none':
      assert row['cached_compile_s'] > 0
  assert rows['tract step']['note'] == 'schedule 16,4,1'
  assert rows['btd step']['note'] == 'schedule 16,8,4,2,1'
  # TRACT: teacher + self-teacher + student forward and the backward; the teacher step: forward and
  # backward. About 5 vs 3 network evaluations.
  ratio = rows['tract step']['flops_per_call'] / rows['teacher step']['flops_per_call']
  assert 1.4 < ratio < 1.9, ratio
  assert rows['DDIM 8 steps']['flops_per_call'] == pytest.approx(8 * rows['DDIM 1 step']['flops_per_call'])
  assert rows['DDIM 8 steps']['compile_s'] == 0.0  # one compiled sampler for every step count
  assert result['matmul_peak']['flops_per_s'] > 0 and result['peak_memory']['bytes'] > 0
  assert result['matmul_peak']['dtype'] == 'float32' and result['dtype'] == 'float32'
  fid = result['fid']
  assert fid['total_s'] == pytest.approx(fid['sampling_s'] + fid['features_s'])
  assert fid['sampling_s'] == pytest.approx(50_000 / fid['sample_1step_images_per_s'])
  assert 'GFLOP/call' in stdout and 'peak:' in stdout and 'FID@50k at 1 step' in stdout


@pytest.mark.slow
def test_gpu_check_script(tmp_path):
  """benchmarks/gpu_check.sh parses (bash -n) and its --dry-run (tiny models on CPU) writes the
  table and the JSON with every run ok. The float32 CIFAR-10 run is left out (--runs): the same
  throughput.py path in float32 as test_throughput_tiny's, one more process and compile."""
  script = os.path.join(BENCHMARKS, 'gpu_check.sh')
  subprocess.run(['bash', '-n', script], check=True)
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS='cpu',
             GPU_CHECK_CACHE=jax.config.jax_compilation_cache_dir or '')
  if not env['GPU_CHECK_CACHE']:
    del env['GPU_CHECK_CACHE']
  result = subprocess.run(['bash', script, '--dry-run', '--runs=cifar10_bf16,imagenet64_bf16,fid'],
                          cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  summary = json.loads((tmp_path / 'gpu_check.json').read_text())
  assert summary['dry_run'] is True
  assert {name: run['status'] for name, run in summary['runs'].items()} == {
      'cifar10_bf16': 'ok', 'imagenet64_bf16': 'ok', 'fid': 'ok'}
  assert summary['runs']['cifar10_bf16']['result']['dtype'] == 'bfloat16'
  assert summary['runs']['cifar10_bf16']['result']['matmul_peak']['dtype'] == 'bfloat16'
  assert summary['runs']['imagenet64_bf16']['result']['benchmarks'][0]['cached_compile_s'] > 0
  assert 'FID@50k at 1 step' in result.stdout and 'images/s' in result.stdout


@pytest.mark.slow
def test_scaling_quick():
  stdout = run_script('scaling.py', '--quick', '--devices=1,8', TINY_JOB, timeout=400)
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.split()[:2] == ['devices', 'batch/device'])
  table = [l.split() for l in lines[start + 2:start + 4]]
  assert [int(r[0]) for r in table] == [1, 8]
  assert [int(r[1]) for r in table] == [16, 2]  # the same global batch 16 split over the devices
  assert float(table[0][-1]) == 1.0
  assert 'not a speed claim' in stdout


def test_quality_plans_share_the_budget(tiny):
  config = tiny(teacher_steps=64, batch_size=64)
  budget = 89_600
  plans = quality.make_plans(config, budget)
  schedules = {key: plan.schedule for key, (_, plan) in plans.items()}
  assert schedules == {'tract_64-8-1': (64, 8, 1), 'tract_64-1': (64, 1),
                       'btd_1': (64, 32, 16, 8, 4, 2, 1), 'tract_64-8-2': (64, 8, 2),
                       'btd_2': (64, 32, 16, 8, 4, 2)}
  for _, plan in plans.values():
    used = plan.total_steps * config.batch_size
    assert budget - config.batch_size * plan.num_phases < used <= budget
  with pytest.raises(quality.phases.ConfigError, match='--methods'):
    quality.make_plans(config, budget, ['tract_64-8-3'])
  with pytest.raises(quality.phases.ConfigError, match='teacher_steps=8'):
    quality.method_specs(8)
  # The paper's regime: T = 1024 goes through 32 steps (1024,32,1), like the CIFAR-10 schedule.
  assert [spec[3] for spec in quality.method_specs(1024)][::3] == [(1024, 32, 1), (1024, 32, 2)]


def test_quality_grid_and_table(tmp_path):
  rng = np.random.default_rng(0)
  sets = [rng.uniform(-1, 1, (70, 8, 8, 1)) for _ in range(3)]
  path = quality.side_by_side(str(tmp_path / 'grid.png'), sets)
  from PIL import Image
  width, height = Image.open(path).size
  mosaic = 8 * (8 * 3 + 1) + 1 + 2 * 9  # 8 images of 24 px with 1 px gaps, a 9 px margin
  assert height == mosaic + 2 and width == 3 * (mosaic + 1) + 1
  result = {'rows': [{'name': 'teacher 16 steps', 'sampling_steps': 16, 'fid': 1.5,
                      'rmse_vs_teacher': 0.0},
                     {'name': 'TRACT 16,8,1', 'sampling_steps': 1, 'train_steps': 12,
                      'train_samples': 192, 'train_s': 3.0, 'fid': 2.5, 'rmse_vs_teacher': 0.1},
                     {'name': 'real digits (32)', 'sampling_steps': None, 'fid': 0.5,
                      'rmse_vs_teacher': None}],
            'num_samples': 32, 'teacher_steps': 16, 'budget': 192, 'batch': 16, 'grid': path}
  table = quality.format_table(result)
  assert 'TRACT 16,8,1' in table and '0.1000' in table and 'real digits (32)' in table


@pytest.mark.slow
def test_quality_pipeline_one_method(tmp_path, tiny):
  """Teacher training, one TRACT run, sampling and scoring, the JSON and the grid; a second call
  reuses the finished teacher and run."""
  config = tiny(**{'teacher_training.train_steps': 2})
  kwargs = dict(budget=2 * 2 * config.batch_size, num_samples=16, keys=['tract_16-8-1'],
                intermediate=8, log=lambda *a: None)
  result = quality.run_quality(config, str(tmp_path), **kwargs)
  names = [r['name'] for r in result['rows']]
  assert names == ['teacher 16 steps', 'teacher 1 step (undistilled)',
                   'teacher 2 steps (undistilled)', 'TRACT 16,8,1', 'real digits (16)']
  rows = {r['name']: r for r in result['rows']}
  assert rows['teacher 16 steps']['rmse_vs_teacher'] == 0.0
  assert rows['TRACT 16,8,1']['train_samples'] == 32 and rows['TRACT 16,8,1']['sampling_steps'] == 1
  assert all(np.isfinite(r['fid']) for r in result['rows'])
  assert all(np.isfinite(r['kid']) for r in result['rows'])
  assert os.path.exists(tmp_path / 'quality_grid.png')
  assert json.loads((tmp_path / 'quality.json').read_text())['rows'] == result['rows']
  again = quality.run_quality(config, str(tmp_path), **kwargs)
  assert again['rows'][3]['fid'] == pytest.approx(rows['TRACT 16,8,1']['fid'])
  # Another budget in the same run directory is refused instead of resumed.
  with pytest.raises(quality.phases.ConfigError, match='train_samples'):
    quality.run_quality(config, str(tmp_path), **dict(kwargs, budget=4 * 2 * config.batch_size))

  # The budget sweep over the same tiny run (the compiled step is shared): two seeds of one budget,
  # rows on disk, a re-run that skips them, the table and the plot.
  sweep_dir = str(tmp_path / 'sweep')
  sweep = dict(teacher_path=str(tmp_path / 'teacher' / 'ema_params'), budgets=['32'], seeds=2,
               multi_seed_budgets=1, keys=['tract_16-8-1'], intermediate=8, num_samples=16,
               log=lambda *a: None)
  assert quality_sweep.run_sweep(config, sweep_dir, **sweep) == 2
  assert quality_sweep.run_sweep(config, sweep_dir, **sweep) == 0
  _, sweep_rows = quality_sweep.load_rows(sweep_dir)
  assert sorted((r['budget'], r['seed']) for r in sweep_rows) == [(32, 0), (32, 1)]
  assert all(np.isfinite([r['fid'], r['kid'], r['rmse_vs_teacher']]).all() for r in sweep_rows)
  table = quality_sweep.collect(sweep_dir, log=lambda *a: None)
  assert '| TRACT 16,8,1 | 1 |' in table and '(n=2)' in table and 'teacher, undistilled' in table
  assert os.path.getsize(os.path.join(sweep_dir, 'quality_sweep.png')) > 10_000


def test_quality_sweep_aggregates_seeds_and_orders_runs():
  assert quality_sweep.run_list(['153600', '38400', '614400'], 2, 2) == [
      (38400, 0), (38400, 1), (153600, 0), (153600, 1), (614400, 0)]
  base = {'label': 'BTD 16..1', 'key': 'btd_1', 'method': 'btd', 'schedule': [16, 8, 4, 2, 1],
          'sampling_steps': 1}
  rows = [dict(base, budget=64, seed=s, fid=f, kid=k, rmse_vs_teacher=r)
          for s, (f, k, r) in enumerate([(4.0, 0.5, 0.1), (6.0, 0.7, 0.3)])]
  agg = quality_sweep.aggregate(rows)
  (budget, stats, n), = agg['btd_1']['points']
  assert (budget, n) == (64, 2)
  assert stats['fid'] == (5.0, 4.0, 6.0) and stats['rmse_vs_teacher'][0] == pytest.approx(0.2)
  with pytest.raises(quality.phases.ConfigError, match='budgets'):
    quality_sweep.run_list(['0'], 1, 1)
