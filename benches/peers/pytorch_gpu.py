#!/usr/bin/env python3
"""PyTorch on the GPU, on the same workload as `examples/gpu_report`, in the same run on the same machine.

gpu-mlp: 784 -> Linear 4096 -> GELU(tanh) -> Linear 4096 -> GELU(tanh) -> Linear 10, softmax cross-entropy,
AdamW (fused, lr 1e-3, weight decay 0.01), batch 8192, f32 master weights, data resident on the GPU.
Policies: float32 (TF32 off, PyTorch's default for matmul), mixed_bfloat16 (autocast bf16), mixed_float16
(autocast f16 + GradScaler). Step time: CUDA events over 50 steps after 10 warm-up steps (mean), and peak
memory from torch.cuda.max_memory_allocated. Prints:

  train: peer=pytorch workload=gpu-mlp policy=mixed_bfloat16 step_ms=... samples_per_s=... peak_device_bytes=...
"""
import argparse
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.l1 = nn.Linear(784, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.gelu(self.l1(x), approximate="tanh")
        x = F.gelu(self.l2(x), approximate="tanh")
        return self.l3(x)


def time_ms(fn, reps, inner):
    """Median over `reps` of the mean time of `inner` calls of fn, by CUDA events."""
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) / inner)
    return statistics.median(out)


def run(policy, batch, hidden, warmup, steps):
    torch.manual_seed(0)
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = Mlp(hidden).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    scaler = torch.amp.GradScaler("cuda") if policy == "mixed_float16" else None
    dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(policy)
    x = torch.rand(batch, 784, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        if dtype is None:
            loss = F.cross_entropy(model(x), y)
        else:
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, 1, steps)
    peak = torch.cuda.max_memory_allocated()
    print(f"train: peer=pytorch workload=gpu-mlp policy={policy} step_ms={ms:.3f} samples_per_s={batch / ms * 1e3:.0f} "
          f"peak_device_bytes={peak}", flush=True)
    del model, opt, x, y
    torch.cuda.empty_cache()
    return ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--policy", choices=["float32", "mixed_bfloat16", "mixed_float16"], help="only this one")
    args = p.parse_args()
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    for policy in [args.policy] if args.policy else ["float32", "mixed_bfloat16", "mixed_float16"]:
        run(policy, args.batch, args.hidden, args.warmup, args.steps)


if __name__ == "__main__":
    main()
