"""Load and soak benchmark of `blitzdiff serve` over loopback (a script, not a test).

Starts `python -m blitzdiff serve` as a child process on 127.0.0.1 (one server per setting), waits for /readyz, then
drives POST /v1/sample from client threads with bounded request counts: at each concurrency, every client sends its
share of the requests back to back (one image each). Records p50 / p95 / p99 latency, images/s and the batch sizes
the server ran (from its /metrics), with batching on (--max-batch B, --max-wait-ms W) and off (max-batch 1). Then a
soak: --soak requests at concurrency 16 with batching on, sampling the server's RSS (/proc/PID/status) every 100
requests. Writes JSON and a PNG plot.

    python benchmarks/serve_load.py --json benchmarks/results/serve_load_cpu.json \\
        --plot benchmarks/results/serve_load_cpu.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

import blitzdiff


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m blitzdiff serve` in a child process, with `threads` torch threads."""

    def __init__(self, model: str, max_batch: int, max_wait_ms: float, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "blitzdiff", "serve", "--model", model, "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "1024"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready: {command}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.child.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def batch_rows(self) -> tuple[float, float]:
        """(bucket runs, rows) so far, from /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as answer:
            text = answer.read().decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        return values["blitzdiff_batch_rows_count"], values["blitzdiff_batch_rows_sum"]

    def stop(self) -> None:
        self.child.terminate()
        self.child.wait(120)


def drive(url: str, requests: int, concurrency: int, steps: int, on_done=None) -> list[float]:
    """Latencies (s) of `requests` POSTs of one image from `concurrency` threads, each sending its share in turn."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = json.dumps({"n": 1, "steps": steps, "seeds": i, "class_labels": [i % 10], "output": "npy"})
            request = urllib.request.Request(url + "/v1/sample", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as answer:
                answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"status {answer.status}")
            with lock:
                latencies.append(time.perf_counter() - start)
                if on_done is not None:
                    on_done(len(latencies))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load(args) -> list[dict]:
    rows = []
    for batching, max_batch in (("on", args.max_batch), ("off", 1)):
        server = Server(args.model, max_batch, args.max_wait_ms, args.threads)
        try:
            for concurrency in args.concurrency:
                requests = max(args.min_requests, 4 * concurrency)
                runs, images = server.batch_rows()
                start = time.perf_counter()
                latencies = drive(server.url, requests, concurrency, args.steps)
                seconds = time.perf_counter() - start
                runs_after, images_after = server.batch_rows()
                row = {"batching": batching, "max_batch": max_batch, "concurrency": concurrency,
                       "requests": requests, "seconds": seconds, "images_per_s": requests / seconds,
                       "p50_ms": 1e3 * percentile(latencies, 50), "p95_ms": 1e3 * percentile(latencies, 95),
                       "p99_ms": 1e3 * percentile(latencies, 99),
                       "mean_batch_rows": (images_after - images) / (runs_after - runs)}
                rows.append(row)
                print(f"batching {batching:>3} concurrency {concurrency:>3}: {row['images_per_s']:7.1f} images/s, "
                      f"p50 {row['p50_ms']:7.1f} ms, p95 {row['p95_ms']:7.1f}, p99 {row['p99_ms']:7.1f}, "
                      f"{row['mean_batch_rows']:.1f} rows per batch", flush=True)
        finally:
            server.stop()
    return rows


def soak(args) -> dict:
    server = Server(args.model, args.max_batch, args.max_wait_ms, args.threads)
    samples = [(0, server.rss_mib())]
    try:
        def on_done(done: int) -> None:
            if done % 100 == 0:
                samples.append((done, server.rss_mib()))

        start = time.perf_counter()
        drive(server.url, args.soak, 16, args.steps, on_done)
        seconds = time.perf_counter() - start
    finally:
        server.stop()
    after_warmup = [rss for done, rss in samples if done >= 100]
    growth = after_warmup[-1] - after_warmup[0]
    verdict = "within" if growth <= args.rss_bound_mib else "OVER"
    print(f"soak: {args.soak} requests in {seconds:.0f} s; RSS {samples[0][1]:.0f} MiB at start, "
          f"{after_warmup[0]:.0f} after 100 requests, {after_warmup[-1]:.0f} at the end ({growth:+.1f} MiB, {verdict} "
          f"the {args.rss_bound_mib:g} MiB bound)")
    return {"requests": args.soak, "concurrency": 16, "seconds": seconds, "rss_mib": samples,
            "growth_after_100_mib": growth, "bound_mib": args.rss_bound_mib, "within_bound": verdict == "within"}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for batching in ("on", "off"):
        mine = [r for r in rows if r["batching"] == batching]
        x = [r["concurrency"] for r in mine]
        left.plot(x, [r["images_per_s"] for r in mine], marker="o", label=f"batching {batching}")
        right.plot(x, [r["p50_ms"] for r in mine], marker="o", label=f"p50, batching {batching}")
        right.plot(x, [r["p99_ms"] for r in mine], marker="x", linestyle="--", label=f"p99, batching {batching}")
    for axes, label in ((left, "images/s"), (right, "latency (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--min-requests", type=int, default=64, help="requests per concurrency level, at least")
    parser.add_argument("--soak", type=int, default=1000, help="requests in the soak run (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--rss-bound-mib", type=float, default=16.0, help="allowed RSS growth after the first 100 soak "
                        "requests (default 16); over it, the script exits 1")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    record = {"command": "python " + " ".join(sys.argv), "model": args.model, "steps": args.steps,
              "max_wait_ms": args.max_wait_ms, "server_threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only",
              "versions": {"blitzdiff": blitzdiff.__version__, "torch": torch.__version__, "python":
                           platform.python_version()},
              "load": load(args)}
    if args.soak:
        record["soak"] = soak(args)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.plot:
        plot(record["load"], args.plot)
    if args.soak and not record["soak"]["within_bound"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
