"""Sample quality of TRACT and BTD students on the embedded digits, at the same training budget.

  python benchmarks/quality.py [--workdir=/tmp/tract_quality] [--teacher=DIR] [--budget=SAMPLES]
      [--num_samples=512] [--quick] [--config=configs/demo.py] [--config.field=value ...]

One teacher (trained once with the config's teacher_training settings into WORKDIR/teacher, or the
one given by --teacher: a params checkpoint or a teacher job's workdir) is distilled five ways, each
with the SAME total number of training samples (--budget, default the config's train_samples: the
demo's 76,800 = 1,200 steps of batch 64), split equally between its phases:

  tract 64,8,1    TRACT, two phases, 1-step student   (the demo's schedule)
  tract 64,1      TRACT, one phase, 1-step student
  btd ->1         BTD, 64,32,16,8,4,2,1 (6 phases), 1-step student
  tract 64,8,2    TRACT, two phases, 2-step student
  btd ->2         BTD, 64,32,16,8,4,2 (5 phases), 2-step student

(64 is config.teacher_steps, or --teacher_steps; the intermediate TRACT stage is --intermediate, by
default sqrt(T): 8 for 64, 32 for 1024 as in the paper's 1024,32,1). Every final student,
the teacher at 64 steps and the undistilled teacher at 1 and 2 steps sample the same fixed noise
(--num_samples images); for each the table gives the offline FID (evaluation.digits_metric: an
Inception-free Frechet distance on the digits, lower is better; a random real subset of the same size
is listed as the floor, since FID grows as the sample count shrinks) and the teacher-agreement RMSE
against the teacher's 64-step samples from the same noise (uint8 grid, [-1, 1] units).

Writes WORKDIR/quality.json, WORKDIR/quality_grid.png (the first 64 samples of every row, side by
side in table order) and, per method, WORKDIR/<method>/ (checkpoints, per-phase grids, final EMA). A
re-run resumes and reuses finished runs; a run directory written with other settings is refused
(pass --config.overwrite=True to redo it). Compiled programs are cached in WORKDIR/jax_cache.

Cost on 2 idle CPU cores with the demo config: teacher about 4 minutes (2,000 steps), each method
about 3.5 minutes (1,400 steps of ~140 ms) plus ~20 s of compilation, evaluation ~1 minute: about
25 minutes in all (more while other work shares the cores). --quick (100 teacher steps, 12 update
steps per method, 128 samples) is a smoke test of a few minutes whose numbers mean nothing.
"""
import copy
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tract_jax import checkpoints, config_checks, data, methods, parallel, phases, train, workdir as workdirs, writers  # noqa: E402
from tract_jax.errors import ConfigError  # noqa: E402
from tract_jax.evaluator import Evaluator  # noqa: E402
from tract_jax.models import factory  # noqa: E402
from tract_jax.evaluation import kid  # noqa: E402
from tract_jax.evaluation.digits_metric import DigitsMetric, teacher_agreement_rmse  # noqa: E402

FLAGS = flags.FLAGS
INTERMEDIATE_STEPS = 8   # the first TRACT phase's student (the demo's 64 -> 8 -> 1)
GRID_IMAGES = 64         # samples of each row shown in the side-by-side grid
QUICK_TEACHER_STEPS = 100
QUICK_UPDATES = 12       # update steps per method in --quick
QUICK_SAMPLES = 128

if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                  'Base configuration (model, optimiser, teacher training, batch).',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'Output directory (default /tmp/tract_quality, '
                      '/tmp/tract_quality_quick with --quick).')
  flags.DEFINE_string('teacher', None, 'Teacher params checkpoint or teacher workdir to reuse '
                      '(default: train one in WORKDIR/teacher).')
  flags.DEFINE_integer('budget', None, 'Training samples per method, all phases together '
                       '(default: config.train_samples).')
  flags.DEFINE_integer('num_samples', None, 'Samples per row for FID and RMSE (default 512).')
  flags.DEFINE_integer('teacher_train_steps', None, 'Teacher training steps (default: '
                       'config.teacher_training.train_steps).')
  flags.DEFINE_list('methods', None, 'Subset of the method keys to run (default: all): '
                    'tract_T-I-1, tract_T-1, btd_1, tract_T-I-2, btd_2 with T the teacher steps '
                    'and I the intermediate steps.')
  flags.DEFINE_integer('teacher_steps', None, 'Teacher DDIM steps T (default: config.teacher_steps).')
  flags.DEFINE_integer('intermediate', None, 'Student steps of the first TRACT phase (default '
                       'sqrt(T) for T = 4^k, else 8).')
  flags.DEFINE_string('compile_cache', None, 'JAX persistent compilation cache (default '
                      'WORKDIR/jax_cache, so that a re-run compiles less; "none" to disable).')
  flags.DEFINE_bool('quick', False, f'Smoke test: {QUICK_TEACHER_STEPS} teacher steps, '
                    f'{QUICK_UPDATES} updates per method, {QUICK_SAMPLES} samples.')


