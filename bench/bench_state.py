"""How fast the state tracker answers, against `python -c pass` measured in the same run.

Builds a realistic root once (init, 30 versions, a 20 MB metrics.jsonl, failed files, a
backup), then times whole processes: `python -c pass`, `state_tracker.py --json`,
`--check` and the bare refresh (median of N runs each, interleaved so machine noise hits
every command alike; bytecode cached as on a user's machine, `--no-bytecode` to recompile
every run); also `-c pass` and `--json` as a person types them, through `python3` on PATH
(a pyenv shim here). Goals (issue 9): `--json` <= 3x `python -c pass`; `--check` <= 150 ms.

    python3 bench/bench_state.py
    python3 bench/bench_state.py --runs 30 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METRIC_STEPS = 160_000
sys.path.insert(0, str(REPO))


def build_root(root: Path, versions: int) -> None:
    subprocess.run([sys.executable, str(REPO / "training_daemon.py"), "init", "--root", str(root)],
                   check=True, capture_output=True)
    import model_versioner as mv
    from trainroot import utc_now
    for step in range(1, versions):
        staged = root / ".staging" / f"bench-{step}"
        shutil.copytree(root / "current_model", staged)
        for name in ("trainer_state.json", ".manifest.json"):
            (staged / name).unlink()
        gstep = step * METRIC_STEPS // (versions - 1)  # the last model is at the last metric
        (staged / "trainer_state.json").write_text(json.dumps({"global_step": gstep,
                                                               "tokens_seen": gstep * 2048}))
        mv.publish_model(root, staged, reason="bench")
        mv.create_version(root, "manual", note="bench")
    line = {"time": utc_now(), "file": "notes.jsonl", "lr": 3e-4, "tokens_per_sec": 3400.0}
    with open(root / "metrics.jsonl", "w") as f:  # ~20 MB: months of steps
        for step in range(1, METRIC_STEPS + 1):
            f.write(json.dumps(dict(line, global_step=step, loss=2.0 + 1.0 / step)) + "\n")
    for i in range(30):
        (root / "failed" / f"bad{i}.jsonl").write_text("{\n")
        (root / "failed" / f"bad{i}.jsonl.record.json").write_text(json.dumps(
            {"reason": "invalid data: 1 problem(s)", "history": [{"at": utc_now()}]}))
    subprocess.run([sys.executable, str(REPO / "backup_manager.py"), "backup", "--root", str(root)],
                   check=True, capture_output=True)


def run_once(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall, cpu) seconds of one whole process; cpu = user + sys from wait4's rusage."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            env=env)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0  # reaped by wait4 above
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime


def time_commands(commands: dict[str, list[str]], runs: int, env: dict) -> dict[str, dict]:
    """Median wall and CPU milliseconds per command, runs interleaved."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for argv in commands.values():  # warm-up: the page cache and, if allowed, the bytecode cache
        run_once(argv, env)
    for _ in range(runs):
        for name, argv in commands.items():
            samples[name].append(run_once(argv, env))
    return {k: {"wall_ms": statistics.median(w for w, _ in v) * 1000,
                "cpu_ms": statistics.median(c for _, c in v) * 1000} for k, v in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--versions", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="recompile every module each run (PYTHONDONTWRITEBYTECODE=1, as in "
                             "some CI sandboxes); default: bytecode cached as on a user's machine")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        root = Path(tmp) / "root"
        t = time.perf_counter()
        build_root(root, args.versions)
        setup_s = time.perf_counter() - t
        py, tracker = sys.executable, str(REPO / "state_tracker.py")
        env = dict(os.environ)
        if args.no_bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:  # a user's machine caches bytecode; keep the cache out of the repo
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        typed = shutil.which("python3") or py
        ms = time_commands({
            "python -c pass": [py, "-c", "pass"],
            "state_tracker.py --json": [py, tracker, "--json", "--root", str(root)],
            "state_tracker.py --check": [py, tracker, "--check", "--root", str(root)],
            "state_tracker.py (refresh)": [py, tracker, "--root", str(root)],
            # where start-up goes: each import alone (cumulative)
            "import argparse,json,pathlib": [py, "-c", "import argparse, json, pathlib"],
            "import trainroot": [py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import trainroot"],
            "import training_config": [py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import training_config"],
            "import state_tracker": [py, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import state_tracker"],
            "import rich.console": [py, "-c", "import rich.console"],
            # as a person types them: `python3` from PATH (a pyenv shim here costs ~100 ms)
            "PATH python3 -c pass": [typed, "-c", "pass"],
            "PATH python3 st.py --json": [typed, tracker, "--json", "--root", str(root)],
        }, args.runs, env)
        import state_tracker
        t = time.perf_counter()
        for _ in range(20):
            state_tracker.build_state(root)
        build_ms = (time.perf_counter() - t) / 20 * 1000
        warnings = [w["code"] for w in state_tracker.build_state(root)["warnings"]]
    base = ms["python -c pass"]
    ratio = {k: {"wall": round(v["wall_ms"] / base["wall_ms"], 2),
                 "cpu": round(v["cpu_ms"] / base["cpu_ms"], 2)} for k, v in ms.items()}
    result = {"runs": args.runs, "versions": args.versions, "setup_s": round(setup_s, 1),
              "bytecode_cache": not args.no_bytecode, "load_average": os.getloadavg()[0],
              "median_ms": {k: {m: round(x, 1) for m, x in v.items()} for k, v in ms.items()},
              "ratio_vs_python": ratio,
              "build_state_in_process_ms": round(build_ms, 2), "warnings": warnings,
              "typed_json_vs_typed_pass": round(ms["PATH python3 st.py --json"]["wall_ms"]
                                                / ms["PATH python3 -c pass"]["wall_ms"], 2),
              "goals": {"json_wall_ratio<=3": ratio["state_tracker.py --json"]["wall"] <= 3,
                        "check_wall_ms<=150": ms["state_tracker.py --check"]["wall_ms"] <= 150}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"root: {args.versions} versions, 20 MB metrics.jsonl, 30 failed files, 1 backup "
              f"(setup {setup_s:.1f} s); median of {args.runs} runs each; bytecode cache "
              f"{'off' if args.no_bytecode else 'on'}; load average {os.getloadavg()[0]:.1f}")
        print(f"  {'command':<28} {'wall':>9} {'ratio':>6}   {'cpu':>9} {'ratio':>6}")
        for k, v in ms.items():
            print(f"  {k:<28} {v['wall_ms']:6.1f} ms {ratio[k]['wall']:5.2f}x   "
                  f"{v['cpu_ms']:6.1f} ms {ratio[k]['cpu']:5.2f}x")
        print(f"  build_state() in process    {build_ms:6.2f} ms")
        print(f"  as typed (PATH python3): --json / -c pass = {result['typed_json_vs_typed_pass']:.2f}x")
        print(f"goals: --json wall <= 3x python: {result['goals']['json_wall_ratio<=3']}; "
              f"--check wall <= 150 ms: {result['goals']['check_wall_ms<=150']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
