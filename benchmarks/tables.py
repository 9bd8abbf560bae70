"""The throughput benchmark's results as a fixed-width text table (benchmarks/throughput.py)."""


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
