"""The `xvalid` command line. Every command maps errors to the exit codes in errors.py and
prints them as one line on stderr; results go to stdout."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .backends import DEFAULT_BACKENDS, REGISTRY, backend_names
from .config import PRESETS, ModelConfig
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, XValidError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="xvalid")
def cli():
    """Validate a C++/CUDA transformer forward pass against a PyTorch reference.

    \b
    Typical session:
      xvalid generate --hidden 64 --layers 2 -o m.json   # seeded model + inputs
      xvalid compare m.json                             # torch vs C++: verdict, timing
      xvalid compare m.json --engine './my_engine {model} {out}'
    Exit codes: 0 pass, 1 mismatch, 2 bad input or usage, 3 a candidate could not run
    (engine failed, C++ rebuild failed), 4 internal error.
    """


# ---------------------------------------------------------------------------------------------
# generate


@cli.command(context_settings=CONTEXT)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Named config; the size flags below override its fields.")
@click.option("--hidden", type=int, help="hidden_size H [tiny: 64]")
@click.option("--layers", type=int, help="num_hidden_layers [tiny: 2]")
@click.option("--heads", type=int, help="num_attention_heads [tiny: 8]")
@click.option("--kv-heads", "--kvh", "kv_heads", type=int, help="num_key_value_heads [tiny: 2]")
@click.option("--vocab", type=int, help="vocab_size [tiny: 128]")
@click.option("--intermediate", type=int, help="intermediate_size [MiniMind rule: 64*ceil(8H/3/64)]")
@click.option("--max-pos", type=int, help="max_position_embeddings, rows of the RoPE tables [tiny: 128]")
@click.option("--rope-theta", type=float, help="RoPE base [1e6]")
@click.option("--eps", type=float, help="rms_norm_eps [1e-5]")
@click.option("--seq-len", type=int, default=5, show_default=True, help="S, tokens per input row")
@click.option("--batch-size", type=int, default=2, show_default=True, help="B, input rows")
@click.option("--pad", type=int, default=None,
              help="Padded input rows (the last ones; left, right, left, ...) [1 if S > 1]")
@click.option("--pad-len", type=int, default=None,
              help="Padding positions in each padded row [random, 1 .. S-1 per row]")
@click.option("--seed", type=int, default=123, show_default=True)
@click.option("--init-std", type=float, default=0.02, show_default=True, help="Weight std")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("model.json"), show_default=True)
def generate(preset, hidden, layers, heads, kv_heads, vocab, intermediate, max_pos, rope_theta,
             eps, seq_len, batch_size, pad, pad_len, seed, init_std, output):
    """Write a seeded random-weight model and its inputs as one JSON file."""
    from .generate import generate_model, logit_statistics
    from .modelfile import write_model
    from .reference import Reference
    from .report import print_generate_summary

    start = time.perf_counter()
    overrides = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                 "num_key_value_heads": kv_heads, "vocab_size": vocab,
                 "intermediate_size": intermediate, "max_position_embeddings": max_pos,
                 "rope_theta": rope_theta, "rms_norm_eps": eps}
    base = PRESETS[preset].to_json()
    if hidden is not None and intermediate is None:
        base["intermediate_size"] = 0  # re-derive from the new hidden size
    base.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ModelConfig.from_json(base)
    mf = generate_model(cfg, batch_size=batch_size, seq_len=seq_len, seed=seed, pad=pad,
                        init_std=init_std, pad_len=pad_len)
    # Every flag spelled out: the file says how to make it again (compare's reproduce line).
    mf.meta["generator"]["command"] = (
        f"xvalid generate --hidden {cfg.hidden_size} --layers {cfg.num_hidden_layers} "
        f"--heads {cfg.num_attention_heads} --kv-heads {cfg.num_key_value_heads} "
        f"--vocab {cfg.vocab_size} --intermediate {cfg.intermediate_size} "
        f"--max-pos {cfg.max_position_embeddings} --rope-theta {float(cfg.rope_theta)!r} "
        f"--eps {float(cfg.rms_norm_eps)!r} --seq-len {seq_len} --batch-size {batch_size} "
        f"--pad {mf.meta['generator']['pad_rows']}"
        f"{f' --pad-len {pad_len}' if pad_len is not None else ''} --seed {seed} "
        f"--init-std {init_std!r}")
    # Record the reference's logit statistics, so a later PASS is known to mean something.
    logits = Reference(mf).forward(mf.input_ids, mf.attention_mask).numpy()
    mf.meta["reference"] = {"dtype": "float32", **logit_statistics(logits, mf.attention_mask)}
    write_model(mf, output)
    print_generate_summary(mf, output, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# run


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(backend_names()), default="torch", show_default=True,
              help="; ".join(f"{s.name}: {s.summary}" for s in REGISTRY.values()))
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Reference precision (torch backend only).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("logits.npy"), show_default=True, help="Logits (B,S,V) as .npy")
@click.option("--intermediates", type=click.Path(file_okay=False, path_type=Path),
              help="Also write every named intermediate as DIR/NAME.npy")
@click.option("--threads", type=click.IntRange(min=1), help="Thread count [torch's default]")
def run(model, backend, dtype, output, intermediates, threads):
    """Run MODEL's inputs through one backend and write the logits."""
    from .backends import TorchBackend, create_backend
    from .files import save_arrays, save_npy
    from .modelfile import read_model

    if backend != "torch" and dtype != "float32":
        raise click.UsageError("--dtype float64 is for the torch backend only")
    mf = read_model(model)
    runner = TorchBackend(mf, dtype) if backend == "torch" else create_backend(backend, model, mf)
    if threads:
        runner.set_threads(threads)
    start = time.perf_counter()
    logits, captured = runner.forward(mf.input_ids, mf.attention_mask,
                                      capture=intermediates is not None)
    elapsed = time.perf_counter() - start
    save_npy(output, logits)
    if intermediates is not None:
        save_arrays(intermediates, captured)
    extra = f", {len(captured)} intermediates in {intermediates}" if captured else ""
    click.echo(f"{runner.name}: logits {list(logits.shape)} {logits.dtype} -> {output}{extra} "
               f"(forward {elapsed * 1e3:.1f} ms)")


