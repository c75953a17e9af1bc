"""Decoding speed and cache size: MoE-Mamba against the Transformer-MoE of the same active size, beside the floor
of a step measured on this machine in the same run.

    python bench/bench_generate.py            # d_model 512, 8 blocks (ME x 4 / AE x 4), 8 experts, vocab 8000,
                                              # contexts 1k, 4k, 16k, batch 1 and 8, fp32, 2 threads
    python bench/bench_generate.py --quick    # contexts 1k and 4k
    python bench/bench_generate.py --bf16     # bfloat16 weights (megamoe.inference.loading.to_bf16), as --bf16
                                              # decodes, beside the fp32 MoE-Mamba
    python bench/bench_generate.py --products # and the GB/s of each matrix product path for these weights
    python bench/bench_generate.py --no-compile   # without the MoE-Mamba compiled rows

Each row: a cache holding `context` tokens per sequence, then greedy decode steps (megamoe.inference.generation's
forward_cached, one token per sequence), the models taking turns of --turn steps (8; the first of each turn not
timed, as it finds the caches full of the other models' weights), the median step, of a model laid out as
load_for_inference lays a checkpoint out on CPU (megamoe.inference.loading.for_cpu_decoding). The caches are
filled with random values of the context's length rather than prefilled: a step's work depends on the cache's
size, not its values, and a 16k prefill of the Transformer takes minutes here. Cache: bytes per sequence after
the steps (Mamba's conv and SSM states; the Transformer's keys and values). "MoE-Mamba compiled": the same
model's steps through torch.compile (megamoe.inference.compiled, --compile of generate and serve), compiled
for each batch size before the timed rows.

Floor (batch 1): the bytes one step must read, the active weights (the dense ones, the chosen expert of each MoE
layer, the whole LM head) and the cache, over this machine's memory bandwidth, measured as the best of the sums
over a 512 MiB buffer (far beyond the caches), on the same threads, made between the turns of that row's steps
(the "read GB/s" column), so that a drift of this shared machine moves the floor with the steps. Targets:
Mamba's cache flat in the context; MoE-Mamba's decode at 16k >= 4x the Transformer-MoE's tokens/s; MoE-Mamba's
batch-1 step within 1.5x of its floor at every context (the summary gives the worst). With --bf16 the weights
(and so the floor's bytes) are bfloat16.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli.study import width_matching  # noqa: E402
from megamoe.config import config_from_dict  # noqa: E402
from megamoe.inference.compiled import compile_decoding  # noqa: E402
from megamoe.inference.generation import _allocate, forward_cached  # noqa: E402
from megamoe.inference.loading import for_cpu_decoding, to_bf16  # noqa: E402
from megamoe.model import KVCache, build_model, count_parameters  # noqa: E402
from megamoe.ops import linear as ops_linear  # noqa: E402


def read_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """Bytes/s of summing a buffer far larger than the caches, the best of `reps`."""
    buffer = torch.ones(megabytes * 2 ** 18)
    buffer.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def build(section: dict, vocab: int, bf16: bool = False):
    cfg = config_from_dict({"model": dict(section, vocab_size=vocab)}).model
    model = build_model(cfg).eval()  # then laid out as load_for_inference lays a checkpoint out on CPU
    return for_cpu_decoding(to_bf16(model) if bf16 else model), count_parameters(cfg), cfg


def filled_cache(model, batch: int, context: int, steps: int):
    """A cache as if `context` tokens per sequence had been seen (random values of that size)."""
    cache = _allocate(model, batch, context + steps)
    for state in cache.states.values():
        if isinstance(state, KVCache):
            heads, head_dim = model.cfg.num_heads, model.cfg.d_model // model.cfg.num_heads
            state.k, state.v = (torch.randn(batch, heads, context + steps, head_dim, dtype=model.embedding.weight.dtype)
                                for _ in range(2))
            state.lengths = [context] * batch
        else:
            for t in state:
                t.normal_(0, 0.1)
    cache.lengths = [context] * batch
    return cache


def decode_step_times(models: dict, batch: int, context: int, steps: int, buffer: torch.Tensor,
                      turn: int = 8) -> tuple:
    """({name: (median seconds per step, cache bytes per sequence after the steps)}, bytes/s of the best sum of
    `buffer` made between the rounds of turns). The models take turns of `turn` steps until each has `steps`
    timed ones, so that a change in this shared machine's speed during the run is felt by each alike, while the
    steps of a turn follow one another as a decode's do. A turn's first step is not timed: it finds the caches
    full of the other models' weights and cache (with turn 1, every step does)."""
    timed, reads = (turn - 1 if turn > 1 else 1), []
    total = -(-steps // timed) * turn + (2 if turn == 1 else 0)
    runs = {name: [model, filled_cache(model, batch, context, total),
                   torch.randint(0, model.cfg.vocab_size, (batch, 1)), []] for name, model in models.items()}
    for i in range(0 if turn > 1 else -2, -(-steps // timed)):
        for run in runs.values():
            model, cache, _, times = run
            for j in range(turn):
                start = time.perf_counter()
                run[2] = forward_cached(model, run[2], cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
                if i >= 0 and (j > 0 or turn == 1) and len(times) < steps:  # turn 1: two warm-up steps first
                    times.append(time.perf_counter() - start)
        if turn > 1 or i % 8 == 7:  # turn 1: every 8th round, from the last warm-up one (i = -1)
            start = time.perf_counter()
            buffer.sum()
            reads.append(time.perf_counter() - start)
    return ({name: (statistics.median(run[3]), run[1].nbytes() // batch) for name, run in runs.items()},
            buffer.nbytes / min(reads))


def product_rate(product, x: torch.Tensor, weight: torch.Tensor, reps: int = 5) -> float:
    """Bytes/s of product(x, w) over copies of `weight` (160 MB of them, far beyond the caches), the best of reps."""
    copies = [weight.clone() if weight.is_mkldnn else weight.clone(memory_format=torch.preserve_format)
              for _ in range(max(4, int(160e6 / weight.nbytes)))]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for w in copies:
            product(x, w)
        best = min(best, time.perf_counter() - start)
    return weight.nbytes * len(copies) / best


def products_table(d_model: int, d_expert: int, vocab: int, dtype, bandwidth: float) -> None:
    """GB/s of megamoe.ops.linear's products against torch's own (and oneDNN's) for this model's weights."""
    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    packing = ops_linear._ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    print("| weight | stored | rows | torch GB/s | oneDNN GB/s | oneDNN, weight prepacked GB/s | megamoe GB/s | "
          "megamoe / read bandwidth |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for rows in (1, 8):
        for name, (d_out, d_in) in (("Mamba in_proj", (4 * d_model, d_model)),
                                    ("Mamba out_proj", (d_model, 2 * d_model)), ("LM head", (vocab, d_model))):
            w, x = torch.randn(d_out, d_in, dtype=dtype), torch.randn(rows, d_in, dtype=dtype)
            ours = product_rate(ops_linear.linear, x, w)
            dnn = f"{product_rate(onednn, x, w) / 1e9:.1f}" if ops_linear._ONEDNN else "-"
            # oneDNN's own blocked layout (what torch.compile's CPU freezing packs weights into): an opaque
            # tensor the rest of the model cannot read, measured here as the reference megamoe does not take
            packed = (f"{product_rate(onednn, x, torch.ops.mkldnn._reorder_linear_weight(w, rows)) / 1e9:.1f}"
                      if packing else "-")
            print(f"| {name} {d_out} x {d_in} | (out, in) | {rows} | {product_rate(F.linear, x, w) / 1e9:.1f} | "
                  f"{dnn} | {packed} | {ours / 1e9:.1f} | {ours / bandwidth:.2f} |")
        for name, (d_in, d_out) in (("expert w1", (d_model, d_expert)), ("expert w2", (d_expert, d_model))):
            w, x = torch.randn(d_in, d_out, dtype=dtype), torch.randn(rows, d_in, dtype=dtype)
            for stored, weight in (("(in, out)", w), ("(out, in) for decoding", ops_linear.store_out_in(w))):
                ours = product_rate(ops_linear.matmul_in_out, x, weight)
                print(f"| {name} {d_in} x {d_out} | {stored} | {rows} | "
                      f"{product_rate(torch.matmul, x, weight) / 1e9:.1f} | - | - | {ours / 1e9:.1f} | "
                      f"{ours / bandwidth:.2f} |")


def step_bytes(model, counts: dict, cache_bytes: int) -> int:
    """What a batch-1 step reads: the active weights (the LM head whole) and the cache."""
    size = model.embedding.weight.element_size()
    weights = counts["active"] - counts["embedding"] + model.lm_head.weight.numel() + model.cfg.d_model  # one row
    return weights * size + cache_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4, help="ME (or AE) pairs")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
    parser.add_argument("--turn", type=int, default=8,
                        help="steps each model takes in its turn, the first not timed; 1: the models alternate "
                             "step by step, every step timed (each then follows another model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="contexts 1k and 4k, 8 steps")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    parser.add_argument("--no-compile", action="store_true", help="leave out the MoE-Mamba compiled rows")
    parser.add_argument("--products", action="store_true",
                        help="also the GB/s of each matrix product path (megamoe.ops.linear) for these weights")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.steps = [1024, 4096], 8
    if args.turn < 1 or args.steps < 1:
        parser.error(f"--turn {args.turn} --steps {args.steps}: give both >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = read_bandwidth()
    mamba = dict(d_model=args.d_model, num_experts=args.experts, pattern="ME" * args.blocks)
    active = build(mamba, 128)[1]["active_non_embedding"]
    transformer = width_matching(dict(mamba, pattern="AE" * args.blocks), "d_expert", active)
    models = {"MoE-Mamba": build(mamba, args.vocab, args.bf16),
              "Transformer-MoE": build(transformer, args.vocab, args.bf16)}
    if args.bf16:  # the reference: the same MoE-Mamba's fp32 steps, in the same run
        models["MoE-Mamba fp32"] = build(mamba, args.vocab)
    compiling = time.perf_counter()
    if not args.no_compile:
        model, counts, cfg = models["MoE-Mamba"]
        models["MoE-Mamba compiled"] = (compile_decoding(copy.deepcopy(model), args.batches), counts, cfg)
        models = dict(sorted(models.items(), key=lambda item: item[0] not in ("MoE-Mamba", "MoE-Mamba compiled")))
    compiling = time.perf_counter() - compiling

    print(f"d_model {args.d_model}, {2 * args.blocks} blocks, {args.experts} experts, vocab {args.vocab}, "
          f"{'bf16' if args.bf16 else 'fp32'}, "
          f"{args.threads} threads; median of {args.steps} greedy steps, in turns of {args.turn}; "
          "memory read bandwidth at the start "
          f"{bandwidth / 1e9:.1f} GB/s" + ("" if args.no_compile else f"; compiled in {compiling:.1f} s"))
    for name, (_, counts, cfg) in models.items():
        print(f"{name}: pattern {cfg.pattern}, d_expert {cfg.resolved_d_expert}, {counts['total'] / 1e6:.2f}M "
              f"parameters, {counts['active_non_embedding'] / 1e6:.2f}M active without embeddings")
    print("| model | context | batch | step ms | tokens/s | cache MiB / sequence | read GB/s | floor ms | "
          "step / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    buffer = torch.ones(512 * 2 ** 18)
    speed, cache_size, over_floor, rows = {}, {}, {}, {}
    for context in args.contexts:
        for batch in args.batches:
            measured, row_bandwidth = decode_step_times({name: m[0] for name, m in models.items()}, batch, context,
                                                        args.steps, buffer, args.turn)
            for name, (seconds, cache_bytes) in measured.items():
                speed[name, context, batch] = batch / seconds
                cache_size[name, context] = cache_bytes
                read = floor = ratio = "-"
                if batch == 1:
                    model, counts, _ = models[name]
                    floor_s = step_bytes(model, counts, cache_bytes) / row_bandwidth
                    read, floor = f"{row_bandwidth / 1e9:.1f}", f"{1e3 * floor_s:.2f}"
                    ratio = f"{seconds / floor_s:.2f}x"
                    if name.startswith("MoE-Mamba"):  # the worst over the contexts
                        over_floor[name] = max(over_floor.get(name, 0.0), seconds / floor_s)
                rows[name, context, batch] = (f"| {name} | {context} | {batch} | {1e3 * seconds:.2f} | "
                                              f"{batch / seconds:,.0f} | {cache_bytes / 2 ** 20:.2f} | {read} | "
                                              f"{floor} | {ratio} |")
    for key in sorted(rows, key=lambda k: (list(models).index(k[0]), k[1], k[2])):
        print(rows[key])
    longest = args.contexts[-1]
    flat = cache_size["MoE-Mamba", longest] / cache_size["MoE-Mamba", args.contexts[0]]
    ratios = "; ".join(name + " " + ", ".join(
        f"batch {b} {speed[name, longest, b] / speed['Transformer-MoE', longest, b]:.2f}x" for b in args.batches)
        for name in over_floor if name != "MoE-Mamba fp32")
    print(f"MoE-Mamba cache at {longest} / at {args.contexts[0]}: {flat:.2f}x (target 1.00x, flat); "
          f"decode tokens/s at {longest} over the Transformer-MoE's: {ratios} (target >= 4x); "
          "batch-1 step / floor at the worst context: "
          + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in over_floor.items())
          + " (target <= 1.5x)")
    if args.products:
        products_table(args.d_model, models["MoE-Mamba"][2].resolved_d_expert, args.vocab,
                       torch.bfloat16 if args.bf16 else torch.float32, bandwidth)


if __name__ == "__main__":
    main()
