"""Our CPU engine against PyTorch's C++ flash kernel, side by side in one process.

``blockwise`` (the XLA tile engine, default options) against
``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's CPU flash
kernel) on the same inputs in the same memory: B=1, 4 heads, head_dim 64,
float32, causal, ``[B, T, N, H]`` (torch gets ``[B, N, T, H]`` views of it).
Forward, and forward+backward with the output cotangent passed in (both sides). Each round
runs every (length, pass, side) three times in a row and times the last two (see
:func:`interleaved`), after a warm-up round, so load from other processes falls on
both sides of a ratio alike; figures are medians over rounds of the per-round ratio
(and of the times). torch is optional (``pip install
torch==2.13.0``, or ``efficient_attn[peers]``): without it only our times, the
memory bars and the profile are written.

Also written: compiled temporary memory of ``blockwise`` against XLA's
``jax.nn.dot_product_attention`` at ``--mem-len`` (compile only), and where
the time goes (``--profile``): the thunks of one compiled call traced with
``jax.profiler`` and summed by kind (matmuls, exp and softmax arithmetic,
reductions, masks, slicing, layout copies). Thunks run concurrently, so the
kinds' shares are of the summed thunk time, not of the wall time.

    python scripts/bench_peers.py                      # 1k, 4k, 16k; writes the report
    python scripts/bench_peers.py --tiles 1024,4096    # the engine's CPU tile table
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
import numpy as np

from efficient_attn import bench
from efficient_attn.core.api import attention

B, N, H = 1, 4, 64
OUT = "experiments/results/cpu/peers/bench_peers.md"
TILES = ((512, 256), (256, 512), (512, 512), (256, 256), (1024, 256), (512, 1024))


def ours(t: int, backward: bool, **options):
    """(compiled call, its arguments) of ``blockwise``: the output, or (dq, dk, dv)."""
    q, k, v = bench.random_inputs(B, t, t, N, N, H)
    dout = bench.random_normal((B, t, N, H), np.float32, 3)

    def fwd(q, k, v):
        return attention(q, k, v, method="blockwise", causal=True, **options)

    def fwd_bwd(q, k, v, dout):
        return jax.vjp(fwd, q, k, v)[1](dout)

    args = (q, k, v, dout) if backward else (q, k, v)
    exe = bench.compiled(fwd_bwd if backward else fwd, *args)[0]
    return lambda: jax.block_until_ready(exe(*args)), exe, args


def theirs(t: int, backward: bool):
    """torch SDPA on the same values in ``[B, N, T, H]``, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    # Views of the same [B, T, N, H] values (the memory layout ours reads): SDPA takes
    # [B, N, T, H] and reads strided inputs in place.
    q, k, v = (torch.from_numpy(np.array(x)).transpose(1, 2)
               for x in bench.random_inputs(B, t, t, N, N, H))  # fmt: skip
    dout = torch.from_numpy(np.array(bench.random_normal((B, t, N, H), np.float32, 3)))
    dout = dout.transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if not backward:

        def fwd():
            with torch.no_grad():
                return sdpa(q, k, v, is_causal=True)

        return fwd
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    return lambda: torch.autograd.grad(sdpa(qg, kg, vg, is_causal=True), (qg, kg, vg), dout)


