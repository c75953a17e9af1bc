"""The CPU selective scan against mambapy's parallel scan (what HF transformers runs on CPU) and the
sequential reference, forward and forward+backward, in ms per call (the best of several calls).

    python bench/bench_scan.py                 # batch 4, d_inner 512, d_state 16, L 512/1024/2048, 2 threads
    python bench/bench_scan.py --quick         # a smaller, faster run
    python bench/bench_scan.py --memory        # also peak RSS of one fwd+bwd per row, each in a subprocess

Every implementation computes the same thing, y_t = <h_t, C_t> with h_t = exp(delta_t A) h_{t-1} +
delta_t B_t u_t, from the same values, each in its native layout: megamoe's `selective_scan_cpu` takes
(batch, d_inner, L); mambapy takes (batch, L, d_inner) and times building deltaA and deltaB_u
(batch, L, d_inner, d_state), `pscan`, and the contraction with C, as its `MambaBlock.selective_scan` does
(D and the gate are left out of all of them). "fwd" runs with autograd on (a training forward); "fwd+bwd" adds
the backward of a fixed random cotangent. The sequential reference builds a per-step autograd graph and is far
too slow for long sequences: its forward is timed once at the shortest L only (--ref-backward adds one
fwd+bwd there, about 40 s at L=512, and checks the gradients against it too). Exits with status 1 if any output
or gradient differs from mambapy's (or the reference's) by more than --tolerance (max abs diff / max abs).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.ops import selective_scan_ref  # noqa: E402
from megamoe.ops.scan_cpu import selective_scan_cpu  # noqa: E402

try:
    from mambapy.pscan import pscan
except ImportError:  # mambapy is a test dependency: pip install mambapy
    pscan = None

GRAD_NAMES = ("u", "delta", "A", "B", "C")


def make_inputs(batch, d_inner, d_state, length, seed=0):
    """Mamba-like values: A = -(1..d_state) (the reference init), delta = softplus(dt) in about [1e-3, 0.1]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, d_inner, length, generator=g),
        "delta": torch.nn.functional.softplus(torch.randn(batch, d_inner, length, generator=g) - 4.0),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
        "dy": torch.randn(batch, d_inner, length, generator=g),
    }


def run_megamoe(x):
    return selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"], x["C"])


def run_ref(x):
    return selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"])


def run_mambapy(x):
    """mambapy's selective scan without D, on (batch, L, d_inner) tensors; returns (batch, d_inner, L)."""
    u, delta, B, C = x["u_bld"], x["delta_bld"], x["B_bln"], x["C_bln"]
    deltaA = torch.exp(delta.unsqueeze(-1) * x["A"])  # (batch, L, d_inner, d_state)
    deltaB_u = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    hs = pscan(deltaA, deltaB_u)
    return (hs @ C.unsqueeze(-1)).squeeze(3).transpose(1, 2)


IMPLS = {"megamoe": run_megamoe, "mambapy": run_mambapy, "reference": run_ref}


def leaves(inputs, impl):
    """Fresh leaf tensors for one call, in the implementation's layout."""
    x = {k: v.clone().requires_grad_(k in GRAD_NAMES) for k, v in inputs.items()}
    if impl == "mambapy":  # its native layout: made outside the timed region, as a model would hold them
        x.update(u_bld=x["u"].detach().transpose(1, 2).contiguous().requires_grad_(),
                 delta_bld=x["delta"].detach().transpose(1, 2).contiguous().requires_grad_(),
                 B_bln=x["B"].detach().transpose(1, 2).contiguous().requires_grad_(),
                 C_bln=x["C"].detach().transpose(1, 2).contiguous().requires_grad_())
    return x


def grads(x, impl):
    if impl != "mambapy":
        return {k: x[k].grad for k in GRAD_NAMES}
    return {"u": x["u_bld"].grad.transpose(1, 2), "delta": x["delta_bld"].grad.transpose(1, 2), "A": x["A"].grad,
            "B": x["B_bln"].grad.transpose(1, 2), "C": x["C_bln"].grad.transpose(1, 2)}