# ---------------------------------------------------------------------------------------------
# inspect


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--tensors/--no-tensors", default=True, show_default=True,
              help="List every tensor (shape, dtype, bytes, preview, checksum).")
def inspect(model, tensors):
    """Validate MODEL and print its config, tensors and inputs."""
    from .modelfile import read_model
    from .report import print_inspect

    mf = read_model(model)
    print_inspect(mf, model, show_tensors=tensors)


# ---------------------------------------------------------------------------------------------
# compare


PLOT_FORMATS = (".png", ".svg", ".pdf")


def _plot_path(ctx, param, value: Path | None) -> Path | None:
    if value is not None and value.suffix.lower() not in PLOT_FORMATS:
        raise click.BadParameter(f"{value.name}: the file name must end in "
                                 f"{', '.join(PLOT_FORMATS)}")
    return value


def _backend_list(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise click.BadParameter(f"unknown backend {unknown[0]!r} "
                                 f"(choose from {', '.join(backend_names())})")
    return names


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backends", default=",".join(DEFAULT_BACKENDS), show_default=True,
              callback=_backend_list,
              help=f"Built-in candidates, comma separated, from: {', '.join(backend_names())} "
                   f"('' for engines only).")
@click.option("--engine", "engines", multiple=True, metavar="'[NAME=]CMD {model} {out}'",
              help="External engine command (repeatable), optionally named; placeholders "
                   "{decode} {prefill} {threads} {repeat} {warmup}; see docs/engines.md.")
@click.option("--engine-output", metavar="FILE", help="The engine's logits file name in {out}.")
@click.option("--engine-timeout", type=click.FloatRange(min=0, min_open=True), default=300,
              show_default=True, help="Seconds before an engine is killed.")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance [derived from the "
              "reference's float32-vs-float64 noise]")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance [0]")
