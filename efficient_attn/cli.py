"""``efficient-attn`` command line: thin subcommands over the library.

efficient-attn methods     registered methods and their properties
efficient-attn compare     a quick side-by-side comparison on this machine
efficient-attn sweep       scaling sweeps of time, memory and error (resumable, sharded)
efficient-attn report      markdown, LaTeX and plots of sweep results
efficient-attn train       train a small model with any method on a synthetic task
efficient-attn quality     train every method across task difficulty (accuracy report)
efficient-attn plot-attention  heatmaps of a trained run's attention weights (any method)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import efficient_attn as ea
from efficient_attn import bench, dropin

#: name -> (help, run(args) -> exit code). Other modules add their
#: subcommands with :func:`subcommand`.
_SUBCOMMANDS: dict[str, tuple[str, Callable]] = {}


def subcommand(name: str, help: str):
    """Decorator registering ``run(args)``; ``run.add_arguments(parser)`` is optional."""

    def decorator(run: Callable) -> Callable:
        _SUBCOMMANDS[name] = (help, run)
        return run

    return decorator


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _methods_table() -> str:
    rows = [
        "| method | family | exact | supports | options | available | description |",
        "|---" * 7 + "|",
    ]
    for name in ea.methods():
        m = ea.get_method(name)
        arrays = [
            f"{k} [{', '.join(a.shape)}] "
            f"({'per-token input' if a.per_token else 'array'}, "
            f"{'required' if a.required else 'optional'})"
            for k, a in m.arrays.items()
        ]
        sizes = [f"{k}={v}" for k, v in m.sizes.items()]  # default sizes of the arrays' dims
        opts = ", ".join([*arrays, *sizes, *(f"{k}={v!r}" for k, v in m.options.items())]) or "-"
        reason = m.available()
        rows.append(
            f"| {name} | {m.family} | {m.exact} | {', '.join(sorted(m.supports))}"
            f"{' (causal only)' if m.causal_only else ''} | {opts} | "
            f"{'yes' if reason is None else 'no: ' + reason} | {m.description} |"
        )
    return "\n".join(rows)


@subcommand("methods", help="list registered methods with their properties")
def run_methods(args: argparse.Namespace) -> int:
    print(dropin.support_table() if args.dropin else _methods_table())
    return 0


def _methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dropin",
        action="store_true",
        help="which method honours which argument of ea.dot_product_attention",
    )


run_methods.add_arguments = _methods_arguments


def compare_table(
    methods: Sequence[str],
    seq_lens: Sequence[int],
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    causal: bool = True,
    repeats: int = 3,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Time fwd and fwd+bwd, compiled temp memory and error vs float64 for each point."""
    rows = []
    echo(
        "| method | seq | fwd ms | fwd+bwd ms | fwd GFLOP/s | fwd+bwd temp MiB | rel. error |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for t in seq_lens:
        q, k, v = bench.random_inputs(batch, t, t, heads, heads, head_dim)
        ref, _ = ea.numpy_reference(np.asarray(q), np.asarray(k), np.asarray(v), causal=causal)
        for name in methods:
            reason = ea.get_method(name).available()
            if reason is not None:
                echo(f"| {name} | {t} | unavailable: {reason} | | | | |")
                continue
            fwd = bench.measure(
                bench.attention_fn(name, causal=causal, backward=False), (q, k, v), repeats
            )
            both = bench.measure(
                bench.attention_fn(name, causal=causal, backward=True), (q, k, v), repeats
            )
            out = bench.attention_fn(name, causal=causal, backward=False)(q, k, v)
            own = bench.own_reference(name, q, k, v, causal=causal)  # additive: its formula
            flops = bench.attention_flops(
                batch, heads, t, t, head_dim, causal=causal, backward=False
            )
            row = {
                "method": name,
                "seq_len": t,
                "fwd_ms": fwd.median_s * 1e3,
                "fwd_bwd_ms": both.median_s * 1e3,
                "fwd_gflops": flops / fwd.median_s / 1e9,
                "temp_mib": (both.temp_bytes or 0) / 2**20,
                "rel_error": bench.relative_error(out, ref if own is None else own),
            }
            rows.append(row)
            echo(
                f"| {name} | {t} | {row['fwd_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | "
                f"{row['fwd_gflops']:.1f} | {row['temp_mib']:.1f} | {row['rel_error']:.1e} |"
            )
    return rows


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=None, help="comma-separated (default: all available)")
    p.add_argument("--seq-lens", type=_int_list, default=[512, 1024, 2048])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=3)