def default_intermediate(teacher_steps: int) -> int:
  """The first TRACT phase's student: sqrt(T) when T is an even power of two (64 -> 8, as the demo;
  1024 -> 32, as the paper's CIFAR-10 schedule), else 8."""
  root = int(round(int(teacher_steps) ** 0.5))
  return root if root * root == int(teacher_steps) and root > 1 else INTERMEDIATE_STEPS


def method_specs(teacher_steps: int, intermediate: int = None):
  """[(key, label, method, schedule)] in table order; schedules are tuples of step counts."""
  T = int(teacher_steps)
  I = default_intermediate(T) if intermediate is None else int(intermediate)
  halving = methods.btd.halving_schedule
  if I < 2 or T <= I or T % I:
    raise ConfigError(f'teacher_steps={T}: the quality benchmark distils through {I} steps, so it '
                      f'needs a multiple of {I} above it (e.g. 64 with 8, 1024 with 32)')
  return [
      (f'tract_{T}-{I}-1', f'TRACT {T},{I},1', 'tract', (T, I, 1)),
      (f'tract_{T}-1', f'TRACT {T},1', 'tract', (T, 1)),
      ('btd_1', f'BTD {T}..1', 'btd', halving(T, 1)),
      (f'tract_{T}-{I}-2', f'TRACT {T},{I},2', 'tract', (T, I, 2)),
      ('btd_2', f'BTD {T}..2', 'btd', halving(T, 2)),
  ]


def schedule_text(schedule):
  return ','.join(str(s) for s in schedule)


def make_plans(config, budget: int, keys=None, intermediate: int = None):
  """{key: (label, PhasePlan)} for every method, all with the same total sample budget."""
  plans = {}
  for key, label, method, schedule in method_specs(config.teacher_steps, intermediate):
    if keys and key not in keys:
      continue
    plans[key] = (label, phases.make_plan(method, config.teacher_steps, schedule_text(schedule),
                                          budget, config.batch_size, config.ema_residual))
  unknown = set(keys or ()) - set(plans)
  if unknown:
    known = [s[0] for s in method_specs(config.teacher_steps, intermediate)]
    raise ConfigError(f'--methods: unknown {sorted(unknown)}; known: {", ".join(known)}')
  return plans


def _write_config(config, workdir):
  """Refuses a run directory written with other settings (workdir.protect), records these."""
  os.makedirs(workdir, exist_ok=True)
  workdirs.protect(config, workdir)
  workdirs.record_config(config, workdir)


def get_teacher(config, workdir, teacher_path, source, mesh, log=print):
  """(teacher params, where they came from): loaded from teacher_path, or trained in workdir/teacher."""
  like = factory.abstract_params(factory.build_model(config.model), source.image_shape, mesh)
  if teacher_path:
    log(f'Teacher: {teacher_path}')
    return checkpoints.load_params(teacher_path, like), os.path.abspath(teacher_path)
  teacher_dir = os.path.join(workdir, 'teacher')
  teacher_config = copy.deepcopy(config)
  teacher_config.method = methods.TEACHER
  _write_config(teacher_config, teacher_dir)
  start = time.time()
  params = train.train_teacher(teacher_config, teacher_dir, source, mesh)
  log(f'Teacher ready in {time.time() - start:.0f}s ({teacher_dir})')
  return params, teacher_dir


def distill(config, run_dir, plan, teacher_params, teacher_path, source, mesh, evaluator=None):
  """One distillation run; returns (final student's evaluation-EMA params, wall seconds).

  evaluator: the one scoring the phase ends (default: one built from the config, in run_dir)."""
  run_config = copy.deepcopy(config)
  run_config.method = plan.method
  run_config.time_schedule = schedule_text(plan.schedule)
  run_config.train_samples = plan.total_steps * config.batch_size
  run_config.teacher_checkpoint = teacher_path  # recorded, so another teacher is not resumed
  _write_config(run_config, run_dir)
  start = time.time()
  state = train.train_distillation(run_config, run_dir, plan, teacher_params, source, mesh,
                                   evaluator)
  return state.ema_params, time.time() - start


