#!/usr/bin/env python3
"""Trains dyna-pruner's dense crowd CNN in PyTorch, to tell the architecture from the trainer.

The model is scripts/torch_twin.py's `Cnn` (the layers of crates/dyna-pruner/src/backbones/cnn.rs),
the data and splits those of configs/crowd/full_dense.toml: the TaxiNYC files de-duplicated by
time stamp (first row kept) and sorted, windows of 4 + 4 consecutive hours wholly inside a range,
min-max scaled by the training range. The metric is the crowd `mse` of `dyna-pruner eval`
(per-frame sum over pixels of the squared error on the [0, 1] scale, averaged over frames); the
test number printed is the one of the best validation epoch; persistence is printed as a check
of the convention (0.1017 in `dyna-pruner eval`).

  python3 scripts/torch_crowd_reference.py --device cuda --schedule onecycle > ref.json
  python3 scripts/torch_crowd_reference.py --device cuda --schedule ours --epochs 8

--schedule onecycle: PyTorch's OneCycleLR (peak --lr at 30% of the run, from lr/25 down to
~0, with beta1 cycled between 0.85 and 0.95); ours: the trainer's `scheduled_lr` (a linear rise
from lr/25 over --warmup of the run, cosine down to 5% of lr). Reads the HDF5 files with h5py,
or a cache written by --write-cache for a machine without it. --group-norm G puts a
GroupNorm(G) before each GELU (SimVP's blocks have one; this backbone leaves them out).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_twin import Cnn  # noqa: E402

FILES = [f"data/taxinyc/NYC{y}_Taxi_M16x8_T60_InOut.h5" for y in (10, 11, 12, 13)]
RANGES = {"train": (2010010100, 2013010100), "val": (2013010100, 2013070100), "test": (2013070100, 2014010100)}
T_IN, T_OUT = 4, 4


def read_series(files):
    """Frames `[T, 2, 16, 8]` and their hour stamps `YYYYMMDDHH`, sorted, first of each duplicate kept."""
    import h5py

    frames, stamps = [], []
    for path in files:
        with h5py.File(path, "r") as f:
            frames.append(np.asarray(f["data"], dtype=np.float32))
            stamps.extend(int(d) for d in f["date"][:])
    frames = np.concatenate(frames)
    order = sorted(range(len(stamps)), key=lambda i: (stamps[i], i))
    keep, seen = [], set()
    for i in order:
        if stamps[i] not in seen:
            seen.add(stamps[i])
            keep.append(i)
    return frames[keep], np.array([stamps[i] for i in keep], dtype=np.int64)


def hour_index(stamps):
    """Hours since 2000-01-01 of each `YYYYMMDDHH` stamp, to find consecutive slots."""
    import datetime

    base = datetime.datetime(2000, 1, 1)
    out = []
    for s in stamps:
        d = datetime.datetime(s // 1000000, s // 10000 % 100, s // 100 % 100, s % 100)
        out.append(int((d - base).total_seconds() // 3600))
    return np.array(out)


def window_starts(hours, stamps, lo, hi, length):
    inside = (stamps >= lo) & (stamps < hi)
    run = np.zeros(len(hours) + 1, dtype=np.int64)
    for t in range(len(hours) - 1, -1, -1):
        if not inside[t]:
            run[t] = 0
        elif t + 1 < len(hours) and hours[t + 1] == hours[t] + 1:
            run[t] = run[t + 1] + 1
        else:
            run[t] = 1
    return np.nonzero(run[: len(hours)] >= length)[0]


class GroupNormCnn(Cnn):
    """This CNN with a GroupNorm before each GELU, as SimVP's blocks have (`--group-norm G`):
    each conv that a GELU follows becomes conv -> GroupNorm, so `Cnn.forward` serves as is."""

    def __init__(self, *args, groups):
        super().__init__(*args)
        normed = lambda conv: torch.nn.Sequential(conv, torch.nn.GroupNorm(groups, conv.out_channels))
        self.enc_in = normed(self.enc_in)
        self.enc_down = normed(self.enc_down)
        for block in self.blocks:
            block.conv1 = normed(block.conv1)


class Persistence(torch.nn.Module):
    """The last input frame, repeated."""

    def forward(self, x):
        return x[:, -1:].expand(-1, T_OUT, -1, -1, -1)


def ours_lr(lr, warmup, step, total):
    rise = round(warmup * total)
    if step < rise:
        return lr * (0.04 + 0.96 * step / rise)
    t = (step - rise) / max(total - rise, 1)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def evaluate(model, frames, starts, device, batch=256):
    model.eval()
    sq, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            x, y = cut(frames, starts[i : i + batch], device)
            err = (model(x) - y).double().pow(2).sum(dim=(2, 3, 4))
            sq += err.sum().item()
            count += err.numel()
    model.train()
    return sq / count


def cut(frames, starts, device):
    idx = torch.as_tensor(starts, device=device)[:, None] + torch.arange(T_IN + T_OUT, device=device)
    w = frames[idx]
    return w[:, :T_IN], w[:, T_IN:]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--schedule", choices=["onecycle", "ours"], default="onecycle")
    p.add_argument("--warmup", type=float, default=0.3, help="rise fraction of --schedule ours")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--units", type=int, default=128)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--group-norm", type=int, default=0, help="G > 0: GroupNorm(G) before each GELU")
    p.add_argument("--tf32", action="store_true", help="TF32 convolutions (off: plain f32, as Burn)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", help="npz with frames and stamps (written by --write-cache)")
    p.add_argument("--write-cache", help="read the HDF5 files, write this npz, and stop")
    a = p.parse_args()

    if a.write_cache:
        frames, stamps = read_series(FILES)
        np.savez_compressed(a.write_cache, frames=frames, stamps=stamps)
        return
    if a.cache:
        with np.load(a.cache) as z:
            frames, stamps = z["frames"], z["stamps"]
    else:
        frames, stamps = read_series(FILES)
    torch.backends.cudnn.allow_tf32 = a.tf32
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    hours = hour_index(stamps)
    splits = {k: window_starts(hours, stamps, lo, hi, T_IN + T_OUT) for k, (lo, hi) in RANGES.items()}
    lo, hi = RANGES["train"]
    train_frames = frames[(stamps >= lo) & (stamps < hi)]
    fmin, fmax = float(train_frames.min()), float(train_frames.max())
    dev = torch.device(a.device)
    scaled = torch.as_tensor((frames - fmin) / (fmax - fmin), device=dev)

    shape = (T_IN, T_OUT, 2, a.hidden, a.units, a.blocks, a.stride)
    model = (GroupNormCnn(*shape, groups=a.group_norm) if a.group_norm else Cnn(*shape)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, eps=a.adam_epsilon)
    steps = math.ceil(len(splits["train"]) / a.batch)
    total = steps * a.epochs
    sched = None
    if a.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=total)
    history, best = [], None
    started = time.time()
    step = 0
    for epoch in range(1, a.epochs + 1):
        order = rng.permutation(splits["train"])
        loss_sum = 0.0
        for s in range(steps):
            if sched is None:
                for g in opt.param_groups:
                    g["lr"] = ours_lr(a.lr, a.warmup, step, total)
            x, y = cut(scaled, order[s * a.batch : (s + 1) * a.batch], dev)
            loss = F.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss.item()
            step += 1
        val = evaluate(model, scaled, splits["val"], dev)
        row = {"epoch": epoch, "train_loss": loss_sum / steps, "val_mse": val, "seconds": time.time() - started}
        history.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if best is None or val < best["val_mse"]:
            best = {"epoch": epoch, "val_mse": val, "test_mse": evaluate(model, scaled, splits["test"], dev)}
    persistence = evaluate(Persistence(), scaled, splits["test"], dev)
    args = {k: v for k, v in vars(a).items() if k not in ("cache", "write_cache")}
    windows = {k: int(len(v)) for k, v in splits.items()}
    out = {"args": args, "windows": windows, "history": history, "best": best, "test_persistence": persistence}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
