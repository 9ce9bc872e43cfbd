#!/usr/bin/env python3
"""The least time a gpu-mlp training step can take on this GPU with cuBLAS GEMMs, measured with PyTorch.

Issue #5 asks mantissa for a mixed-precision step of at most 0.8x PyTorch's. Every implementation of the step
has to run the same five large GEMMs and one AdamW update over 20.04 M f32 master weights; besides them it has
to move some bytes that no GEMM moves (the activation passes). This script measures, in one process on the GPU:

  step      PyTorch's own step (benches/peers/pytorch_gpu.py, same settings), the reference of the ratio;
  gemm      the five GEMMs of the step alone (16-bit in, f32 accumulate, 16-bit out, as autocast runs them),
            replayed as one CUDA graph, so no launch gaps: the forward of layers 1 and 2, the input gradient
            of layer 2 and the weight gradients of layers 2 and 1 (the classifier's GEMMs, with 10 columns,
            are left out: they are not compute-bound and any implementation fuses them);
  adamw     torch.optim.AdamW(fused=True) over the step's parameters and f32 gradients, one step;
  copy      a device-to-device copy of 1 GiB, for the bandwidth any extra pass gets;
  extra     the bytes that a step must move besides the GEMMs' own operands and results even when every
            element-wise pass is fused into a GEMM epilogue or the classifier kernel (written out below),
            at the copy bandwidth.

and prints, per 16-bit dtype,

  floor: peer=pytorch dtype=bfloat16 step_ms=... gemm_ms=... adamw_ms=... copy_tb_s=... extra_mb=...
         extra_ms=... floor_ms=... floor_over_step=... target_ms=...

floor_ms = gemm + adamw + extra is a lower bound for the step only for GEMMs no faster than cuBLAS's, and it
leaves out the loss, the step's control and every launch. target_ms = 0.8 x step.
"""
import argparse

import torch

from pytorch_gpu import run as pytorch_step, time_ms

B, IN, H, OUT = 8192, 784, 4096, 10


def gemms(dtype):
    dev = "cuda"
    r = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype) * 0.05  # noqa: E731
    x, w1, b1 = r(B, IN), r(H, IN), r(H)
    a1, w2, b2 = r(B, H), r(H, H), r(H)
    g2, g1 = r(B, H), r(B, H)
    outs = {}

    def five():
        outs["h1"] = torch.nn.functional.linear(x, w1, b1)  # layer 1 forward, 8192x4096x784
        outs["h2"] = torch.nn.functional.linear(a1, w2, b2)  # layer 2 forward, 8192x4096x4096
        outs["dx2"] = g2 @ w2  # layer 2 input gradient, 8192x4096x4096
        outs["dw2"] = g2.t() @ a1  # layer 2 weight gradient, 4096x4096x8192
        outs["dw1"] = g1.t() @ x  # layer 1 weight gradient, 4096x784x8192

    for _ in range(3):
        five()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        five()
    one = {
        "fwd1": lambda: torch.nn.functional.linear(x, w1, b1),
        "fwd2": lambda: torch.nn.functional.linear(a1, w2, b2),
        "dx2": lambda: g2 @ w2,
        "dw2": lambda: g2.t() @ a1,
        "dw1": lambda: g1.t() @ x,
    }
    each = {k: time_ms(f, 5, 20) for k, f in one.items()}
    total = time_ms(graph.replay, 7, 20)
    return total, each


def adamw():
    dev = "cuda"
    shapes = [(H, IN), (H,), (H, H), (H,), (OUT, H), (OUT,)]
    params = [torch.nn.Parameter(torch.randn(*s, device=dev) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    n = sum(p.numel() for p in params)
    return time_ms(opt.step, 7, 20), n


def copy_tb_s():
    n = 1 << 28  # 1 GiB of f32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1.0)
    ms = time_ms(lambda: dst.copy_(src), 7, 10)
    return 2 * n * 4 / (ms * 1e-3) / 1e12


def extra_bytes(elem):
    """Bytes a step moves besides the five GEMMs and AdamW, with every element-wise pass fused as far as it can be
    (GELU and bias inside the GEMM epilogues, the classifier and its GELU in one kernel each way)."""
    act = B * H * elem
    return {
        "layer 1 pre-activation, the second output of its forward GEMM (for the GELU backward)": act,
        "classifier forward: reads layer 2's pre-activation (GELU on the fly)": act,
        "classifier backward: reads layer 2's pre-activation, writes layer 2's output gradient": 2 * act,
        "layer 1 GELU backward inside the input-gradient GEMM's epilogue: reads the pre-activation": act,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    bw = copy_tb_s()
    adam_ms, n = adamw()
    print(f"# adamw (fused) over {n} parameters: {adam_ms:.4f} ms; copy bandwidth {bw:.2f} TB/s", flush=True)
    for policy, dtype, elem in [("mixed_bfloat16", torch.bfloat16, 2), ("mixed_float16", torch.float16, 2)]:
        step_ms = pytorch_step(policy, B, H, 10, args.steps)
        gemm_ms, each = gemms(dtype)
        extra = extra_bytes(elem)
        extra_b = sum(extra.values())
        extra_ms = extra_b / (bw * 1e12) * 1e3
        floor = gemm_ms + adam_ms + extra_ms
        name = str(dtype).removeprefix("torch.")
        print("# gemm alone, ms: " + " ".join(f"{k}={v:.4f}" for k, v in each.items()), flush=True)
        print(
            f"floor: peer=pytorch dtype={name} step_ms={step_ms:.3f} gemm_ms={gemm_ms:.4f} adamw_ms={adam_ms:.4f} "
            f"copy_tb_s={bw:.2f} extra_mb={extra_b / 1e6:.1f} extra_ms={extra_ms:.4f} floor_ms={floor:.4f} "
            f"floor_over_step={floor / step_ms:.3f} target_ms={0.8 * step_ms:.3f}",
            flush=True,
        )
    for what, b in extra_bytes(2).items():
        print(f"# extra (16-bit): {b / 1e6:.1f} MB: {what}")


if __name__ == "__main__":
    main()
