"""blitzdiff.malloc: tune_malloc stops the page faults glibc's defaults cost a loop that frees and allocates the same
large tensors every step (counted in fresh processes, as the settings are process-wide), respects glibc's own
environment settings, and the CLI applies it unless told not to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blitzdiff import cli, malloc
from blitzdiff.malloc import GLIBC_VARIABLES, OPT_OUT, glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="the C library is not glibc")

# One "step": two 4 MiB tensors written and added, then all freed, as a sampling step's activations are; the
# faults per step after a warm-up, and what tune_malloc reported. "small": glibc's starting mmap threshold (128 KiB)
# fixed first, where every such block is mmap'd and unmapped (with glibc's adjusting defaults a step costs ~3000
# faults or none, by where the heap's top happens to be when it starts: no fixed figure to test).
STEPS = """
import ctypes, json, resource, sys, torch, blitzdiff
if "small" in sys.argv[1]:
    assert ctypes.CDLL(None).mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
record = blitzdiff.tune_malloc() if "tuned" in sys.argv[1] else None
def step():
    a = torch.empty(2**20).fill_(1.0)
    b = torch.empty(2**20).fill_(2.0)
    c = a + b
    del a, b, c
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"faults_per_step": faults, "record": record}))
"""


def run_steps(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in GLIBC_VARIABLES}
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                            env={**clean, "OMP_NUM_THREADS": "1", **env})
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("mode", ["tuned", "small, then tuned"])
def test_tuned_malloc_keeps_freed_tensors_resident(mode):
    assert run_steps("small")["faults_per_step"] > 1000  # 3 x 4 MiB of fresh pages per step
    tuned = run_steps(mode)
    assert tuned["faults_per_step"] < 5
    assert tuned["record"] == {"tuned": True, "mmap_threshold": 32 * 2**20, "trim_threshold": 2**30}


def test_glibcs_own_environment_settings_stand():
    result = run_steps("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert result["record"] == {"tuned": False, "reason": "set by the environment (MALLOC_TRIM_THRESHOLD_)"}


SAMPLE = """
import json, blitzdiff
from blitzdiff.malloc import malloc_record
before = malloc_record()
pipe = blitzdiff.load("unet-digits")
loaded = malloc_record()
pipe.sample(1, steps=1, output_type="raw", progress=False)
print(json.dumps([before["tuned"], loaded["tuned"], malloc_record()]))
"""


@pytest.mark.parametrize(("opt_out", "record"), [
    (None, {"tuned": True, "mmap_threshold": 32 * 2**20, "trim_threshold": 2**30}),
    ("system", {"tuned": False, "reason": "BLITZDIFF_MALLOC=system"}),
])
def test_a_cpu_pipelines_first_sampling_run_tunes_malloc_not_the_import(opt_out, record):
    env = {k: v for k, v in os.environ.items() if k not in (*GLIBC_VARIABLES, OPT_OUT)}
    result = subprocess.run([sys.executable, "-c", SAMPLE], capture_output=True, text=True, check=True,
                            env={**env, "OMP_NUM_THREADS": "1", **({OPT_OUT: opt_out} if opt_out else {})})
    assert json.loads(result.stdout.splitlines()[-1]) == [False, False, record]


@pytest.mark.parametrize(("opt_out", "called"), [(None, True), ("system", False)])
def test_the_cli_tunes_malloc_unless_told_not_to(monkeypatch, opt_out, called):
    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(None))
    monkeypatch.setattr(malloc, "_attempted", False)
    monkeypatch.setattr(malloc, "_applied", malloc.malloc_record())  # restored after the test
    if opt_out is None:
        monkeypatch.delenv(OPT_OUT, raising=False)
    else:
        monkeypatch.setenv(OPT_OUT, opt_out)
    assert cli.main(["info", "unet-digits"]) == 0
    assert bool(calls) is called


@pytest.mark.parametrize("value", ["System", "off", "1"])
def test_an_unknown_opt_out_value_is_an_error_not_the_default(monkeypatch, value):
    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(None))
    monkeypatch.setattr(malloc, "_attempted", False)
    monkeypatch.setattr(malloc, "_applied", malloc.malloc_record())
    monkeypatch.setenv(OPT_OUT, value)
    with pytest.raises(ValueError, match=rf"BLITZDIFF_MALLOC='{value}' is not understood; allowed: tuned .*, system"):
        malloc.tune_malloc_once()
    assert not calls and not malloc._attempted  # nothing tuned; the next call checks again
    monkeypatch.setenv(OPT_OUT, "tuned")
    malloc.tune_malloc_once()
    assert calls == [None]



def test_the_cli_reports_an_unknown_opt_out_value_on_one_line(monkeypatch, capsys):
    monkeypatch.setattr(malloc, "_attempted", False)
    monkeypatch.setattr(malloc, "_applied", malloc.malloc_record())
    monkeypatch.setenv(OPT_OUT, "off")
    assert cli.main(["info", "unet-digits"]) == 2
    assert capsys.readouterr().err == ("blitzdiff info: error: BLITZDIFF_MALLOC='off' is not understood; allowed: "
                                       "tuned (the default: blitzdiff sets malloc's thresholds), system (malloc is "
                                       "left as it is)\n")