@subcommand("compare", help="quick side-by-side comparison of methods on this machine")
def run_compare(args: argparse.Namespace) -> int:
    names = args.methods.split(",") if args.methods else list(ea.methods())
    for name in names:
        ea.get_method(name)  # unknown names fail before any work
    print(f"# efficient_attn compare on {bench.device_description()}")
    print(f"B=1, N={args.heads}, H={args.head_dim}, float32, causal={args.causal}\n")
    compare_table(
        names,
        args.seq_lens,
        heads=args.heads,
        head_dim=args.head_dim,
        causal=args.causal,
        repeats=args.repeats,
    )
    return 0


run_compare.add_arguments = _compare_args


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiment",
        nargs="?",
        default="default",
        help="preset name in experiments/ or a .toml file (default: default); a preset with "
        "a 'study' key runs that study (decode, scale_ablation, lra_efficiency, "
        "listops, zoology_mqar)",
    )
    from efficient_attn.sweep.spec import AXIS_TABLE

    for axis in AXIS_TABLE:
        if axis.flag is None:
            continue
        flag = "--" + axis.flag.replace("_", "-")
        if axis.kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif axis.kind == "options":
            p.add_argument(
                flag, action="append", default=[], metavar="METHOD.NAME=V[,V]", help=axis.help
            )
        else:
            kind = _int_list if axis.kind == "int" else _str_list
            p.add_argument(flag, type=kind, help=axis.help or None)
    p.add_argument("--repeats", type=int)
    p.add_argument("--timeout", type=float, help="seconds per point (default from preset)")
    p.add_argument("--out", help="results directory (default: runs/EXPERIMENT)")
    p.add_argument("--shard", help="I/N: run every N-th point starting at I (0 <= I < N)")
    p.add_argument("--retry-errors", action="store_true", help="re-run points that errored")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--dry-run", action="store_true", help="print the points and exit")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument(
        "--status", metavar="DIR", help="points done, running (by whom), failed, left; ETA"
    )


@subcommand("sweep", help="scaling sweep of time, memory and error (a preset in experiments/)")
def run_sweep(args: argparse.Namespace) -> int:
    from efficient_attn import studies
    from efficient_attn.sweep import report, runner, spec

    if args.status:
        from efficient_attn.sweep import status

        print(status.render(status.status(args.status)))
        return 0
    if args.list:
        for name, path in {**spec.available_presets(), **studies.available_presets()}.items():
            text = " ".join(str(spec.load_preset(str(path))[1].get("description", "")).split())
            print(f"{name:16s} {text}")
        return 0
    study = studies.find_preset(args.experiment)
    if study is not None:
        return studies.run_from_args(*study, args)
    registered = list(ea.methods())
    overrides = {
        a.name: getattr(args, a.flag) for a in spec.AXIS_TABLE if a.flag and a.kind != "options"
    }
    overrides["methods"] = args.methods and spec.check_methods(args.methods, registered)
    overrides["options"] = (
        spec.parse_option_flags(args.option, {m: ea.get_method(m).options for m in registered})
        if args.option
        else None
    )
    overrides.update(repeats=args.repeats, timeout_s=args.timeout)
    shard = spec.parse_shard(args.shard) if args.shard else None
    try:
        name, data = spec.load_preset(args.experiment)
    except spec.SpecError as e:
        raise spec.SpecError(f"{e}; studies: {', '.join(studies.available_presets())}") from None
    sweep = spec.build_sweep(name, data, overrides, registered)
    points = sweep.shard(*shard) if shard else sweep.points
    if args.dry_run:
        for p in points:
            print(p.key)
        print(f"{len(points)} of {len(sweep.points)} points", file=sys.stderr)
        return 0
    out = args.out or str(Path("runs") / name)
    try:
        outcome = runner.run_sweep(
            sweep,
            out,
            shard=shard,
            retry_errors=args.retry_errors,
            meta={"command": ["efficient-attn", *getattr(args, "argv", [])]},
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished rows are in {out}; run the same command to resume")
        return 130
    counts = ", ".join(f"{n} {s}" for s, n in outcome.statuses.most_common()) or "nothing new"
    print(f"ran {outcome.ran} points ({counts}), skipped {outcome.skipped} already done")
    if outcome.elsewhere:
        print(f"{outcome.elsewhere} still running in other processes (see --status {out}); "
              "the last to finish writes the report")  # fmt: skip
    elif shard and shard[1] > 1:
        print(f"shard done; when all shards finish: efficient-attn report {out}")
    elif not args.no_report:
        report.write_report([out])
        print(f"report: {Path(out) / 'report.md'}\n\n{report.headline([out])}")
    return 0


run_sweep.add_arguments = _sweep_args


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="results directories or results*.jsonl files")
    p.add_argument("--out", help="where to write the report (default: the first path)")
    p.add_argument(
        "--panels",
        action="store_true",
        help="sweeps: also draw each metric with a panel per method family "
        "(METRIC-families-*.png; dense and xla repeated in every panel)",
    )