def time_call(inputs, impl, backward, repeats, min_time=0.0, warmup=True):
    """Best wall time in ms over at least `repeats` calls, more while less than `min_time` seconds have been
    spent (the machine is shared: more samples of a fast call give it the same chance of a quiet moment as
    a few of a slow one), after one untimed warm-up call; and the last call's output and gradients."""
    best, fn, spent, calls = float("inf"), IMPLS[impl], 0.0, 0
    if warmup:
        x = leaves(inputs, impl)
        y = fn(x)
        if backward:
            y.backward(x["dy"])
    while calls < repeats or (spent < min_time and calls < 100):
        x = leaves(inputs, impl)
        start = time.perf_counter()
        y = fn(x)
        if backward:
            y.backward(x["dy"])
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best * 1e3, y.detach(), (grads(x, impl) if backward else {})


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _hwm_kib():
    """This process's peak resident set (VmHWM, KiB). ru_maxrss would do, but Linux carries it over from the
    parent across exec, so a child of a large benchmark process would start at the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peak_rss_mib(impl, shape):
    """Peak resident memory added by one fwd+bwd, measured in a fresh process."""
    code = (f"import torch; torch.set_num_threads({shape['threads']}); import bench_scan as b;"
            # a tiny call first, so the libraries' one-time allocations are not counted
            f"w = b.leaves(b.make_inputs(1, 8, 4, 8), '{impl}'); b.IMPLS['{impl}'](w).backward(w['dy']);"
            f"x = b.leaves(b.make_inputs({shape['batch']}, {shape['d_inner']}, {shape['d_state']}, "
            f"{shape['length']}), '{impl}'); base = b._hwm_kib(); y = b.IMPLS['{impl}'](x); "
            f"y.backward(x['dy']); print(b._hwm_kib() - base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 2, d_inner 256, L 256/512, shorter timing")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-inner", type=int, default=512)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", default="512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="least calls per measurement; the best is reported")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="keep calling (up to 100 calls) until this many seconds are spent per measurement")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--memory", action="store_true", help="peak RSS of one fwd+bwd per row (a subprocess each)")
    p.add_argument("--ref-backward", action="store_true",
                   help="also time one fwd+bwd of the sequential reference at the shortest L (~40 s at 512)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.d_inner, args.lengths, args.repeats, args.min_time = 2, 256, "256,512", 2, 0.3
    torch.set_num_threads(args.threads)
    lengths = [int(s) for s in args.lengths.split(",")]
    impls = ["megamoe"] + (["mambapy"] if pscan is not None else [])
    if pscan is None:
        print("mambapy is not installed (pip install mambapy): timing megamoe only")
    print(f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, fp32, "
          f"{args.threads} threads, best of >= {args.repeats} calls and >= {args.min_time:g} s per cell")

    rows, worst = [], 0.0
    for length in lengths:
        inputs = make_inputs(args.batch, args.d_inner, args.d_state, length)
        res = {impl: (time_call(inputs, impl, False, args.repeats, args.min_time)[0],)
               + time_call(inputs, impl, True, args.repeats, args.min_time) for impl in impls}
        diffs = {}
        if "mambapy" in res:
            ours, theirs = res["megamoe"], res["mambapy"]
            diffs["mambapy"] = max([rel_diff(ours[2], theirs[2])] +
                                   [rel_diff(ours[3][k], theirs[3][k]) for k in GRAD_NAMES])
        if length == lengths[0]:  # the sequential reference: one call, shortest L only
            ref_ms, y_ref, _ = time_call(inputs, "reference", False, 1, warmup=False)
            ref_bwd_ms, ref_grads = None, {}
            if args.ref_backward:
                ref_bwd_ms, _, ref_grads = time_call(inputs, "reference", True, 1, warmup=False)
            res["reference"] = (ref_ms, ref_bwd_ms, y_ref, ref_grads)
            diffs["reference"] = max([rel_diff(res["megamoe"][2], y_ref)] +
                                     [rel_diff(res["megamoe"][3][k], ref_grads[k]) for k in ref_grads])
        worst = max([worst] + list(diffs.values()))
        base = res.get("mambapy")
        for impl, (fwd, fwd_bwd, _, _) in res.items():
            mem = "-"
            if args.memory and impl != "reference":
                shape = dict(batch=args.batch, d_inner=args.d_inner, d_state=args.d_state, length=length,
                             threads=args.threads)
                mem = f"{peak_rss_mib(impl, shape):.0f}"
            rows.append((length, impl, f"{fwd:.1f}", f"{fwd_bwd:.1f}" if fwd_bwd else "-",
                         f"{base[0] / fwd:.1f}x" if base else "-",
                         f"{base[1] / fwd_bwd:.1f}x" if base and fwd_bwd else "-",
                         f"{diffs[impl]:.1e}" if impl in diffs else "-", mem))
        print(f"  L={length} done", flush=True)

    header = ("L", "impl", "fwd ms", "fwd+bwd ms", "fwd speed-up vs mambapy", "fwd+bwd speed-up vs mambapy",
              "max rel diff (megamoe vs impl)", "peak RSS MiB (fwd+bwd)")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    ok = worst <= args.tolerance
    print(f"\nmax relative difference {worst:.1e} ({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
