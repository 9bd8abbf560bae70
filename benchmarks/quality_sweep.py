"""TRACT against BTD over training budgets, in the paper's regime (T = 1024): a table and a plot.

  python benchmarks/quality_sweep.py --teacher=DIR [--workdir=/tmp/tract_sweep] [--teacher_steps=1024]
      [--budgets=38400,153600,614400,2457600] [--seeds=2] [--multi_seed_budgets=2]
      [--methods=KEY,...] [--num_samples=512] [--deadline_s=SECONDS] [--config.batch_size=256 ...]
  python benchmarks/quality_sweep.py --workdir=DIR --collect     # table + quality_sweep.png only

Every method of benchmarks/quality.py (TRACT T,I,1 / T,1 / T,I,2 and BTD T..1 / T..2, I = sqrt(T) =
32 for T = 1024) distils the same teacher at every budget (training samples, all phases together,
split equally between a method's phases); the `--multi_seed_budgets` smallest budgets are run with
`--seeds` training seeds (data order and noise; the evaluation noise is the same for every row).
Each final student samples the same fixed noise (--num_samples images) and is scored with the
offline digits FID, the digits KID and the teacher-agreement RMSE against the teacher's
T-step samples from that noise.

One row per finished run is written to WORKDIR/rows/<budget>_s<seed>_<method>.json the moment the
run ends, so several processes (one per `--methods` subset, e.g. on one GPU) can share a workdir, a
killed sweep keeps what it finished, and a re-run skips finished rows (a run interrupted midway
resumes from its checkpoints). `--deadline_s` starts no new run after that many seconds.
`--collect` (also done at the end of every sweep) aggregates the rows into WORKDIR/sweep.json, a
Markdown table WORKDIR/sweep.md and the plot WORKDIR/quality_sweep.png (needs matplotlib):
x = training samples (log), y = FID, KID and RMSE of the 1-step students (top row) and the 2-step
students (bottom row), one line per method, the seeds' range as error bars, the undistilled
teacher's value at that step count as a dashed line.
"""
import collections
import copy
import glob
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'benchmarks')):
  if path not in sys.path:
    sys.path.insert(0, path)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import quality  # noqa: E402  (benchmarks/quality.py)
from tract_jax import checkpoints, methods, parallel  # noqa: E402
from tract_jax.errors import ConfigError  # noqa: E402
from tract_jax.evaluator import Evaluator  # noqa: E402
from tract_jax.evaluation.digits_metric import DigitsMetric  # noqa: E402
from tract_jax.models import factory  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_BUDGETS = (38_400, 153_600, 614_400, 2_457_600)   # 16x..64x apart; multiples of 256 and 64

if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Base configuration (model, optimiser, batch).', lock_config=False)
  flags.DEFINE_string('workdir', '/tmp/tract_sweep', 'Output directory, shared by every process.')
  flags.DEFINE_string('teacher', None, 'Teacher params checkpoint or teacher workdir (required to run).')
  flags.DEFINE_integer('teacher_steps', 1024, 'Teacher DDIM steps T.')
  flags.DEFINE_integer('intermediate', None, 'First TRACT phase student steps (default sqrt(T)).')
  flags.DEFINE_list('budgets', [str(b) for b in DEFAULT_BUDGETS], 'Training samples per run.')
  flags.DEFINE_integer('seeds', 2, 'Training seeds of the smallest budgets.')
  flags.DEFINE_integer('multi_seed_budgets', 2, 'How many of the smallest budgets get --seeds seeds.')
  flags.DEFINE_list('methods', None, 'Method keys to run (default all; see quality.py).')
  flags.DEFINE_integer('num_samples', 512, 'Samples per row (FID, KID, RMSE).')
  flags.DEFINE_float('deadline_s', 0, 'Start no new run after this many seconds (0: no limit).')
  flags.DEFINE_bool('collect', False, 'Only aggregate the rows of WORKDIR into table and plot.')


def run_list(budgets, seeds: int, multi_seed_budgets: int):
  """[(budget, seed)] in the order they run: ascending budget, seeds of a budget together."""
  budgets = sorted(int(b) for b in budgets)
  if not budgets or budgets[0] <= 0:
    raise ConfigError(f'--budgets must be positive training-sample counts, got {budgets}')
  return [(b, s) for i, b in enumerate(budgets)
          for s in range(seeds if i < multi_seed_budgets else 1)]


