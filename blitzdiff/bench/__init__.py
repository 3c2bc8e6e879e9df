"""Benchmarks users run (`blitzdiff bench`): blitzdiff's runtime modes against diffusers on the same checkpoint.

    suite.py     what is measured: systems x configurations, speed-ups (run_bench, BenchConfig)
    measure.py   how: build call, warm-up with the memory probe, synchronized timed repeats, spread; run record
    workload.py  the same noise and conditioning for every system
    baseline.py  diffusers' model class, scheduler and pipeline loop on blitzdiff's checkpoint
    roofline.py  a run's network FLOPs against the device's measured dense rate: its floor and speed-up bound
    threads.py   the torch thread count a run uses (one that leaves the cores other work occupies), the load around it
    report.py    text tables (median, range, IQR), warnings and JSON
    plots.py     latency vs steps, throughput vs batch, min-max error bars (matplotlib, PNG)
"""

from .baseline import DiffusersSampler, diffusers_model, diffusers_scheduler
from .measure import Measurement, measure
from .plots import write_plots
from .report import format_results, format_warnings, write_json
from .suite import BASELINES, MODES, BenchConfig, bench_config, run_bench
from .threads import THREAD_RULE, CpuThreads
from .workload import sample_inputs

__all__ = ["BASELINES", "MODES", "THREAD_RULE", "BenchConfig", "CpuThreads", "DiffusersSampler", "Measurement",
           "bench_config", "diffusers_model", "diffusers_scheduler", "format_results", "format_warnings", "measure",
           "run_bench", "sample_inputs", "write_json", "write_plots"]
