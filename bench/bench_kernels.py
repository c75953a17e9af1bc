"""Triton selective scan (and causal conv1d) on a GPU: time, achieved bytes/s, and the share of the device's
copy bandwidth measured in the same run, against the PyTorch reference and the chunked PyTorch scan.

    python bench/bench_kernels.py [--iters 20] [--shapes 1536x2048,4096x8192] [--batch 8] [--d-state 16]
    python bench/bench_kernels.py --interpret     # no GPU: a tiny correctness smoke run in Triton's interpreter

Roofline bytes, per pass: forward reads u, delta, z, A, B, C, D, delta_bias once and writes y once; backward
reads the same inputs and dy once and writes every gradient once. "fwd+bwd" counts both passes. The copy
bandwidth is (read + write bytes) / time of `dst.copy_(src)` on a 1 GiB tensor. Issue targets: forward >= 70%
of the copy bandwidth, fwd+bwd >= 50%. "fwd" is an inference forward (no states saved); "fwd+bwd" is a
training forward (chunk states saved) plus backward.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cuda_time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events (the warmup also absorbs Triton's autotuning)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(iters: int) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    import torch

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def scan_inputs(batch, d_inner, d_state, seqlen, device, dtype):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    return dict(u=r(batch, d_inner, seqlen).to(dtype), delta=(0.5 * r(batch, d_inner, seqlen)).to(dtype),
                A=-torch.exp(0.5 * r(d_inner, d_state)), B=r(batch, d_state, seqlen).to(dtype),
                C=r(batch, d_state, seqlen).to(dtype), D=r(d_inner), z=r(batch, d_inner, seqlen).to(dtype),
                delta_bias=0.3 * r(d_inner))


def roofline_bytes(x) -> tuple:
    """(forward, backward) bytes: every input read once and every output written once per pass."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    inputs = sum(nbytes(t) for t in x.values())
    y = nbytes(x["u"])
    return inputs + y, inputs + y + inputs  # backward: inputs + dy read, one gradient per input written


def run_scan(impl, x, dy, iters):
    """(fwd ms, fwd+bwd ms) of impl(u, delta, A, B, C, D, z, delta_bias, softplus=True)."""
    import torch

    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    with torch.no_grad():
        fwd = cuda_time_ms(lambda: impl(*[x[n] for n in names], True), iters)
    leaves = [x[n].detach().requires_grad_() for n in names]

    def step():
        y = impl(*leaves, True)
        torch.autograd.grad(y, leaves, dy)

    return fwd, cuda_time_ms(step, iters)


