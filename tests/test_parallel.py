"""Sequence-parallel attention (ring, all-to-all) on split host devices and across two processes.

Every check runs in a subprocess with ``--xla_force_host_platform_device_count=8``
(``python -m tests.test_parallel <check>``), so the rest of the suite keeps
one device; each subprocess checks many cases to pay JAX's start-up once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
AXIS = "sp"
SCALE = 0.3


def _env(devices: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["JAX_PLATFORMS"] = "cpu"
    # The suite's compile flags (conftest) stay; the device count is this process's own.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _run_check(name: str, timeout: float = 240) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_parallel", name],
        cwd=ROOT,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"check {name!r} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    assert f"{name}: ok" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- checks
# Run inside the subprocess (8 host devices).


def _inputs(b, tq, tk, n, kh, h, hv, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, n, h)).astype(np.float32)
    k = rng.standard_normal((b, tk, kh, h)).astype(np.float32)
    v = rng.standard_normal((b, tk, kh, hv)).astype(np.float32)
    dout = rng.standard_normal((b, tq, n, hv)).astype(np.float32)
    return q, k, v, dout


def _out_and_grads(fn, q, k, v, dout, scale=SCALE):
    """``(out, (dq, dk, dv, dscale))`` of ``sum(fn(q, k, v, scale) * dout)``, compiled once."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, scale, dout):
        out = fn(q, k, v, scale)
        return jnp.sum(out * dout), out

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    grads, out = jax.jit(grad)(q, k, v, np.float32(scale), dout)
    return out, grads


