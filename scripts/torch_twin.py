#!/usr/bin/env python3
"""PyTorch twin of dyna-pruner's dense CNN (crates/dyna-pruner/src/backbones/cnn.rs): the same
layers and shapes, timed as PyTorch users run it, the peer for our dense and sparse forwards.

  python3 scripts/torch_twin.py --device cuda --sizes 384 --batches 1,16,32 > twin.json
  python3 scripts/torch_twin.py --device cpu --threads 2 --sizes 384 --batches 1 > twin.json

Precisions (`--precisions`, default all that the device has):
  f32   float32 with TF32 off (what Burn's CUDA backend computes);
  tf32  float32 with TF32 matmuls and convolutions (PyTorch's default for convolutions; CUDA only);
  bf16  bf16 autocast (`torch.autocast`), the usual inference setting on recent hardware.
Eval mode, no autograd, cuDNN autotune on; on the CPU, PyTorch's own kernels with --threads
threads. Median of --runs timed runs after --warmup runs, synchronising before each clock read.

Prints JSON: {"device", "torch", "threads", "rows": [{"size", "batch", "precision", "dense_ms"}]}.
`dyna-pruner bench --torch-twin scripts/torch_twin.py` (CPU) and `bench --device cuda
--torch-twin ...` run it within the same bench run.
"""
import contextlib
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """x + conv2(gelu(conv1(x))): the translator block with every position and unit kept."""

    def __init__(self, hidden, units):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, units, 3, padding=1)
        self.conv2 = nn.Conv2d(units, hidden, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.conv1(x)))


class Cnn(nn.Module):
    def __init__(self, t_in, t_out, channels, hidden, units, blocks, stride):
        super().__init__()
        self.t_out, self.channels = t_out, channels
        self.enc_in = nn.Conv2d(t_in * channels, hidden, 3, padding=1)
        self.enc_down = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1)
        self.blocks = nn.ModuleList(Block(hidden, units) for _ in range(blocks))
        self.dec_up = nn.ConvTranspose2d(hidden, hidden, stride, stride=stride) if stride > 1 else None
        self.dec_out = nn.Conv2d(hidden, t_out * channels, 3, padding=1)

    def forward(self, x):
        b, t, c, h, w = x.shape
        skip = F.gelu(self.enc_in(x.reshape(b, t * c, h, w)))
        z = F.gelu(self.enc_down(skip))
        for block in self.blocks:
            z = block(z)
        if self.dec_up is not None:
            z = F.gelu(self.dec_up(z))[:, :, :h, :w]
        delta = self.dec_out(z + skip).reshape(b, self.t_out, self.channels, h, w)
        return x[:, -1:] + delta


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]
    p.add_argument("--sizes", type=ints, default=[384])
    p.add_argument("--batches", type=ints, default=[1, 16, 32])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--t-in", type=int, default=4)
    p.add_argument("--t-out", type=int, default=4)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=None)
    a = p.parse_args()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("torch_twin.py: no CUDA device")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    available = ["f32", "tf32", "bf16"] if cuda else ["f32", "bf16"]
    precisions = a.precisions or available
    for prec in precisions:
        if prec not in available:
            raise SystemExit(f"torch_twin.py: precision {prec} is not one of {available} on {a.device}")
    torch.backends.cudnn.benchmark = True
    dev = torch.device(a.device)
    model = Cnn(a.t_in, a.t_out, a.channels, a.hidden, a.units, a.blocks, a.stride).to(dev).eval()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    with torch.no_grad():
        for prec in precisions:
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            torch.backends.cudnn.allow_tf32 = prec == "tf32"
            autocast = (
                torch.autocast(device_type=a.device, dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()
            )
            with autocast:
                for size in a.sizes:
                    for batch in a.batches:
                        x = torch.rand(batch, a.t_in, a.channels, size, size, device=dev)
                        times = []
                        for i in range(a.warmup + a.runs):
                            sync()
                            t = time.perf_counter()
                            model(x)
                            sync()
                            if i >= a.warmup:
                                times.append((time.perf_counter() - t) * 1e3)
                        row = {"size": size, "batch": batch, "precision": prec, "dense_ms": statistics.median(times)}
                        rows.append(row)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
