"""Benchmark: the training engine against baselines measured in the same run.

(a) tokens/s of `training_engine.train_file` against a bare PyTorch loop (same tiny model,
    same packed batches already in memory, same AdamW, clipping, threads): goal >= 0.97.
    Run in lockstep (one bare step inside each engine step's progress callback), because
    on a shared machine two separate runs differ by +-30% from load alone.
(b) padding waste on lognormal lengths (median ~120 tokens, max 1024): packing against
    padding each batch to its longest example (goal: packing 0% but the file's last row).
(c) peak RSS while streaming a 200 MB file through the tokenizer and packer (the training
    step itself is left out: its memory does not depend on the file), sampled every 10%.
(d) checkpoint save time (weights + AdamW + RNG, fsynced, renamed) against one step.

    .venv/bin/python bench/bench_trainer.py                 # all four, ~3-4 minutes
    .venv/bin/python bench/bench_trainer.py --only a --steps 40
    .venv/bin/python bench/bench_trainer.py --only c --stream-mb 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import training_config  # noqa: E402
import training_engine as te  # noqa: E402
from trainroot import Paths, parse_time  # noqa: E402


def lognormal_texts(n: int, *, median: int = 120, sigma: float = 0.9, cap: int = 1024,
                    seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     \n.,"
    out = []
    for _ in range(n):
        length = max(1, min(cap - 1, int(rng.lognormvariate(math.log(median), sigma))))
        out.append("".join(rng.choice(letters) for _ in range(length)))
    return out


def write_jsonl(path: Path, texts) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def make_root(path: Path, model_dir: Path, cfg: dict) -> Path:
    import training_daemon
    training_daemon.init_root(path, base=str(model_dir))
    training_config.write_config(path, cfg)
    return path


class BareLoop:
    """The baseline: packed batches already tensors, forward + loss + backward + clip + AdamW."""

    def __init__(self, model_dir: Path, batches: list, cfg: dict):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                          dtype=torch.float32)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = te.adamw(self.params, lr=cfg["learning_rate"], betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)  # the engine's (fused where it can be)
        self.batches, self.clip, self.i = batches, cfg["max_grad_norm"], 0

    def step(self) -> None:
        ids, labels = self.batches[self.i]
        self.i += 1
        logits = self.model(input_ids=ids, use_cache=False).logits
        n = int((labels[:, 1:] != -100).sum())
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum") / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def bench_throughput(work: Path, model_dir: Path, args) -> dict:
    """Lockstep: after each engine step (its progress callback) the bare loop runs the same
    batch once, so both see the same load on a shared machine. The engine's step time is
    the time between two callbacks minus the bare step run inside the first."""
    cfg = training_config.default_config(max_length=256, batch_size=8, grad_accum_steps=1,
                                         num_threads=args.threads, warmup_steps=0,
                                         lr_schedule="constant", checkpoint_every_steps=0,
                                         checkpoint_every_minutes=0.0, loss_spike_factor=0.0)
    texts = lognormal_texts(args.steps * 8 * 256 // 150, seed=1)
    data = write_jsonl(work / "a.jsonl", texts)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    stream = te.PackedStream(data, te.Encoder(tok), 256, tok.pad_token_id)
    rows = []
    while (row := stream.next_row()) is not None:
        rows.append(row)
    batches = [(torch.tensor([r[0] for r in rows[i:i + 8]]), torch.tensor([r[1] for r in rows[i:i + 8]]))
               for i in range(0, len(rows), 8)]
    ratios, eng_tps, bare_tps = [], [], []
    for rep in range(args.repeats):
        bare = BareLoop(model_dir, batches, cfg)
        root = make_root(work / f"root{rep}", model_dir, cfg)
        eng_times, bare_times, stamp = [], [], {}

        def progress(d):
            t = time.perf_counter()
            if "out" in stamp:
                eng_times.append(t - stamp["out"])
            t0 = time.perf_counter()
            bare.step()
            t1 = time.perf_counter()
            if "out" in stamp:  # step 1 of both pays first-call costs: left out
                bare_times.append(t1 - t0)
            stamp["out"] = t1

        result = te.train_file(root, data, file_id="a.jsonl", config=cfg, progress=progress)
        assert result["steps"] == len(batches) == bare.i
        tokens = result["tokens_seen"] - sum(r[2] for r in rows[:8])
        ratios.append(sum(bare_times) / sum(eng_times))
        eng_tps.append(tokens / sum(eng_times))
        bare_tps.append(tokens / sum(bare_times))
    out = {"steps": len(batches), "threads": args.threads, "repeats": args.repeats,
           "ratio_median": statistics.median(ratios), "ratios": ratios,
           "engine_tokens_per_sec": statistics.median(eng_tps),
           "bare_tokens_per_sec": statistics.median(bare_tps)}
    print(f"(a) lockstep, {out['steps']} steps x 8 x 256, {args.threads} threads, {args.repeats} runs: "
          f"engine {out['engine_tokens_per_sec']:.0f} tok/s vs bare loop {out['bare_tokens_per_sec']:.0f}; "
          f"ratio engine/bare median {out['ratio_median']:.3f} (runs: "
          + ", ".join(f"{r:.3f}" for r in ratios) + ")  (goal >= 0.97)")
    return out


def bench_padding(work: Path, model_dir: Path, args) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = te.Encoder(tok)
    texts = lognormal_texts(20_000, seed=2)
    data = write_jsonl(work / "b.jsonl", texts)
    lengths = [len(enc.ids(t)) + 1 for t in texts]  # + EOS, as the packer adds it
    real = sum(lengths)
    stream = te.PackedStream(data, enc, 1024, tok.pad_token_id)
    slots = got = 0
    while (row := stream.next_row()) is not None:
        slots += len(row[0])
        got += row[2]
    batch = 8
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch])
                 for i in range(0, len(lengths), batch))
    out = {"examples": len(texts), "median_tokens": statistics.median(lengths),
           "max_tokens": max(lengths), "tokens": real, "tokens_out": got,
           "packing_waste": 1 - got / slots, "per_batch_padding_waste": 1 - real / padded}
    print(f"(b) padding waste, {len(texts)} examples (median {out['median_tokens']:.0f}, max "
          f"{out['max_tokens']} tokens): packing {100 * out['packing_waste']:.3f}% "
          f"(tokens in {real} = out {got}), per-batch padding (batch {batch}) "
          f"{100 * out['per_batch_padding_waste']:.1f}%")
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_stream_memory(work: Path, model_dir: Path, args) -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    path = work / "c.jsonl"
    target = args.stream_mb << 20
    chunk = lognormal_texts(2000, seed=3)
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            for t in chunk:
                f.write(json.dumps({"text": t}) + "\n")
    size = path.stat().st_size
    stream = te.PackedStream(path, te.Encoder(tok), 256, tok.pad_token_id)
    samples, next_mark, rows = [], 0.1, 0
    t0 = time.perf_counter()
    while stream.next_row() is not None:
        rows += 1
        if rows % 2048 == 0 and stream.next_offset >= next_mark * size:
            samples.append((round(next_mark, 1), rss_mb()))
            next_mark += 0.1
    elapsed = time.perf_counter() - t0
    samples.append((1.0, rss_mb()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first, last = samples[0][1], samples[-1][1]
    out = {"file_mb": size / 2**20, "rows": rows, "seconds": elapsed,
           "rss_mb_by_fraction": samples, "growth_mb_10_to_100pct": last - first,
           "peak_rss_mb_process": peak}
    print(f"(c) streamed {out['file_mb']:.0f} MB ({rows} rows of 256) in {elapsed:.0f} s: RSS at "
          f"10% {first:.0f} MB, at 100% {last:.0f} MB (growth {last - first:+.1f} MB); process "
          f"peak {peak:.0f} MB (includes torch + the other parts of this bench)")
    path.unlink()
    return out


def bench_checkpoint(work: Path, model_dir: Path, args, label: str) -> dict:
    cfg = training_config.default_config(max_length=256, batch_size=8, grad_accum_steps=1,
                                         num_threads=args.threads, warmup_steps=0,
                                         checkpoint_every_steps=1, checkpoint_every_minutes=0.0,
                                         keep_checkpoints=2, loss_spike_factor=0.0)
    data = write_jsonl(work / f"d-{label}.jsonl", lognormal_texts(12 * 8 * 256 // 100, seed=4))
    root = make_root(work / f"root-d-{label}", model_dir, cfg)
    saves = []
    real_save = te.save_checkpoint

    def timed_save(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_save(*a, **k)
        finally:
            saves.append(time.perf_counter() - t0)
    te.save_checkpoint = timed_save
    try:
        te.train_file(root, data, file_id="d", config=cfg)
    finally:
        te.save_checkpoint = real_save
    lines = [json.loads(x) for x in Paths(root).metrics.read_text().splitlines()]
    gaps = [parse_time(b["time"]) - parse_time(a["time"]) for a, b in zip(lines, lines[1:])]
    step_with_save = statistics.median(gaps)
    save = statistics.median(saves)
    step = step_with_save - save
    params = sum(v.numel() for v in __import__("safetensors.torch").torch.load_file(
        str(Paths(root).current_model / "model.safetensors")).values())
    out = {"model": label, "parameters": params, "save_seconds": save, "step_seconds": step,
           "ratio": save / step}
    print(f"(d) checkpoint save ({label}, {params / 1e6:.2f}M params: weights + AdamW + RNG, "
          f"fsync, rename) {1000 * save:.1f} ms vs one step {1000 * step:.1f} ms: "
          f"{out['ratio']:.2f} steps")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices="abcd", help="run one part")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--stream-mb", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        model_dir = te.build_tiny_model(work / "tiny")
        if args.only in (None, "b"):
            results["b"] = bench_padding(work, model_dir, args)
        if args.only in (None, "c"):
            results["c"] = bench_stream_memory(work, model_dir, args)
        if args.only in (None, "a"):
            results["a"] = bench_throughput(work, model_dir, args)
        if args.only in (None, "d"):
            results["d"] = [bench_checkpoint(work, model_dir, args, "tiny")]
            bigger = te.build_tiny_model(work / "small", hidden_size=256, num_layers=4,
                                         intermediate_size=688)
            results["d"].append(bench_checkpoint(work, bigger, args, "small"))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