def real_subset(source, n: int, seed: int = 0) -> np.ndarray:
  """n random dataset images (N, H, W, C) in [-1, 1]: the FID floor at this sample count."""
  indices = np.random.default_rng(seed).choice(len(source), size=n, replace=n > len(source))
  return source.get(np.sort(indices))['image']


KID_SUBSETS = 100


def score(metric, images, reference, data_features=None):
  """FID (digits features), KID against data_features (if given; 100 subsets of the sample
  count, less biased than FID at a few hundred samples) and RMSE against the reference."""
  out = {'fid': float(metric.fid(images)),
         'rmse_vs_teacher': (None if reference is None
                             else float(teacher_agreement_rmse(images, reference)))}
  if data_features is not None:
    mean, std = kid.kid(metric.features(images), data_features, KID_SUBSETS, len(images))
    out['kid'], out['kid_std'] = mean, std
  return out


def side_by_side(path, image_sets, per_set: int = GRID_IMAGES, ncol: int = 8, scale: int = 3):
  """One PNG: an ncol-wide mosaic of the first `per_set` images of each set, the sets side by side."""
  mosaics = [writers.make_grid(np.asarray(images)[:per_set], ncol=ncol, scale=scale)
             for images in image_sets]
  gap = 3 * scale  # a wider white margin between sets than between images
  mosaics = [np.pad(m, ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for m in mosaics]
  # Each mosaic becomes one "image" of a one-row grid (uint8 back to [-1, 1] for writers.save_grid).
  stacked = np.stack(mosaics).astype(np.float32) / 127.5 - 1.0
  return writers.save_grid(path, stacked, ncol=len(mosaics))


def format_table(result):
  header = (f'{"row":<30} {"sampling":>8} {"train steps":>11} {"samples":>8} {"train s":>8} '
            f'{"FID":>8} {"KID":>8} {"RMSE vs T-step":>14}')
  lines = [header, '-' * len(header)]
  for r in result['rows']:
    steps = '' if r['sampling_steps'] is None else str(r['sampling_steps'])
    train_steps = '' if r.get('train_steps') is None else f'{r["train_steps"]:,}'
    samples = '' if r.get('train_samples') is None else f'{r["train_samples"]:,}'
    seconds = '' if r.get('train_s') is None else f'{r["train_s"]:.0f}'
    rmse = '' if r['rmse_vs_teacher'] is None else f'{r["rmse_vs_teacher"]:.4f}'
    kid_text = '' if r.get('kid') is None else f'{r["kid"]:.3f}'
    lines.append(f'{r["name"]:<30} {steps:>8} {train_steps:>11} {samples:>8} {seconds:>8} '
                 f'{r["fid"]:8.3f} {kid_text:>8} {rmse:>14}')
  lines.append(f'{result["num_samples"]} samples per row from the same noise; FID and KID: digits '
               f'feature network (lower is better); RMSE against the teacher\'s {result["teacher_steps"]}-step '
               f'samples; budget {result["budget"]:,} training samples per method (batch '
               f'{result["batch"]}); grid (left to right = table order without the real row): '
               f'{result["grid"]}')
  return '\n'.join(lines)


def setup(config, num_samples: int):
  """(digits source, mesh, sampling batch) after the checks every quality run shares."""
  if config.data.name != 'digits':
    raise ConfigError(f'data.name={config.data.name!r}: the quality benchmarks score with the '
                      "embedded digits' feature network, so they need 'digits'")
  source = data.load_digits()
  config_checks.check_image_shape(config, source.image_shape)
  mesh = parallel.mesh_from_config(config)
  config_checks.check_device_sizes(config, mesh)
  sample_batch = min(num_samples, 256)
  if num_samples % sample_batch or num_samples < 2:
    raise ConfigError(f'--num_samples={num_samples}: use at most 256 or a multiple of 256')
  parallel.check_batch(sample_batch, mesh, '--num_samples')
  return source, mesh, sample_batch


def run_quality(config, workdir, *, budget, num_samples, teacher_path=None, keys=None,
                intermediate=None, log=print):
  """The whole benchmark; returns the JSON-ready result (also written to workdir/quality.json)."""
  start = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  T = int(config.teacher_steps)
  plans = make_plans(config, budget, keys, intermediate)
  source, mesh, sample_batch = setup(config, num_samples)
  log(f'{parallel.describe(mesh)}; budget {budget:,} samples per method; {num_samples} samples')

  teacher, teacher_source = get_teacher(config, workdir, teacher_path, source, mesh, log)
  eval_config = copy.deepcopy(config)
  eval_config.eval.num_samples = num_samples
  eval_config.eval.sample_batch = sample_batch
  evaluator = Evaluator(eval_config, factory.build_model(config.model), source.image_shape, workdir,
                        mesh)
  metric = DigitsMetric()
  data_features = metric.features(source.get(np.arange(len(source)))['image'])

  rows, grid_sets = [], []

  def add(name, images, reference, **extra):
    row = {'name': name, **extra, **score(metric, images, reference, data_features)}
    rows.append(row)
    log(f'  {name}: FID {row["fid"]:.3f}' + ('' if row['rmse_vs_teacher'] is None
                                             else f', RMSE {row["rmse_vs_teacher"]:.4f}'))
    return images

  t0 = time.time()
  reference = evaluator.samples(teacher, T)
  log(f'Teacher {T}-step reference: {time.time() - t0:.0f}s')
  add(f'teacher {T} steps', reference, reference, sampling_steps=T, kind='teacher')
  grid_sets.append(reference)
  for steps in (1, 2):
    grid_sets.append(add(f'teacher {steps} step{"s" if steps > 1 else ""} (undistilled)',
                         evaluator.samples(teacher, steps), reference, sampling_steps=steps,
                         kind='teacher'))
  for key, (label, plan) in plans.items():
    log(f'--- {label}: {plan.num_phases} phase(s) x {plan.steps_per_phase} steps ---')
    student, seconds = distill(config, os.path.join(workdir, key), plan, teacher, teacher_source,
                               source, mesh)
    steps = plan.schedule[-1]
    grid_sets.append(add(label, evaluator.samples(student, steps), reference,
                         sampling_steps=steps, kind=plan.method, key=key,
                         schedule=list(plan.schedule), phases=plan.num_phases,
                         steps_per_phase=plan.steps_per_phase, train_steps=plan.total_steps,
                         train_samples=plan.total_steps * config.batch_size, train_s=seconds))
  add(f'real digits ({num_samples})', real_subset(source, num_samples, config.seed), None,
      sampling_steps=None, kind='data')

  grid_path = side_by_side(os.path.join(workdir, 'quality_grid.png'), grid_sets)
  result = {'budget': int(budget), 'batch': int(config.batch_size), 'teacher_steps': T,
            'num_samples': int(num_samples), 'teacher': teacher_source, 'workdir': workdir,
            'grid': grid_path, 'grid_order': [r['name'] for r in rows if r['kind'] != 'data'],
            'platform': jax.devices()[0].platform, 'cpu_count': os.cpu_count(),
            'wall_time_s': time.time() - start, 'rows': rows}
  with open(os.path.join(workdir, 'quality.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  config = FLAGS.config
  quick = FLAGS.quick
  workdir = FLAGS.workdir or ('/tmp/tract_quality_quick' if quick else '/tmp/tract_quality')
  cache = FLAGS.compile_cache or os.path.join(workdir, 'jax_cache')
  if cache != 'none' and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache)
  if FLAGS.teacher_steps:
    config.teacher_steps = FLAGS.teacher_steps
  teacher_steps = FLAGS.teacher_train_steps or (QUICK_TEACHER_STEPS if quick else None)
  if teacher_steps:
    config.teacher_training.train_steps = teacher_steps
  budget = FLAGS.budget or (QUICK_UPDATES * config.batch_size if quick else config.train_samples)
  num_samples = FLAGS.num_samples or (QUICK_SAMPLES if quick else 512)
  if quick:
    # Phase ends and the end save anyway; no extra checkpoints inside such short runs.
    config.checkpoint_every = max(int(config.checkpoint_every), 10**6)
    config.log_every = max(1, QUICK_UPDATES // 2)
  try:
    result = run_quality(config, workdir, budget=budget, num_samples=num_samples,
                         teacher_path=FLAGS.teacher, keys=FLAGS.methods,
                         intermediate=FLAGS.intermediate)
  except ConfigError as e:
    print(f'Configuration error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_table(result))
  print(f'wrote {os.path.join(result["workdir"], "quality.json")} in {result["wall_time_s"]:.0f}s')


if __name__ == '__main__':
  app.run(main)