@click.option("--decode", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also prefill S-N tokens, decode N one at a time, compare each step.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for every backend [torch's default]")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--intermediates/--no-intermediates", default=True, show_default=True,
              help="Capture intermediates to find the first divergence.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), callback=_plot_path,
              help="Write the error-per-layer plot (.png, .svg or .pdf).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write the report as JSON (schema: xvalid-compare-report v2); '-' for stdout, "
                   "with the tables on stderr.")
@click.option("--save-logits", type=click.Path(file_okay=False, path_type=Path),
              help="Write every candidate's logits as DIR/NAME.npy (and reference, reference-float64).")
@click.option("-q", "--quiet", is_flag=True,
              help="Print one line per failing candidate (with the reason), then the verdict.")
@click.pass_context
def compare(ctx, model, backends, engines, engine_output, engine_timeout, atol, rtol, decode,
            threads, warmup, repeat, intermediates, plot, json_path, save_logits, quiet):
    """Compare MODEL's candidates with the PyTorch reference; exit 0 pass, 1 mismatch."""
    if any(REGISTRY[name].uses_core for name in backends):
        from .backends import start_loading_core
        start_loading_core()  # a pending C++ rebuild overlaps the import of torch
    from .compare import CompareOptions, run_compare
    from .files import atomic_write, save_arrays
    from .progress import stderr_console
    from .report import console, print_compare, quiet_lines, report_json

    if not backends and not engines:
        raise click.UsageError("nothing to compare: give --backends and/or --engine")
    opts = CompareOptions(backends=backends, engines=engines, engine_output=engine_output,
                          engine_timeout=engine_timeout, atol=atol, rtol=rtol, decode=decode,
                          threads=threads, warmup=warmup, repeat=repeat,
                          intermediates=intermediates, argv=_compare_argv(ctx))
    with stderr_console.status("comparing", spinner="dots") as status:
        result = run_compare(model, opts, progress=lambda text: status.update(text))
    report = result.report
    if save_logits is not None:  # candidate names are file-name safe ([A-Za-z0-9_.-])
        save_arrays(save_logits, result.arrays)
    json_to_stdout = json_path == Path("-")
    if json_path is not None:
        text = report_json(report)
        if json_to_stdout:
            click.echo(text, nl=False)
        else:
            atomic_write(json_path, lambda fp: fp.write(text))
    if plot is not None:
        from .plot import plot_divergence
        plot_divergence(report, plot)
    if quiet:
        for line in quiet_lines(report, model):
            click.echo(line, err=json_to_stdout)
    else:
        print_compare(report, stderr_console if json_to_stdout else console)
    return report["exit_code"]


def _compare_argv(ctx: click.Context) -> list[str]:
    """The flags that change the verdict, for the reproduce line."""
    p = ctx.params
    argv = []
    if p["backends"] != DEFAULT_BACKENDS:
        argv += ["--backends", ",".join(p["backends"])]
    for engine in p["engines"]:
        argv += ["--engine", engine]
    for flag in ("engine_output", "atol", "rtol", "threads"):
        if p[flag] is not None:
            argv += [f"--{flag.replace('_', '-')}", str(p[flag])]
    if p["decode"]:
        argv += ["--decode", str(p["decode"])]
    return argv


# ---------------------------------------------------------------------------------------------
# entry point


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Console entry: exit codes per errors.py; no traceback unless XVALID_DEBUG=1."""
    command = "xvalid"
    try:
        code = cli.main(args=argv, prog_name="xvalid", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if exc.ctx is not None:
            command = exc.ctx.command_path
        click.echo(f"{command}: error: {_one_line(exc.format_message())} "
                   f"(see '{command} --help')", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except XValidError as exc:
        click.echo(f"{command}: error: {_one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo(f"{command}: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError:
        click.echo(f"{command}: error: out of memory (is the model or input absurdly large?)", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # a bug in xvalid: one line, the traceback on request
        if os.environ.get("XVALID_DEBUG"):
            raise
        click.echo(f"{command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
                   f"(rerun with XVALID_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(EXIT_INTERNAL)

