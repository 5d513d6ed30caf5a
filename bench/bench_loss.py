"""The loss over a 151k vocabulary: the engine's chunked cross-entropy against the plain one
(float32 copy of the trained positions' logits, then torch's cross_entropy), forward and
backward, time and peak memory, for float32 and bfloat16 logits.

    .venv/bin/python bench/bench_loss.py                       # CPU, B=2 L=256 (~1 minute)
    python3 bench/bench_loss.py --batch-size 8 --device cuda   # on a GPU

Each variant runs in a fresh interpreter, so its peak (CPU: max RSS over the logits' own
bytes; GPU: max_memory_allocated over them) is its own; time is the best of --repeat runs.
Prints the ratio chunked/plain for both."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def plain_loss(logits, labels):
    """What the engine computed before: cross_entropy on a float32 copy of the trained rows."""
    import torch
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype != torch.float32:
        keep = (target != -100).nonzero().squeeze(1)
        flat, target = flat.index_select(0, keep).float(), target.index_select(0, keep)
    return torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="sum")


def one(variant: str, dtype: str, args) -> dict:
    import torch
    import training_engine as te
    torch.manual_seed(0)
    device = torch.device(args.device)
    B, L, V = args.batch_size, args.max_length, args.vocab
    labels = torch.randint(0, V, (B, L), device=device)
    labels[:, :L // 8] = -100  # a prompt: positions not trained
    loss_fn = te.next_token_loss if variant == "chunked" else plain_loss
    times, peak = [], 0
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        logits = torch.randn(B, L, V, device=device, dtype=getattr(torch, dtype)).mul_(3).requires_grad_()
        base = logits.numel() * logits.element_size() * 2  # the logits and their gradient
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = loss_fn(logits, labels)
        (loss / 1000).backward()
        value = float(loss.detach())  # waits for a GPU
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - before - base)
        del logits, loss
    if device.type != "cuda":  # the process's peak over what it held with no loss computed
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - args._rss0 - base
    return {"ms": 1000 * min(times), "extra_mb": peak / 2**20, "loss": value}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151646)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import importlib
        for module in ("torch", "training_engine"):  # their own memory is not the loss's
            importlib.import_module(module)
        args._rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(one(*args.one, args)))
        return 0
    print(f"B={args.batch_size} L={args.max_length} V={args.vocab} on {args.device}: forward+backward "
          "of the loss; extra MB = peak beyond the logits and their gradient")
    for dtype in ("float32", "bfloat16"):
        got = {}
        for variant in ("plain", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--one", variant, dtype,
                                  "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                                  "--vocab", str(args.vocab), "--device", args.device,
                                  "--repeat", str(args.repeat)],
                                 check=True, capture_output=True, text=True, cwd=str(REPO))
            got[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            g = got[variant]
            print(f"  {dtype:8} {variant:7} {g['ms']:8.1f} ms  extra {g['extra_mb']:8.0f} MB  loss {g['loss']:.6g}")
        p, c = got["plain"], got["chunked"]
        print(f"  {dtype:8} chunked/plain: time {c['ms'] / p['ms']:.2f}, extra memory "
              f"{c['extra_mb']:.0f} MB against {p['extra_mb']:.0f} MB, loss apart "
              f"{abs(c['loss'] - p['loss']) / abs(p['loss']):.1e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
