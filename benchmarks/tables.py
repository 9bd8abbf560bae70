"""Fixed-width tables of the benchmarks: throughput.py's results, and the summary of the runs of
benchmarks/gpu_check.sh, which calls this file to collect its per-run JSON files:

  python benchmarks/tables.py --gpu_check_work=DIR --json_out=FILE --status=run=ok,... \
      [--dry_run] [--demo_status=...] [--demo_seconds=N] [--elapsed=N]
"""
import datetime
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
if __name__ == '__main__':
  flags.DEFINE_string('gpu_check_work', None, "gpu_check.sh's folder of per-run <name>.json files.")
  flags.DEFINE_string('json_out', None, 'The summary JSON to write.')
  flags.DEFINE_list('status', [], 'run=status for every run, in order (ok, timeout after Ns, ...).')
  flags.DEFINE_bool('dry_run', False, 'The runs were the tiny CPU models of --dry-run.')
  flags.DEFINE_string('demo_status', 'not run', 'How the demo run ended.')
  flags.DEFINE_string('demo_seconds', '', 'Seconds the demo took.')
  flags.DEFINE_integer('elapsed', 0, 'Seconds the whole check took.')
  flags.mark_flags_as_required(['gpu_check_work', 'json_out'])


def throughput_table(result):
  """run_benchmarks' result as a fixed-width text table."""
  header = (f'{"benchmark":<16} {"batch":>5} {"lower s":>7} {"compile s":>9} {"cached s":>8} '
            f'{"ms/call":>9} {"min ms":>8} {"images/s":>10} {"GFLOP/call":>11} {"GFLOP/s":>9} '
            f'{"% peak":>7} {"MiB/dev":>8}')
  lines = [header, '-' * len(header)]
  na = lambda width: f'{"n/a":>{width}}'
  for r in result['benchmarks']:
    flops = r['flops_per_call']
    gflop = f'{flops / 1e9:11.3f}' if flops else na(11)
    timed = 'ms_per_call' in r
    achieved = (f'{r["achieved_flops_per_s"] / 1e9:9.1f}' if 'achieved_flops_per_s' in r
                else na(9))
    frac = f'{100 * r["fraction_of_peak"]:6.1f}%' if 'fraction_of_peak' in r else na(7)
    mem = (f'{r["xla_memory_bytes"] / 2**20:8.1f}' if r['xla_memory_bytes'] is not None
           else na(8))
    cached = f'{r["cached_compile_s"]:8.1f}' if r.get('cached_compile_s') is not None else na(8)
    lines.append(
        f'{r["name"]:<16} {r["batch"]:>5} {r.get("lower_s") or 0:7.1f} {r["compile_s"]:9.1f} '
        f'{cached} '
        + (f'{r["ms_per_call"]:9.2f} {r["ms_per_call_min"]:8.2f} {r["images_per_s"]:10.1f} '
           if timed else f'{na(9)} {na(8)} {na(10)} ')
        + f'{gflop} {achieved} {frac} {mem}')
  peak = result['matmul_peak']
  mem = result['peak_memory']
  if peak:
    lines.append(f'peak: {peak["flops_per_s"] / 1e9:,.1f} GFLOP/s per device ({peak["size"]}x'
                 f'{peak["size"]} {peak["dtype"]} matmul, best of 5) x {result["num_devices"]} '
                 f'device(s); {mem["kind"]}: {mem["bytes"] / 2**20:,.0f} MiB')
  else:
    lines.append(f'peak: not measured (compile only); {mem["kind"]}: {mem["bytes"] / 2**20:,.0f} MiB')
  lines.append(f'{result["platform"]} ({result["device_kind"]}), {result["num_params"]:,} params, '
               f'images {tuple(result["image_shape"])}, dtype {result["dtype"]} (teacher '
               f'{result["teacher_dtype"]}), remat {result["remat"]}; forward '
               f'{result["forward_flops_per_image"] / 1e9:.3f} GFLOP/image (FLOPs: '
               f'{result["flops_source"]}); median of up to '
               f'{result["timed_calls"]} timed calls after a warm-up call')
  lines.append('compile s = lower s + XLA compile with an empty persistent cache ("cold" unless '
               '--compile_cache names a used directory); cached s = lower + load from it'
               + ('' if result['compilation_cache'] else ' (cache off)'))
  if result.get('fid'):
    f = result['fid']
    lines.append(f'FID@50k at 1 step: {f["total_s"]:.1f} s = sampling {f["sampling_s"]:.1f} s '
                 f'({f["sample_1step_images_per_s"]:.0f} images/s) + features '
                 f'{f["features_s"]:.1f} s ({f["feature_images_per_s"]:.0f} images/s)')
  return '\n'.join(lines)


