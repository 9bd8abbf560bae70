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
import throughput  # noqa: E402  (benchmarks/throughput.py)

# A one-level 8-channel UNet on the digits: compiles in seconds.
TINY = ['--config.teacher_steps=16', '--config.time_schedule=16,4,1', '--config.model.ch=8',
        '--config.model.emb_ch=16', '--config.model.ch_mult=(1,)',
        '--config.model.attn_resolutions=()', '--config.model.num_groups=4']


def run_script(name, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


def test_throughput_tiny(tmp_path):
  out = tmp_path / 'throughput.json'
  stdout = run_script('throughput.py', '--config=configs/demo.py', *TINY, '--batch=8', '--steps=2',
                      '--peak_size=256', f'--json={out}')
  result = json.loads(out.read_text())
  rows = {r['name']: r for r in result['benchmarks']}
  assert list(rows) == ['teacher step', 'tract step', 'btd step', 'DDIM 1 step', 'DDIM 8 steps',
                        'DDIM 16 steps']
  for name, row in rows.items():
    assert name in stdout
    assert row['ms_per_call'] > 0 and row['images_per_s'] > 0 and row['batch'] == 8
    assert row['flops_per_call'] > 0 and 0 < row['fraction_of_peak']
  assert rows['tract step']['note'] == 'schedule 16,4,1'
  assert rows['btd step']['note'] == 'schedule 16,8,4,2,1'
  # TRACT: teacher + self-teacher + student forward and the backward; the teacher step: forward and
  # backward. About 5 vs 3 network evaluations.
  ratio = rows['tract step']['flops_per_call'] / rows['teacher step']['flops_per_call']
  assert 1.4 < ratio < 1.9, ratio
  assert rows['DDIM 8 steps']['flops_per_call'] == pytest.approx(8 * rows['DDIM 1 step']['flops_per_call'])
  assert rows['DDIM 8 steps']['compile_s'] == 0.0  # one compiled sampler for every step count
  assert result['matmul_peak']['flops_per_s'] > 0 and result['peak_memory']['bytes'] > 0
  assert 'GFLOP/call' in stdout and 'peak:' in stdout


class _Analysed:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    if isinstance(self.analysis, Exception):
      raise self.analysis
    return self.analysis


@pytest.mark.parametrize('analysis,expected', [
    ({'flops': 12.0}, 12.0), ([{'flops': 7.0}], 7.0), (None, None), ([], None), ({}, None),
    ({'flops': -1.0}, None), (NotImplementedError('no'), None)])
def test_cost_flops_shapes(analysis, expected):
  assert throughput.cost_flops(_Analysed(analysis)) == expected


def test_scaling_quick():
  stdout = run_script('scaling.py', '--quick', '--devices=1,8', *TINY, timeout=400)
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


def test_quality_pipeline_one_method(tmp_path, tiny):
  """Teacher training, one TRACT run, sampling and scoring, the JSON and the grid; a second call
  reuses the finished teacher and run."""
  config = tiny(**{'teacher_training.train_steps': 2, 'teacher_training.dropout': 0.0,
                   'eval.num_samples': 8, 'eval.sample_batch': 8, 'model.ch': 8, 'model.emb_ch': 16,
                   'model.ch_mult': (1,), 'model.num_groups': 4})
  kwargs = dict(budget=2 * 2 * config.batch_size, num_samples=16, keys=['tract_16-8-1'],
                log=lambda *a: None)
  result = quality.run_quality(config, str(tmp_path), **kwargs)
  names = [r['name'] for r in result['rows']]
  assert names == ['teacher 16 steps', 'teacher 1 step (undistilled)',
                   'teacher 2 steps (undistilled)', 'TRACT 16,8,1', 'real digits (16)']
  rows = {r['name']: r for r in result['rows']}
  assert rows['teacher 16 steps']['rmse_vs_teacher'] == 0.0
  assert rows['TRACT 16,8,1']['train_samples'] == 32 and rows['TRACT 16,8,1']['sampling_steps'] == 1
  assert all(np.isfinite(r['fid']) for r in result['rows'])
  assert os.path.exists(tmp_path / 'quality_grid.png')
  assert json.loads((tmp_path / 'quality.json').read_text())['rows'] == result['rows']
  again = quality.run_quality(config, str(tmp_path), **kwargs)
  assert again['rows'][3]['fid'] == pytest.approx(rows['TRACT 16,8,1']['fid'])
  # Another budget in the same run directory is refused instead of resumed.
  with pytest.raises(quality.phases.ConfigError, match='train_samples'):
    quality.run_quality(config, str(tmp_path), **dict(kwargs, budget=4 * 2 * config.batch_size))