def bench_scan(args, copy_bw):
    import torch

    from megamoe.kernels.selective_scan import selective_scan_triton
    from megamoe.ops.selective_scan_ref import selective_scan_ref

    impls = [("triton", selective_scan_triton, None), ("reference", selective_scan_ref, args.max_ref_elems)]
    try:  # the chunked PyTorch scan is written for CPU; it is plain torch, so try it on the GPU too
        from megamoe.ops.scan_cpu import selective_scan_cpu
        impls.append(("chunked torch", selective_scan_cpu, args.max_chunked_elems))
    except ImportError as e:
        print(f"(megamoe.ops.scan_cpu not importable: {e})")
    print(f"\nselective scan, bf16, batch {args.batch}, d_state {args.d_state}, delta_softplus, D and z;"
          f" copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    head = f"{'d_inner x L':>12} {'impl':>14} {'fwd ms':>9} {'GB/s':>7} {'%copy':>6} {'fwd+bwd ms':>11} " \
           f"{'GB/s':>7} {'%copy':>6} {'vs triton':>10} {'max |dy|err':>11}"
    print(head + "\n" + "-" * len(head))
    for d_inner, seqlen in args.shapes:
        x = scan_inputs(args.batch, d_inner, args.d_state, seqlen, "cuda", torch.bfloat16)
        dy = torch.randn_like(x["u"])
        fwd_bytes, bwd_bytes = roofline_bytes(x)
        elems = args.batch * d_inner * seqlen * args.d_state
        base = None
        y_triton = selective_scan_triton(*[x[n] for n in ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]],
                                         True).float()
        for name, impl, max_elems in impls:
            label = f"{d_inner} x {seqlen}"
            if max_elems is not None and elems > max_elems:
                print(f"{label:>12} {name:>14}   skipped: {elems:.2e} state elements > {max_elems:.0e}")
                continue
            try:
                fwd, both = run_scan(impl, x, dy, args.iters if name == "triton" else max(2, args.iters // 5))
                with torch.no_grad():
                    y = impl(*[x[n] for n in ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]], True).float()
                err = (y - y_triton).abs().max().item()
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # OOM or an op without CUDA support
                print(f"{label:>12} {name:>14}   failed: {str(e).splitlines()[0][:80]}")
                torch.cuda.empty_cache()
                continue
            base = base or (fwd, both)
            fwd_bw, both_bw = fwd_bytes / (fwd * 1e-3), (fwd_bytes + bwd_bytes) / (both * 1e-3)
            print(f"{label:>12} {name:>14} {fwd:9.3f} {fwd_bw / 1e9:7.0f} {100 * fwd_bw / copy_bw:5.1f}% "
                  f"{both:11.3f} {both_bw / 1e9:7.0f} {100 * both_bw / copy_bw:5.1f}% "
                  f"{both / base[1]:9.1f}x {err:11.2e}")
        del x, dy
        torch.cuda.empty_cache()


def bench_conv(args, copy_bw):
    import torch
    import torch.nn.functional as F

    from megamoe.kernels.causal_conv1d import causal_conv1d_triton

    def torch_conv(x, w, b):
        return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[1] - 1, groups=x.shape[1])[..., :x.shape[2]])

    print(f"\ncausal depthwise conv1d + SiLU, bf16, batch {args.batch}, width 4 (bytes: x, y; bwd: x, dy, dx)")
    head = f"{'d_inner x L':>12} {'impl':>14} {'fwd ms':>9} {'%copy':>6} {'fwd+bwd ms':>11} {'%copy':>6}"
    print(head + "\n" + "-" * len(head))
    for d_inner, seqlen in args.shapes:
        x = torch.randn(args.batch, d_inner, seqlen, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d_inner, 4, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(d_inner, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        unit = x.numel() * x.element_size()
        for name, fn in (("triton", lambda x, w, b: causal_conv1d_triton(x, w, b, "silu")), ("F.conv1d", torch_conv)):
            with torch.no_grad():
                fwd = cuda_time_ms(lambda: fn(x, w, b), args.iters)
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            both = cuda_time_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, dy), args.iters)
            print(f"{d_inner} x {seqlen:<5} {name:>14} {fwd:9.3f} {100 * 2 * unit / (fwd * 1e-3) / copy_bw:5.1f}% "
                  f"{both:11.3f} {100 * 5 * unit / (both * 1e-3) / copy_bw:5.1f}%")


def interpret_smoke() -> int:
    """Tiny fwd+bwd of the scan in Triton's interpreter against the reference (no GPU needed)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before megamoe.kernels is imported
    import torch

    from megamoe.kernels.selective_scan import selective_scan_triton
    from megamoe.ops.selective_scan_ref import selective_scan_ref

    x = scan_inputs(1, 4, 16, 40, "cpu", torch.float32)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    errs = []
    for impl in (lambda *a: selective_scan_triton(*a, chunk_len=16), selective_scan_ref):
        leaves = [x[n].clone().requires_grad_() for n in names]
        y = impl(*leaves, True)
        errs.append([y] + list(torch.autograd.grad(y, leaves, torch.ones_like(y))))
    worst = max((a - b).abs().max().item() / max(b.abs().max().item(), 1.0) for a, b in zip(*errs))
    print(f"interpreter smoke check (batch 1, d_inner 4, d_state 16, L 40): max relative error of y and all "
          f"gradients vs selective_scan_ref = {worst:.1e} ({'ok' if worst < 1e-4 else 'FAILED'})")
    return 0 if worst < 1e-4 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--shapes", default="1536x2048,1536x8192,4096x2048,4096x8192", help="d_inner x L list")
    parser.add_argument("--max-ref-elems", type=float, default=2 ** 29,
                        help="skip the sequential reference above batch*d_inner*L*d_state (it materialises "
                             "several fp32 tensors of that size and loops over L in Python)")
    parser.add_argument("--max-chunked-elems", type=float, default=2 ** 31)
    parser.add_argument("--no-conv", action="store_true", help="skip the causal conv1d table")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run in Triton's interpreter")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.interpret:
        return interpret_smoke()
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU and none is available here: GPU numbers are not measured. "
              "Run `python bench/bench_kernels.py --interpret` for a tiny CPU smoke check in Triton's interpreter.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    copy_bw = copy_bandwidth(args.iters)
    bench_scan(args, copy_bw)
    if not args.no_conv:
        bench_conv(args, copy_bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