def row_path(workdir, budget, seed, key):
  return os.path.join(workdir, 'rows', f'{budget}_s{seed}_{key}.json')


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)  # atomic: a reader never sees half a row


def cached_reference(evaluator, teacher, teacher_steps, path):
  """The teacher's T-step samples from the evaluation noise, computed once per workdir."""
  if os.path.exists(path):
    with np.load(path) as f:
      images = f['images']
    if images.shape == evaluator.noise.shape:
      return images
  images = evaluator.samples(teacher, teacher_steps)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, images=images)
  os.replace(tmp, path)
  return images


def run_sweep(config, workdir, *, teacher_path, budgets, seeds=2, multi_seed_budgets=2, keys=None,
              intermediate=None, num_samples=512, deadline_s=0.0, log=print):
  """Runs every (budget, seed, method) row not yet in workdir/rows; returns how many it ran."""
  start = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not teacher_path:
    raise ConfigError('--teacher is required: train one with `python -m tract_jax.main '
                      '--config=configs/demo.py --config.method=teacher --workdir=DIR`')
  T = int(config.teacher_steps)
  runs = run_list(budgets, seeds, multi_seed_budgets)
  plans = {b: quality.make_plans(config, b, keys, intermediate) for b, _ in runs}
  source, mesh, sample_batch = quality.setup(config, num_samples)
  os.makedirs(workdir, exist_ok=True)
  like = factory.abstract_params(factory.build_model(config.model), source.image_shape, mesh)
  teacher = checkpoints.load_params(teacher_path, like)
  model = factory.build_model(config.model)
  eval_config = copy.deepcopy(config)   # config.seed fixes the evaluation noise of every row
  eval_config.eval.num_samples, eval_config.eval.sample_batch = num_samples, sample_batch
  evaluator = Evaluator(eval_config, model, source.image_shape, workdir, mesh)
  metric = DigitsMetric()
  data_features = metric.features(source.get(np.arange(len(source)))['image'])
  reference = cached_reference(evaluator, teacher, T,
                               os.path.join(workdir, f'reference_{T}_{num_samples}.npz'))
  teacher_rows = os.path.join(workdir, 'rows', 'teacher.json')
  if not os.path.exists(teacher_rows):
    rows = {str(n): quality.score(metric, reference if n == T else evaluator.samples(teacher, n),
                                  reference, data_features) for n in (T, 1, 2)}
    rows['real'] = quality.score(metric, quality.real_subset(source, num_samples, config.seed),
                                 None, data_features)
    write_json(teacher_rows, {'teacher_steps': T, 'num_samples': num_samples, 'rows': rows})
  log(f'{parallel.describe(mesh)}; teacher {teacher_path}; {len(runs)} (budget, seed) pairs x '
      f'{len(plans[runs[0][0]])} methods; batch {config.batch_size}')

  # Phase-end reports during the runs write only grids (the sweep scores the final students).
  run_eval = copy.deepcopy(config)
  run_eval.eval.num_samples, run_eval.eval.sample_batch, run_eval.eval.metrics = 64, 64, ()
  ran = 0
  for budget, seed in runs:
    for key, (label, plan) in plans[budget].items():
      path = row_path(workdir, budget, seed, key)
      if os.path.exists(path):
        continue
      if deadline_s and time.time() - start > deadline_s:
        log(f'deadline: not starting {key} budget {budget:,} seed {seed}')
        continue
      run_config = copy.deepcopy(config)
      run_config.seed = int(config.seed) + seed
      run_config.eval_every = 0
      run_config.checkpoint_every = max(int(config.checkpoint_every), 10**9)  # phase ends save
      run_config.log_every = max(1, plan.total_steps // 4)
      run_dir = os.path.join(workdir, 'runs', f'{budget}_s{seed}', key)
      log(f'--- {label}, budget {budget:,} (seed {seed}): {plan.num_phases} phase(s) x '
          f'{plan.steps_per_phase} steps ---')
      run_evaluator = Evaluator(run_eval, model, source.image_shape, run_dir, mesh)
      student, seconds = quality.distill(run_config, run_dir, plan, teacher, teacher_path, source,
                                         mesh, run_evaluator)
      steps = plan.schedule[-1]
      row = {'key': key, 'label': label, 'method': plan.method, 'schedule': list(plan.schedule),
             'budget': budget, 'seed': seed, 'sampling_steps': steps,
             'train_steps': plan.total_steps, 'train_samples': plan.total_steps * config.batch_size,
             'batch': int(config.batch_size), 'train_s': seconds,
             'platform': jax.devices()[0].platform,
             **quality.score(metric, evaluator.samples(student, steps), reference, data_features)}
      write_json(path, row)
      ran += 1
      log(f'  {label} budget {budget:,} seed {seed}: FID {row["fid"]:.3f}, KID '
          f'{row["kid"]:.3f}, RMSE {row["rmse_vs_teacher"]:.4f} ({seconds:.0f}s)')
  return ran


def load_rows(workdir):
  """(teacher rows dict or None, [run rows]) from workdir/rows."""
  teacher = None
  path = os.path.join(workdir, 'rows', 'teacher.json')
  if os.path.exists(path):
    with open(path) as f:
      teacher = json.load(f)
  rows = []
  for path in sorted(glob.glob(os.path.join(workdir, 'rows', '*_s*_*.json'))):
    with open(path) as f:
      rows.append(json.load(f))
  return teacher, rows


METRICS = (('fid', 'digits FID'), ('kid', 'digits KID'),
           ('rmse_vs_teacher', 'RMSE vs teacher'))


# One colour per kind of run, the same in the 1-step and 2-step panels: BTD, TRACT in one phase,
# TRACT in two.
METHOD_COLORS = {'btd': 'C2'}


def _color(row):
  return METHOD_COLORS.get(row['method']) or ('C0' if len(row['schedule']) == 2 else 'C1')


def aggregate(rows):
  """{key: {'label', 'steps', 'points': [(budget, {metric: (mean, lo, hi)}, n_seeds)]}}."""
  by_key = collections.OrderedDict()
  order = methods.names()  # the registry's order: TRACT before BTD
  for r in sorted(rows, key=lambda r: (r['sampling_steps'], order.index(r['method']), r['key'])):
    entry = by_key.setdefault(r['key'], {'label': r['label'], 'steps': r['sampling_steps'],
                                         'color': _color(r),
                                         'runs': collections.defaultdict(list)})
    entry['runs'][r['budget']].append(r)
  out = collections.OrderedDict()
  for key, entry in by_key.items():
    points = []
    for budget in sorted(entry['runs']):
      group = entry['runs'][budget]
      stats = {}
      for metric, _ in METRICS:
        values = np.array([g[metric] for g in group], np.float64)
        stats[metric] = (float(values.mean()), float(values.min()), float(values.max()))
      points.append((budget, stats, len(group)))
    out[key] = {'label': entry['label'], 'steps': entry['steps'], 'color': entry['color'],
                'points': points}
  return out


def markdown_table(agg, teacher):
  budgets = sorted({b for e in agg.values() for b, _, _ in e['points']})
  head = '| method | steps | ' + ' | '.join(f'{b:,}' for b in budgets) + ' |'
  lines = ['FID / KID / RMSE vs the teacher (mean over seeds; n = seeds where > 1), by '
           'training samples:', '', head, '|' + '---|' * (len(budgets) + 2)]
  if teacher:
    for n in ('1', '2'):
      r = teacher['rows'][n]
      cell = f'{r["fid"]:.2f} / {r["kid"]:.3f} / {r["rmse_vs_teacher"]:.3f}'
      lines.append(f'| teacher, undistilled | {n} | ' + ' | '.join([cell] * len(budgets)) + ' |')
  for entry in agg.values():
    cells = {b: f'{s["fid"][0]:.2f} / {s["kid"][0]:.3f} / {s["rmse_vs_teacher"][0]:.3f}'
             + (f' (n={n})' if n > 1 else '') for b, s, n in entry['points']}
    lines.append(f'| {entry["label"]} | {entry["steps"]} | '
                 + ' | '.join(cells.get(b, 'not run') for b in budgets) + ' |')
  if teacher:
    r, real = teacher['rows'][str(teacher['teacher_steps'])], teacher['rows']['real']
    lines.append('')
    lines.append(f'Teacher at {teacher["teacher_steps"]} steps: FID {r["fid"]:.2f}, KID '
                 f'{r["kid"]:.3f}; {teacher["num_samples"]} real digits: FID {real["fid"]:.2f}, '
                 f'KID {real["kid"]:.3f} (the floor at this sample count).')
  return '\n'.join(lines)


def plot(agg, teacher, path):
  """quality_sweep.png: a row of panels (one per metric) for the 1-step students, and one for the
  2-step students if there are any; x = training samples (log)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [s for s in (1, 2) if any(e['steps'] == s for e in agg.values())]
  budgets = sorted({b for e in agg.values() for b, _, _ in e['points']})
  fig, axes = plt.subplots(len(rows), len(METRICS), figsize=(5 * len(METRICS), 4 * len(rows)),
                           squeeze=False)
  for row_axes, steps in zip(axes, rows):
    _plot_row(row_axes, agg, teacher, steps, budgets)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _plot_row(axes, agg, teacher, steps, budgets):
  for ax, (metric, title) in zip(axes, METRICS):
    for entry in agg.values():
      if entry['steps'] != steps:
        continue
      x = [b for b, _, _ in entry['points']]
      mean = np.array([s[metric][0] for _, s, _ in entry['points']])
      err = np.array([[m - s[metric][1], s[metric][2] - m]
                      for m, (_, s, _) in zip(mean, entry['points'])]).T
      ax.errorbar(x, mean, yerr=err, marker='o', capsize=3, label=entry['label'],
                  color=entry['color'])
    if teacher:
      undistilled = teacher['rows'][str(steps)][metric]
      ax.axhline(undistilled, color='grey', linestyle='--', linewidth=1,
                 label=f'teacher, {steps} step undistilled')
      if metric != 'rmse_vs_teacher':
        ax.axhline(teacher['rows'][str(teacher['teacher_steps'])][metric], color='black',
                   linestyle=':', linewidth=1, label=f'teacher, {teacher["teacher_steps"]} steps')
    ax.set_xscale('log')
    ax.set_xticks(budgets, [f'{b / 1000:,.0f}k' if b < 10**6 else f'{b / 1e6:.2f}M'
                            for b in budgets])
    ax.minorticks_off()
    if metric == 'kid':   # an unbiased estimate: it can be slightly negative
      ax.set_yscale('symlog', linthresh=1e-2)
    else:
      ax.set_yscale('log')
    ax.set_xlabel('training samples (all phases)')
    ax.set_title(f'{steps}-step students: {title}')
    ax.grid(True, which='both', alpha=0.3)
  axes[0].legend(fontsize=7)


def collect(workdir, log=print):
  """Aggregates workdir/rows into sweep.json, sweep.md and quality_sweep.png; returns the table."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  teacher, rows = load_rows(workdir)
  if not rows:
    raise ConfigError(f'no finished runs in {workdir}/rows')
  agg = aggregate(rows)
  table = markdown_table(agg, teacher)
  write_json(os.path.join(workdir, 'sweep.json'), {'teacher': teacher, 'rows': rows})
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(table + '\n')
  try:
    path = plot(agg, teacher, os.path.join(workdir, 'quality_sweep.png'))
    log(f'wrote {path}')
  except ImportError:
    log('matplotlib is not installed: no plot (pip install matplotlib)')
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  try:
    if not FLAGS.collect:
      config = FLAGS.config
      config.teacher_steps = FLAGS.teacher_steps
      cache = os.path.join(FLAGS.workdir, 'jax_cache')
      if not jax.config.jax_compilation_cache_dir:
        jax.config.update('jax_compilation_cache_dir', cache)
      run_sweep(config, FLAGS.workdir, teacher_path=FLAGS.teacher, budgets=FLAGS.budgets,
                seeds=FLAGS.seeds, multi_seed_budgets=FLAGS.multi_seed_budgets, keys=FLAGS.methods,
                intermediate=FLAGS.intermediate, num_samples=FLAGS.num_samples,
                deadline_s=FLAGS.deadline_s)
    print(collect(FLAGS.workdir))
  except ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
