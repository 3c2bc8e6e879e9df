"""Benchmarks users run (`blitzdiff bench`): blitzdiff's runtime modes against diffusers on the same checkpoint.

    suite.py     what is measured: systems x configurations, speed-ups (run_bench, BenchConfig)
    measure.py   how: build call, warm-up with the memory probe, synchronized timed repeats, medians; run record
    workload.py  the same noise and conditioning for every system
    baseline.py  diffusers' model class, scheduler and pipeline loop on blitzdiff's checkpoint
    report.py    text tables and JSON
    plots.py     latency vs steps, throughput vs batch (matplotlib, PNG)
"""

from .baseline import DiffusersSampler, diffusers_model, diffusers_scheduler
from .measure import Measurement, measure
from .plots import write_plots
from .report import format_results, write_json
from .suite import BASELINES, MODES, BenchConfig, bench_config, run_bench
from .workload import sample_inputs

__all__ = ["BASELINES", "MODES", "BenchConfig", "DiffusersSampler", "Measurement", "bench_config",
           "diffusers_model", "diffusers_scheduler", "format_results", "measure", "run_bench", "sample_inputs",
           "write_json", "write_plots"]
