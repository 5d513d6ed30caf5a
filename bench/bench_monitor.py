"""How the live monitor's answers scale with a year of metrics, and what a polled page costs training.

Two roots in one run: one with an empty metrics.jsonl (the baseline), one with N lines
written the way the engine writes them. Each gets its own monitor on 127.0.0.1; the
figures are medians over HTTP (keep-alive), printed as ratios to the baseline.

    .venv/bin/python bench/bench_monitor.py              # 1,000,000 lines
    .venv/bin/python bench/bench_monitor.py --lines 100000 --repeat 10 --contended
    .venv/bin/python bench/bench_monitor.py --clients 200 --seconds 10   # cost to training
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monitor_server  # noqa: E402


def write_metrics(path: Path, n: int, start: int = 1) -> None:
    """n lines like the engine's, 1,000 steps per data file, in big buffered writes."""
    row = ('{"time": "2026-11-28T17:20:01.123456Z", "global_step": %d, "file": "notes-%05d.jsonl", '
           '"loss": %.5f, "lr": 0.0001, "grad_norm": 0.83, "tokens_per_sec": 3412.5, '
           '"tokens_seen": %d, "step_in_file": %d}\n')
    with open(path, "a", encoding="utf-8") as f:
        buf = []
        for s in range(start, start + n):
            buf.append(row % (s, s // 1000, 3.0 / (1 + s / 5000), s * 2048, s % 1000))
            if len(buf) == 50_000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, target: str) -> tuple[float, bytes]:
        t = time.perf_counter()
        self.conn.request("GET", target)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"{target}: HTTP {resp.status}: {body[:300]!r}")
        return (time.perf_counter() - t) * 1000, body

    def median(self, target: str, repeat: int) -> float:
        return statistics.median(self.get(target)[0] for _ in range(repeat))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--contended", action="store_true",
                    help="also time /api/state while every core is busy")
    ap.add_argument("--clients", type=int, default=0,
                    help="only measure what N polling pages cost a CPU-bound loop in the process")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each --clients phase")
    ap.add_argument("--rounds", type=int, default=3, help="--clients phases of each kind")
    args = ap.parse_args(argv)
    if args.clients:
        return training_cost(args.clients, args.seconds, args.rounds, min(args.lines, 20_000))

    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        roots = {"empty": Path(tmp) / "empty", "big": Path(tmp) / "big"}
        for r in roots.values():
            r.mkdir()
            (r / "metrics.jsonl").touch()
        t = time.perf_counter()
        write_metrics(roots["big"] / "metrics.jsonl", args.lines)
        size = (roots["big"] / "metrics.jsonl").stat().st_size
        print(f"wrote {args.lines:,} lines ({size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)

        handles = {k: monitor_server.start_in_thread(r, 0, state_ttl=0.0, idle_priority=False)
                   for k, r in roots.items()}
        try:
            c = {k: Client(h.port) for k, h in handles.items()}
            res: dict[str, dict[str, float]] = {k: {} for k in roots}
            for k in roots:
                res[k]["first /api/metrics (builds the index)"] = c[k].get("/api/metrics?since=0&max_points=1")[0]
            last = args.lines
            for k in roots:
                res[k]["/api/state"] = c[k].median("/api/state", args.repeat)
                since = last if k == "big" else 0
                res[k]["/api/metrics?since=LAST (nothing new)"] = c[k].median(
                    f"/api/metrics?since={since}", args.repeat)
                res[k]["/api/metrics (whole history, <=2000 pts)"] = c[k].median(
                    "/api/metrics", max(3, args.repeat // 4))
            # the page's steady state: a few new lines every 2 s
            for k in roots:
                times = []
                start = (last if k == "big" else 0) + 1
                for i in range(args.repeat):
                    write_metrics(roots[k] / "metrics.jsonl", 3, start + 3 * i)
                    since = start + 3 * i - 1
                    ms, body = c[k].get(f"/api/metrics?since={since}")
                    if len(json.loads(body)["points"]) != 3:
                        raise SystemExit("incremental answer missed lines")
                    times.append(ms)
                res[k]["/api/metrics?since=LAST (+3 new lines)"] = statistics.median(times)
            _, body = c["big"].get("/api/metrics")
            doc = json.loads(body)
        finally:
            for h in handles.values():
                h.stop()

        print(f"\nmonitor response times, median ms ({args.repeat} requests; state built "
              f"fresh each time), metrics.jsonl {args.lines:,} lines vs empty:")
        print(f"{'request':44} {'empty':>9} {'1M' if args.lines == 1_000_000 else 'big':>9} {'ratio':>7}")
        for name in res["empty"]:
            e, b = res["empty"][name], res["big"][name]
            print(f"{name:44} {e:9.2f} {b:9.2f} {b / e:7.1f}x")
        print(f"whole-history answer: {len(doc['points'])} points of {doc['matched']:,} "
              f"(stride {doc['stride']}), {len(body) / 1024:.0f} KiB, "
              f"{len(doc['boundaries'])} file boundaries")
        print(f"index memory: {args.lines * 16 / 2**20:.1f} MiB (two int64 per line)")
        if args.contended:
            contended(roots["big"], args.repeat)
    return 0


def contended(root: Path, repeat: int) -> None:
    """/api/state while every core is busy (as training keeps them): idle vs normal priority."""
    import os
    import subprocess
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)
        print(f"\n/api/state with {len(burners)} CPU-bound processes on {os.cpu_count()} cores:")
        for idle in (False, True):
            h = monitor_server.start_in_thread(root, 0, state_ttl=0.0, idle_priority=idle)
            try:
                times = [Client(h.port).get("/api/state")[0] for _ in range(repeat)]
            finally:
                h.stop()
            print(f"  {'SCHED_IDLE (as in the daemon)' if idle else 'normal priority':30} "
                  f"median {statistics.median(times):7.1f} ms   max {max(times):7.1f} ms")
    finally:
        for b in burners:
            b.kill()
            b.wait()


CLIENTS = r"""
import http.client, json, sys, threading, time
port, n, interval = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def page(i):
    time.sleep(interval * i / n)  # spread the pages over the interval, as tabs opened at random
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    since = 0
    while True:
        t = time.monotonic()
        for target in ("/api/state", f"/api/metrics?since={since}"):
            c.request("GET", target)
            body = c.getresponse().read()
        since = json.loads(body).get("last_step") or since
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
for i in range(n):
    threading.Thread(target=page, args=(i,), daemon=True).start()
sys.stdin.read()  # until the bench closes our stdin
"""


@contextlib.contextmanager
def polling_pages(port: int, n: int, interval: float = 2.0):
    """`n` pages polling the monitor every `interval` s, from another process at SCHED_IDLE
    (a browser's work, kept out of what is measured); yields once each has asked once."""
    import subprocess
    pages = subprocess.Popen([sys.executable, "-c", CLIENTS, str(port), str(n), str(interval)],
                             stdin=subprocess.PIPE, preexec_fn=monitor_server._make_thread_idle)
    try:
        time.sleep(interval + 0.5)
        yield
    finally:
        pages.stdin.close()
        pages.kill()
        pages.wait()


def training_cost(n: int, seconds: float, rounds: int, lines: int) -> int:
    """Training-like steps in this process (a small torch model: forward, backward, AdamW,
    as the in-process engine trains in the daemon), timed alone, then while `n` pages poll
    a monitor served from a thread of this process (`start_in_thread`, as the daemon serves
    it). The pages run in another process at SCHED_IDLE, so only the server's cost is
    measured, not the browsers'. Phases alternate, so the machine's load drifts into each
    alike. bench_monitor_training.py measures the same with the real engine."""
    import os
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, 128)

    def loop() -> float:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            count += 1
        return count / seconds

    def with_pages(port: int) -> float:
        with polling_pages(port, n):
            return loop()

    runs = {"alone": [], "thread": []}
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        root = Path(tmp)
        write_metrics(root / "metrics.jsonl", lines)
        for r in range(rounds):
            runs["alone"].append(loop())
            h = monitor_server.start_in_thread(root, 0)
            try:
                runs["thread"].append(with_pages(h.port))
            finally:
                h.stop()
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items())
                  + " steps/s", file=sys.stderr)
    base = statistics.median(runs["alone"])
    print(f"\nTraining-like steps in the daemon's process, {os.cpu_count()} cores, {seconds:.0f} s "
          f"phases x {rounds}, {n} pages polling every 2 s ({lines:,} metrics lines):")
    print(f"  alone                         {base:8.1f} steps/s")
    med = statistics.median(runs["thread"])
    print(f"  monitor (a thread) + pages    {med:8.1f} steps/s   ratio {med / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
