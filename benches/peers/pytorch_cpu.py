#!/usr/bin/env python3
"""PyTorch on the CPU, on the same workloads as `cargo run --release --example cpu_report`, so that the
ratio comes from one run on one machine. Prints lines in cpu_report's format with `peer=pytorch`:

  gemm: peer=pytorch dtype=bf16 m=1024 n=1024 k=1024 threads=2 gflops=...
  train: peer=pytorch workload=cpu-mlp policy=mixed_bfloat16 optimizer=adamw-fused threads=2 samples_per_s=...

cpu-mlp: 784 -> Linear 512 -> GELU(tanh) -> Linear 512 -> GELU(tanh) -> Linear 10, softmax cross-entropy,
AdamW (lr 1e-3, weight decay 0.01), batch 256, f32 master weights; mixed_bfloat16 = torch.autocast("cpu",
dtype=torch.bfloat16). Timing: median of repeated timed windows after warm-up (machines here are noisy).

Setup (once; torch from PyPI is ~4 GB with CUDA libraries that `import torch` needs even on a CPU):
  python3 -m venv /opt/torchcpu && /opt/torchcpu/bin/pip install torch
Run: /opt/torchcpu/bin/python benches/peers/pytorch_cpu.py [--threads 2] [--quick]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def median_time(fn, warmup, reps, windows):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def bench_gemm(threads, sizes, quick):
    for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")]:
        for n in sizes:
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            reps = max(1, int(2e9 / (2 * n**3)))
            t = median_time(lambda: torch.mm(a, b), 2, reps, 3 if quick else 7)
            print(f"gemm: peer=pytorch dtype={name} m={n} n={n} k={n} threads={threads} gflops={2 * n**3 / t / 1e9:.1f}",
                  flush=True)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(784, 512)
        self.l2 = nn.Linear(512, 512)
        self.l3 = nn.Linear(512, 10)

    def forward(self, x):
        x = F.gelu(self.l1(x), approximate="tanh")
        x = F.gelu(self.l2(x), approximate="tanh")
        return self.l3(x)


def bench_train(threads, quick):
    torch.manual_seed(0)
    batch = 256
    x = torch.rand(batch, 784)
    y = torch.randint(0, 10, (batch,))
    for policy in ["float32", "mixed_bfloat16"]:
        for opt_name, kwargs in [("adamw", {"foreach": True}), ("adamw-fused", {"fused": True})]:
            model = Mlp()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **kwargs)

            def step():
                opt.zero_grad(set_to_none=True)
                if policy == "mixed_bfloat16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = F.cross_entropy(model(x), y)
                else:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()

            t = median_time(step, 5, 10, 3 if quick else 9)
            print(f"train: peer=pytorch workload=cpu-mlp policy={policy} optimizer={opt_name} threads={threads} "
                  f"samples_per_s={batch / t:.0f} step_ms={t * 1e3:.3f}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="256,512,1024,2048")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    bench_gemm(args.threads, [int(s) for s in args.sizes.split(",")], args.quick)
    bench_train(args.threads, args.quick)


if __name__ == "__main__":
    main()