def _check_against_float64(name, mesh, fn, q, k, v, dout, *, causal, lengths):
    """Output and gradients of ``fn`` equal the float64 reference; empty rows are exact zeros."""
    import efficient_attn as ea
    from efficient_attn.core import masking

    out, grads = _out_and_grads(fn, q, k, v, dout)
    kw = {"causal": causal, "kv_lengths": lengths, "scale": SCALE}
    ref = ea.numpy_reference(q, k, v, **kw)[0]
    ref_grads = ea.numpy_reference_grads(q, k, v, dout, **kw)
    # d out / d scale = sum(dS * QK^T) = sum(q * dq) / scale
    ref_grads = (*ref_grads, np.sum(np.asarray(q, np.float64) * ref_grads[0]) / SCALE)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=2e-5, err_msg=name)
    for label, x, r in zip(("dq", "dk", "dv", "dscale"), grads, ref_grads, strict=True):
        x = np.asarray(x)
        assert np.isfinite(x).all(), f"{name}: {label} not finite"
        np.testing.assert_allclose(x, r, rtol=1e-4, atol=5e-5, err_msg=f"{name}: {label}")
    empty = ~np.asarray(masking.nonempty_rows(lengths, *q.shape[:2], k.shape[1], causal=causal))
    assert (np.asarray(out)[empty] == 0).all(), f"{name}: rows without keys must be zero"
    size, tq = mesh.shape[AXIS], q.shape[1]
    if tq % size == 0:  # comes back split along the sequence
        assert {s.data.shape[1] for s in out.addressable_shards} == {tq // size}, name
    return out


# (devices, method, causal, b, tq, tk, n, kh, h, hv, lengths, options)
RING_CASES = [
    (2, "blockwise", True, 2, 37, 37, 4, 2, 8, 8, [37, 11], {"block_q": 4, "block_k": 3}),
    (4, "blockwise", False, 2, 20, 45, 4, 2, 8, 6, [45, 20], {}),
    (8, "blockwise", True, 2, 45, 19, 4, 1, 8, 8, [19, 0], {"block_q": 2, "block_k": 2}),
    (8, "dense", True, 1, 29, 29, 6, 3, 8, 8, None, {}),
]

A2A_CASES = [
    (2, "blockwise", True, 2, 37, 37, 4, 2, 8, 8, [37, 11], {"block_q": 8, "block_k": 4}),
    (4, "dense", False, 2, 19, 45, 8, 4, 8, 6, [45, 20], {}),
    (8, "blockwise", True, 1, 45, 19, 8, 8, 8, 8, [13], {}),
]


def _mesh(devices):
    import jax
    from jax.sharding import Mesh

    assert jax.device_count() == 8
    return Mesh(np.array(jax.devices()[:devices]), (AXIS,))


def _run_cases(strategy, cases):
    from efficient_attn.parallel import sequence_parallel_attention

    for i, (p, method, causal, b, tq, tk, n, kh, h, hv, lengths, opts) in enumerate(cases):
        mesh = _mesh(p)
        q, k, v, dout = _inputs(b, tq, tk, n, kh, h, hv, seed=i)
        lengths = None if lengths is None else np.array(lengths)
        kw = {"causal": causal, "kv_lengths": lengths, "method": method, **opts}

        def fn(q, k, v, scale, mesh=mesh, kw=kw):
            return sequence_parallel_attention(
                q, k, v, mesh=mesh, axis=AXIS, strategy=strategy, scale=scale, **kw
            )

        name = f"{strategy} P{p}-{method}-{'causal' if causal else 'full'}-Tq{tq}-Tk{tk}-N{n}-K{kh}"
        _check_against_float64(name, mesh, fn, q, k, v, dout, causal=causal, lengths=lengths)


def check_ring():
    """Ring equals float64 dense: P=2,4,8, causal or not, kv_lengths, GQA/MQA, cross, odd T."""
    _run_cases("ring", RING_CASES)


def check_all_to_all():
    """All-to-all equals float64 dense; an approximate method equals its one-device self."""
    import efficient_attn as ea
    from efficient_attn.parallel import sequence_parallel_attention

    _run_cases("all_to_all", A2A_CASES)
    mesh = _mesh(4)
    q, k, v, dout = _inputs(2, 30, 30, 4, 4, 8, 8, seed=3)
    kw = {"method": "local", "window": 5, "causal": True, "kv_lengths": np.array([30, 17])}

    def split(q, k, v, scale):
        return sequence_parallel_attention(
            q, k, v, mesh=mesh, axis=AXIS, strategy="all_to_all", scale=scale, **kw
        )

    got = _out_and_grads(split, q, k, v, dout)
    ref = _out_and_grads(
        lambda q, k, v, scale: ea.attention(q, k, v, scale=scale, **kw), q, k, v, dout
    )
    for x, r in zip((got[0], *got[1]), (ref[0], *ref[1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-5, atol=1e-6)


def check_meshes_and_errors():
    """jax.make_mesh (Explicit axes in recent JAX), sharded inputs, calls outside jit; errors."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    import efficient_attn as ea
    from efficient_attn.parallel import sequence_parallel_attention

    q, k, v, dout = _inputs(1, 36, 36, 4, 4, 8, 8, seed=5)
    mesh = jax.make_mesh((4,), (AXIS,))
    split = NamedSharding(mesh, PartitionSpec(None, AXIS))
    args = [jax.device_put(x, split) for x in (q, k, v)]
    for strategy in ("ring", "all_to_all"):

        def fn(q, k, v, scale, strategy=strategy):
            return sequence_parallel_attention(
                q, k, v, mesh=mesh, axis=AXIS, strategy=strategy, causal=True, scale=scale
            )

        name = f"make_mesh {strategy} {getattr(mesh, 'axis_types', '')}"
        with jax.set_mesh(mesh):  # gradients on Explicit meshes need the mesh context
            _check_against_float64(name, mesh, fn, *args, dout, causal=True, lengths=None)
    # Outside jit, without a mesh context, unsplit inputs of a length P does not divide.
    eager = sequence_parallel_attention(
        q[:, :35], k[:, :35], v[:, :35], mesh=mesh, axis=AXIS, causal=True, scale=SCALE
    )
    ref = ea.numpy_reference(q[:, :35], k[:, :35], v[:, :35], causal=True, scale=SCALE)[0]
    np.testing.assert_allclose(np.asarray(eager), ref, rtol=1e-4, atol=2e-5)

    mesh = _mesh(4)
    bad = [
        ({"strategy": "ring", "method": "local"}, "exact method"),
        ({"strategy": "ring", "method": "xla"}, "ring methods: blockwise, dense"),
        ({"strategy": "all_to_all", "kv_heads": 2}, "must be divisible by 4"),
        ({"strategy": "tree"}, "unknown strategy"),
        ({"axis": "data"}, "mesh axis names"),
        ({"block_q": 0}, "block_q=0 must be a positive int"),
        ({"window": 3}, "unknown option"),
        ({"method": "nope"}, "unknown method"),
        ({"causal": 1}, "causal must be a bool"),
    ]
    for kw, message in bad:
        kw = {"axis": AXIS, **kw}
        kh = kw.pop("kv_heads", 4)
        with pytest.raises(ValueError, match=message):
            sequence_parallel_attention(q, k[:, :, :kh], v[:, :, :kh], mesh=mesh, **kw)
    with pytest.raises(ValueError, match=r"mesh must be a jax\.sharding\.Mesh"):
        sequence_parallel_attention(q, k, v, mesh=None, axis=AXIS)


def check_ring_mods():
    """A document mask and learned ALiBi slopes (distinct per head) on 4 devices equal
    one-device blockwise, gradients of the slopes included: written as plain closures over
    traced arrays under ring (global positions) and all_to_all (global head indices), and
    as library mods under all_to_all."""
    import jax
    import jax.numpy as jnp

    import efficient_attn as ea
    from efficient_attn.core import mods
    from efficient_attn.parallel import sequence_parallel_attention

    mesh = _mesh(4)
    q, k, v, dout = _inputs(2, 50, 50, 4, 4, 8, 8, seed=7)
    seg = np.sort(np.random.default_rng(0).integers(0, 4, size=(2, 50)), axis=1).astype(np.int32)
    slopes = jnp.asarray(mods.alibi_slopes(4)) * jnp.arange(1.0, 5.0)  # distinct per head
    lengths = np.array([50, 41])

    def library(slopes, seg):
        return {"mask_mod": mods.document_mask(seg), "score_mod": mods.alibi(slopes)}

    def closures(slopes, seg):  # what FlexAttention users write
        return {
            "mask_mod": lambda b, h, i, j: seg[b, i] == seg[b, j],
            "score_mod": lambda s, b, h, i, j: s - slopes[h] * jnp.abs(i - j).astype(s.dtype),
        }

    def run(fn, make_mods):
        def loss(q, slopes, seg):
            kw = {**make_mods(slopes, seg), "causal": True, "kv_lengths": lengths,
                  "scale": SCALE}  # fmt: skip
            return jnp.sum(fn(q, **kw) * dout)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, slopes, seg)

    def split(strategy):
        def fn(q, **kw):
            return sequence_parallel_attention(
                q, k, v, mesh=mesh, axis=AXIS, strategy=strategy, **kw
            )

        return fn

    def one(q, **kw):
        return ea.attention(q, k, v, method="blockwise", block_q=8, block_k=8, **kw)

    ref_val, ref_grads = run(one, library)
    # all_to_all: slopes[h] at global head indices after the head split
    cases = [("ring", closures), ("all_to_all", closures), ("all_to_all", library)]
    for strategy, make_mods in cases:
        val, grads = run(split(strategy), make_mods)
        name = f"{strategy} {make_mods.__name__}"
        np.testing.assert_allclose(val, ref_val, rtol=1e-4, err_msg=name)
        for g, r in zip(grads, ref_grads, strict=True):
            assert np.abs(np.asarray(r)).max() > 0
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=5e-5,
                                       err_msg=name)  # fmt: skip
    window = mods.sliding_window(6)
    got = sequence_parallel_attention(q, k, v, mesh=mesh, axis=AXIS, mask_mod=window)
    ref = ea.attention(q, k, v, method="dense", mask_mod=window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="not Python objects JAX cannot trace"):
        table = [0, 1, 2]
        sequence_parallel_attention(q, k, v, mesh=mesh, axis=AXIS,
                                    mask_mod=lambda b, h, i, j: table[i] >= 0)  # fmt: skip


CHECKS = {
    f.__name__: f for f in (check_ring, check_all_to_all, check_meshes_and_errors, check_ring_mods)
}


# ----------------------------------------------------------------------------- two processes


def _process_worker(process_id: int, port: int) -> None:
    """One of two processes (4 host devices each): ring attention over all 8 devices."""
    from efficient_attn.parallel import initialize

    index, count = initialize(
        f"127.0.0.1:{port}", 2, process_id, num_cpu_devices=4, initialization_timeout=60
    )
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import efficient_attn as ea
    from efficient_attn.parallel import sequence_parallel_attention

    assert (index, count, jax.device_count(), jax.local_device_count()) == (process_id, 2, 8, 4)
    q, k, v, dout = _inputs(2, 40, 40, 4, 2, 8, 8, seed=11)  # same arrays in both processes
    lengths = np.array([40, 23])
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    split = NamedSharding(mesh, PartitionSpec(None, AXIS))
    glob = [jax.make_array_from_callback(x.shape, split, lambda i, x=x: x[i]) for x in (q, k, v)]
    kw = {"causal": True, "kv_lengths": lengths}

    def fn(q, k, v, scale):
        return sequence_parallel_attention(
            q, k, v, mesh=mesh, axis=AXIS, block_q=4, scale=scale, **kw
        )

    dout_glob = jax.make_array_from_callback(dout.shape, split, lambda i: dout[i])
    out, grads = _out_and_grads(fn, *glob, dout_glob)
    with jax.default_device(jax.local_devices()[0]):  # the single-process result
        one = jax.jit(lambda q, k, v: ea.attention(q, k, v, scale=SCALE, **kw))(q, k, v)
    ref_grads = ea.numpy_reference_grads(q, k, v, dout, scale=SCALE, **kw)
    for got, want in zip((out, *grads[:3]), (one, *ref_grads), strict=True):
        assert not got.is_fully_addressable
        for shard in got.addressable_shards:
            np.testing.assert_allclose(
                np.asarray(shard.data), np.asarray(want)[shard.index], rtol=1e-4, atol=2e-5
            )
    jax.distributed.shutdown()
    print(f"process {process_id}: ok", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- tests


def test_zigzag_layout_balances_causal_work():
    """Each device holds chunks d and 2P-1-d: positions tile the sequence, and at every ring
    step every device visits the same number of causal tiles (a contiguous layout does not)."""
    from efficient_attn.core import blockmask, mods
    from efficient_attn.parallel import layout

    size, length, block = 4, 256, 16

    def tiles(zigzag):  # [device, step] tiles visited by blockwise
        work = np.zeros((size, size), int)
        for d in range(size):
            q_pos = layout.positions(d, length, size, zigzag=zigzag, offset=0)
            for step in range(size):
                k_pos = layout.positions((d - step) % size, length, size, zigzag=zigzag, offset=0)
                bm = blockmask.build(
                    mods.causal_mask(), np.asarray(q_pos), np.asarray(k_pos),
                    q_limit=size * length, k_limit=size * length, batch=None, heads=None,
                    block_q=block, block_k=block,
                )  # fmt: skip
                work[d, step] = int((bm.tiles != 0).sum())
        return work

    pos = np.concatenate(
        [layout.positions(d, length, size, zigzag=True, offset=0) for d in range(size)]
    )
    assert sorted(pos.tolist()) == list(range(size * length))
    zig, contiguous = tiles(True), tiles(False)
    assert zig.sum() == contiguous.sum()  # same total work, skipped tiles included
    assert (zig == zig[:1]).all()  # every device, every step: the same work
    assert zig.max(0).sum() < 0.6 * contiguous.max(0).sum()  # synchronous steps: ~2x faster


def test_cluster_from_env():
    from efficient_attn.parallel.distributed import cluster_from_env

    env = {"JAX_COORDINATOR_ADDRESS": "node1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert cluster_from_env(env) == {
        "coordinator_address": "node1:1234",
        "num_processes": 4,
        "process_id": 2,
    }
    assert cluster_from_env({}) == dict.fromkeys(
        ("coordinator_address", "num_processes", "process_id")
    )
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' must be an integer"):
        cluster_from_env({"JAX_PROCESS_ID": "x"})


def test_ring_matches_float64_reference():
    _run_check("check_ring")


def test_ring_and_all_to_all_with_closures_document_mask_and_learned_alibi():
    _run_check("check_ring_mods")


def test_all_to_all_matches_float64_reference():
    _run_check("check_all_to_all")


def test_make_mesh_sharded_inputs_and_errors():
    _run_check("check_meshes_and_errors")


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_two_processes_ring_equals_single_process(tmp_path):
    """Two localhost processes (jax.distributed, gloo CPU collectives), 4 devices each."""
    port = _free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]  # files, not pipes: no deadlock
    procs = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as f:
                cmd = [sys.executable, "-m", "tests.test_parallel", "process", str(i), str(port)]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(None), stdout=f, stderr=f))
        deadline = time.monotonic() + 180
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        text = log.read_text()
        assert p.returncode == 0, f"process {i} failed:\n{text[-6000:]}"
        assert f"process {i}: ok" in text


if __name__ == "__main__":
    if sys.argv[1] == "process":
        _process_worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        CHECKS[sys.argv[1]]()
        print(f"{sys.argv[1]}: ok")