def _fmt(value, spec, width):
  return format(value, spec) if value is not None else f'{"n/a":>{width}}'


def gpu_check_summary(work, statuses, *, dry_run=False, demo_status='not run', demo_seconds='',
                      elapsed=0):
  """(text, summary dict) of gpu_check.sh's runs: statuses {run: status}, in order; each run's
  results are work/<run>.json (throughput.py --json)."""
  runs, rows = {}, []
  for name, status in statuses.items():
    path = os.path.join(work, name + '.json')
    result = json.load(open(path)) if os.path.exists(path) else None
    if result:
      result.pop('config', None)
    runs[name] = {'status': status, 'result': result}
    rows += [(name, result, r) for r in (result or {}).get('benchmarks', [])]
  first = next((v['result'] for v in runs.values() if v['result']), None)
  device = (f'{first["device_kind"]} ({first["platform"]}), jax {first["jax_version"]}' if first
            else 'n/a')
  date = datetime.date.today().isoformat()
  head = (f'{"run":<26} {"benchmark":<13} {"batch":>5} {"params":>7} {"cold s":>7} {"(lower)":>7} '
          f'{"cached s":>8} {"ms/step":>8} {"images/s":>9} {"TFLOP/s":>8} {"% peak":>7} '
          f'{"peak GiB":>8}')
  lines = ['', f'gpu_check {date}: {device}' + ('  [DRY RUN: tiny models on CPU]' if dry_run else ''),
           head, '-' * len(head)]
  for name, result, r in rows:
    achieved, frac = r.get('achieved_flops_per_s'), r.get('fraction_of_peak')
    peak_mem = r.get('peak_memory_so_far', {})
    mem = peak_mem['bytes'] / 2**30 if peak_mem.get('kind', '').startswith('device') else None
    lines.append(
        f'{name:<26} {r["name"]:<13} {r["batch"]:>5} {result["num_params"] / 1e6:6.1f}M '
        f'{_fmt(r.get("compile_s"), "7.1f", 7)} {_fmt(r.get("lower_s"), "7.1f", 7)} '
        f'{_fmt(r.get("cached_compile_s"), "8.1f", 8)} {_fmt(r.get("ms_per_call"), "8.1f", 8)} '
        f'{_fmt(r.get("images_per_s"), "9.0f", 9)} '
        f'{_fmt(achieved / 1e12 if achieved else None, "8.1f", 8)} '
        f'{_fmt(100 * frac if frac else None, "6.1f", 6)}% {_fmt(mem, "8.1f", 8)}')
  for name, v in runs.items():
    if v['status'] != 'ok':
      lines.append(f'{name}: {v["status"]}')
    res = v['result']
    if res and res.get('matmul_peak'):
      p = res['matmul_peak']
      lines.append(f'{name}: matmul peak {p["flops_per_s"] / 1e12:.1f} TFLOP/s ({p["dtype"]}, '
                   f'{p["size"]}^2); forward {res["forward_flops_per_image"] / 1e9:.2f} GFLOP/image '
                   '(lowered)')
    if res and res.get('fid'):
      f = res['fid']
      lines.append(f'{name}: FID@50k at 1 step ~ {f["total_s"]:.0f} s = sampling '
                   f'{f["sampling_s"]:.0f} s + features {f["features_s"]:.0f} s '
                   f'({f["feature_images_per_s"]:.0f} images/s)')
  xla_flags = os.environ.get('XLA_FLAGS', '')
  lines.append(f'demo: {demo_status}' + (f' ({demo_seconds} s)' if demo_seconds else ''))
  lines.append(f'total {elapsed} s; XLA_FLAGS={xla_flags!r}; cold = lower + compile with an empty '
               'persistent cache, cached = the same from that cache after jax.clear_caches()')
  summary = {'date': date, 'device': device, 'dry_run': bool(dry_run), 'elapsed_s': int(elapsed),
             'xla_flags': xla_flags, 'runs': runs,
             'demo': {'status': demo_status,
                      'seconds': int(demo_seconds) if demo_seconds else None}}
  return '\n'.join(lines), summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  statuses = dict(item.split('=', 1) for item in FLAGS.status)
  text, summary = gpu_check_summary(FLAGS.gpu_check_work, statuses, dry_run=FLAGS.dry_run,
                                    demo_status=FLAGS.demo_status,
                                    demo_seconds=FLAGS.demo_seconds, elapsed=FLAGS.elapsed)
  print(text)
  with open(FLAGS.json_out, 'w') as f:
    json.dump(summary, f, indent=2, default=str)
  print(f'wrote {FLAGS.json_out}')
  sys.exit(1 if any(v['status'] != 'ok' for v in summary['runs'].values()) else 0)


if __name__ == '__main__':
  app.run(main)