def _time(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def interleaved(calls: dict, rounds: int, burst: int = 3) -> dict:
    """``name -> [seconds per round]`` of zero-argument calls: per round each call runs
    ``burst`` times in a row and the mean of all but the first is its time.

    The first call after the other side absorbs the hand-over of the cores: torch's
    OpenMP threads spin for a while after each call (``OMP_WAIT_POLICY`` unset), which
    slowed our short calls that followed them when calls alternated one by one.
    """
    for f in calls.values():
        f()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, f in calls.items():
            f()
            times[name].append(statistics.mean(_time(f) for _ in range(burst - 1)))
    return times


def _kind(body: str) -> str:
    ops = set(re.findall(r" ([a-z][a-z0-9-]*)\(", body))
    if "dot" in ops or "convolution" in ops:
        return "matmul"
    if "reduce" in ops:
        return "reduction (max, sum)"
    if "exponential" in ops:
        return "exp and softmax arithmetic"
    if ops & {"compare", "and", "or"} and "select" in ops:
        return "masks (where)"
    if ops & {"dynamic-slice", "dynamic-update-slice"}:
        return "tile slicing and writes"
    if ops & {"transpose", "copy"}:
        return "layout copies"
    return "other elementwise"


def profile(exe, args, calls: int = 3) -> dict[str, float]:
    """Seconds per call of the compiled ``exe``'s thunks, summed by :func:`_kind`."""
    text = exe.as_text()
    bodies = dict(re.findall(r"\n(%\S+) [^\n]*\{\n(.*?)\n\}", text, re.S))
    kinds = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? (fusion|dot|copy|transpose|reduce)\((.*)", line)
        if m:
            called = re.search(r"calls=(%[\w.-]+)", m.group(3))
            body = bodies.get(called.group(1), "") if called else f" {m.group(2)}("
            kinds[m.group(1)] = _kind(body)
    for _ in range(2):
        jax.block_until_ready(exe(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(exe(*args))
        path = glob.glob(f"{d}/**/*.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            total[kinds[e["name"]]] += e["dur"] * 1e-6 / calls
    return dict(total)


#: The tile matmuls of the engine (per head: b=4 heads batched, h=64): name -> einsum.
MATMULS = {
    "S = Q K^T (fwd, bwd)": ("bqh,bsh->bqs", "q", "k"),
    "O += P V (fwd)": ("bqs,bsh->bqh", "s", "k"),
    "dK += dS^T Q (transposed left operand)": ("bqs,bqh->bsh", "s", "q"),
    "dK^T += Q^T dS (what the engine runs)": ("bhq,bqs->bhs", "qt", "s"),
}


def matmul_table(tiles=((512, 256), (256, 512), (256, 256), (128, 128)), rounds: int = 9):
    """Markdown rows: GFLOP/s of each tile matmul at each tile shape (32 in a loop)."""
    lines = ["| matmul | " + " | ".join(f"{a}x{b}" for a, b in tiles) + " |",
             "|---|" + "---:|" * len(tiles)]  # fmt: skip
    for name, (spec, a_name, b_name) in MATMULS.items():
        cells = []
        for bq, bk in tiles:
            shapes = {"q": (32, 4, bq, H), "k": (32, 4, bk, H), "s": (32, 4, bq, bk),
                      "qt": (32, 4, H, bq)}  # fmt: skip
            a = bench.random_normal(shapes[a_name], np.float32, 0)
            b = bench.random_normal(shapes[b_name], np.float32, 1)
            out = jax.eval_shape(lambda x, y, spec=spec: jax.numpy.einsum(spec, x[0], y[0]), a, b)

            def loop(x, y, spec=spec, out=out):
                body = lambda j, acc: acc + jax.numpy.einsum(spec, x[j], y[j])  # noqa: E731
                return jax.lax.fori_loop(0, 32, body, jax.numpy.zeros(out.shape, out.dtype))

            exe = bench.compiled(loop, a, b)[0]
            t = min(bench.time_compiled(exe, (a, b), repeats=rounds))
            cells.append(f"{32 * 4 * bq * bk * H * 2 / t / 1e9:,.0f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def tile_table(lengths: list[int], rounds: int) -> list[str]:
    """Markdown rows: each candidate tile's median time relative to 512x256, per length."""
    lines = ["| T | pass | " + " | ".join(f"{a}x{b}" for a, b in TILES) + " | best |",
             "|---:|---|" + "---:|" * (len(TILES) + 1)]  # fmt: skip
    for t in lengths:
        for backward in (False, True):
            calls = {c: ours(t, backward, block_q=c[0], block_k=c[1])[0] for c in TILES}
            times = {c: statistics.median(x) for c, x in interleaved(calls, rounds).items()}
            base = times[TILES[0]]
            best = min(times, key=times.get)
            cells = " | ".join(f"{times[c] / base:.2f}" for c in TILES)
            lines.append(f"| {t} | {'fwd+bwd' if backward else 'fwd'} | {cells} | "
                         f"{best[0]}x{best[1]} ({times[best] * 1e3:,.1f} ms) |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per length")
    p.add_argument("--mem-len", type=int, default=16384)
    p.add_argument("--profile", default="1024,4096", help="lengths to profile ('' for none)")
    p.add_argument("--tiles", default="", help="lengths for the tile table (then only that)")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    start = time.perf_counter()
    load0 = os.getloadavg()[0]
    head = [
        f"# blockwise (XLA engine) vs PyTorch SDPA on {bench.device_description()}",
        "",
        f"{datetime.date.today()}, jax {jax.__version__}, B={B}, N={N}, H={H}, float32, causal; "
        f"{os.cpu_count()} CPUs; 1-minute load average at start {load0:.2f}",
    ]
    if args.tiles:
        lengths = [int(x) for x in args.tiles.split(",")]
        lines = [*head, "", f"## Tile table: median time / 512x256 ({args.rounds} rounds)", "",
                 *tile_table(lengths, args.rounds)]  # fmt: skip
        end = os.getloadavg()[0]
        lines += ["", f"Command: `python scripts/bench_peers.py --tiles {args.tiles} --rounds "
                  f"{args.rounds}`; 1-minute load average at end {end:.2f}."]  # fmt: skip
        bench.write_report(lines, args.out.replace("bench_peers.md", "tiles.md"))
        return
    try:
        import torch

        peer = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        peer = "torch not installed: our times only"
    lines = [*head, f"peer: {peer}", "",
             f"## Time (median of {args.rounds} interleaved rounds)", "",
             "| T | pass | blockwise ms | torch SDPA ms | blockwise / torch | "
             "blockwise GFLOP/s |", "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for t in (int(x) for x in args.lengths.split(",")):
        for backward in (False, True):
            calls = {"ours": ours(t, backward)[0]}
            peer_call = theirs(t, backward)
            if peer_call is not None:
                calls["torch"] = peer_call
            times = interleaved(calls, args.rounds)
            mine = statistics.median(times["ours"])
            flops = bench.attention_flops(B, N, t, t, H, causal=True, backward=backward)
            ratio, other = "n/a", "n/a"
            if "torch" in times:
                ratios = [a / b for a, b in zip(times["ours"], times["torch"], strict=True)]
                ratio = f"{statistics.median(ratios):.2f}"
                other = f"{statistics.median(times['torch']) * 1e3:,.1f}"
            lines.append(f"| {t} | {'fwd+bwd' if backward else 'fwd'} | {mine * 1e3:,.1f} | "
                         f"{other} | {ratio} | {flops / mine / 1e9:,.1f} |")  # fmt: skip
            print(lines[-1], flush=True)
    t = args.mem_len
    shapes = [jax.ShapeDtypeStruct((B, t, N, H), np.float32)] * 3
    lines += ["", f"## Compiled temporary memory, causal, T={t} (MiB; compile only)", "",
              "| pass | xla | blockwise | ratio |", "|---|---:|---:|---:|"]  # fmt: skip
    for backward in (False, True):
        mem = {m: bench.temp_bytes(bench.compiled(
            bench.attention_fn(m, causal=True, backward=backward), *shapes)[0])
            for m in ("xla", "blockwise")}  # fmt: skip
        xla, ours_ = mem["xla"], mem["blockwise"]
        lines.append(f"| {'fwd+bwd' if backward else 'fwd'} | {xla / 2**20:,.1f} | "
                     f"{ours_ / 2**20:,.1f} | {ours_ / xla:.4f} |")  # fmt: skip
    lines += ["", "## Tile matmuls on this CPU (GFLOP/s, best of rounds; 4 heads, head_dim 64)",
              "", *matmul_table()]  # fmt: skip
    for t in (int(x) for x in args.profile.split(",") if x):
        lines += ["", f"## Where the time goes: blockwise, T={t} (thunk seconds per call)", "",
                  "| kind | fwd ms | fwd share | fwd+bwd ms | fwd+bwd share |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        kinds = [profile(*ours(t, backward)[1:]) for backward in (False, True)]
        for kind in sorted(set(kinds[0]) | set(kinds[1]), key=lambda x: -kinds[1].get(x, 0)):
            cells = [f"{k.get(kind, 0) * 1e3:,.2f} | {k.get(kind, 0) / sum(k.values()):.0%}"
                     for k in kinds]  # fmt: skip
            lines.append(f"| {kind} | {' | '.join(cells)} |")
    lines += ["", f"Command: `python scripts/bench_peers.py --lengths {args.lengths} --rounds "
              f"{args.rounds} --profile {args.profile}`; {time.perf_counter() - start:.0f} s; "
              f"1-minute load average at end {os.getloadavg()[0]:.2f}."]  # fmt: skip
    bench.write_report(lines, args.out)


if __name__ == "__main__":
    main()