@subcommand("report", help="markdown, LaTeX and plots of sweep results (merges several)")
def run_report(args: argparse.Namespace) -> int:
    from efficient_attn import studies
    from efficient_attn.sweep import report

    study = studies.experiment_of(args.paths)
    if study and args.panels:
        raise ValueError(
            f"--panels draws sweep results by method family; {', '.join(args.paths)} "
            f"hold the {study} study, whose figures have their own layout"
        )
    if study:
        written = studies.write_report(args.paths, args.out)
    else:
        written = report.write_report(args.paths, args.out, panels=args.panels)
    print(f"wrote {len(written)} files; {written[0]}")
    return 0


run_report.add_arguments = _report_args


@subcommand("train", help="train a small Flax model with any method on a synthetic task")
def run_train(args: argparse.Namespace) -> int:
    from efficient_attn import train  # flax/optax/orbax only load for training

    code = train.run(args)
    config = train.config_from_args(args)
    if code == 0 and config.task_obj().kind == "seq2seq":
        from efficient_attn.train import analysis  # matplotlib loads only here

        path = analysis.write_run_alignment(args.out or train.default_out(config))
        print(f"alignment: {path}")
    return code


@subcommand("quality", help="train every method across task difficulty; accuracy report")
def run_quality(args: argparse.Namespace) -> int:
    from efficient_attn.studies import quality

    return quality.run(args)


def _train_args(p: argparse.ArgumentParser) -> None:
    from efficient_attn import train

    train.add_arguments(p)


def _quality_args(p: argparse.ArgumentParser) -> None:
    from efficient_attn.studies import quality

    quality.add_arguments(p)


run_train.add_arguments = _train_args
run_quality.add_arguments = _quality_args


def _plot_attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `efficient-attn train`")
    p.add_argument("--example", type=int, default=0, help="held-out example (default 0)")
    p.add_argument("--layer", type=int, default=None, help="one layer (default: every layer)")
    p.add_argument("--head", type=int, default=None, help="one head (default: every head)")


@subcommand("plot-attention", help="heatmaps of a trained run's attention weights (any method)")
def run_plot_attention(args: argparse.Namespace) -> int:
    from efficient_attn.train import analysis

    written = analysis.plot_run(
        args.run_dir, example=args.example, layer=args.layer, head=args.head
    )
    print(f"wrote {len(written)} heatmaps (png + pdf) to {Path(args.run_dir) / 'attention'}")
    for path in written:
        print(f"  {path}")
    return 0


run_plot_attention.add_arguments = _plot_attention_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="efficient-attn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, run) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        getattr(run, "add_arguments", lambda p: None)(p)
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"efficient-attn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
