"""The `xvalid` command line. Every command maps errors to the exit codes in errors.py and
prints them as one line on stderr; results go to stdout."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import click

from . import __version__
from .backends import DEFAULT_BACKENDS, REGISTRY, backend_names
from .config import PRESETS, ModelConfig
from .errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, XValidError
from .formatspec import WEIGHT_DTYPES
from .metrics import COMPUTE_DTYPES

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
      xvalid bench --grid quick --out bench/            # speed grid, validated first
    Exit codes: 0 pass, 1 mismatch, 2 bad input or usage, 3 a candidate could not run
    (engine failed, C++ rebuild failed), 4 internal error.
    """


# ---------------------------------------------------------------------------------------------
# generate


# The model-size flags of generate and bench: each overrides one field of the preset.
SIZE_FLAGS = {"hidden": "hidden_size", "layers": "num_hidden_layers",
              "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
              "vocab": "vocab_size", "intermediate": "intermediate_size",
              "max_pos": "max_position_embeddings", "rope_theta": "rope_theta",
              "eps": "rms_norm_eps"}


def size_options(fn):
    options = [
        click.option("--hidden", type=int, help="hidden_size H [tiny: 64]"),
        click.option("--layers", type=int, help="num_hidden_layers [tiny: 2]"),
        click.option("--heads", type=int, help="num_attention_heads [tiny: 8]"),
        click.option("--kv-heads", "--kvh", "kv_heads", type=int,
                     help="num_key_value_heads [tiny: 2]"),
        click.option("--vocab", type=int, help="vocab_size [tiny: 128]"),
        click.option("--intermediate", type=int,
                     help="intermediate_size [MiniMind rule: 64*ceil(8H/3/64)]"),
        click.option("--max-pos", type=int,
                     help="max_position_embeddings, rows of the RoPE tables [tiny: 128]"),
        click.option("--rope-theta", type=float, help="RoPE base [1e6]"),
        click.option("--eps", type=float, help="rms_norm_eps [1e-5]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def input_options(fn):
    """The flags that draw a file's inputs (generate, import): generate.check_input_options
    checks them, generate.draw_inputs draws them."""
    options = [
        click.option("--seq-len", type=int, default=5, show_default=True,
                     help="S, tokens per input row"),
        click.option("--batch-size", type=int, default=2, show_default=True, help="B, input rows"),
        click.option("--pad", type=int, default=None,
                     help="Padded input rows (the last ones; left, right, left, ...) [1 if S > 1]"),
        click.option("--pad-len", type=int, default=None,
                     help="Padding positions in each padded row [random, 1 .. S-1 per row]"),
        click.option("--seed", type=int, default=123, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def config_from_flags(preset: str, sizes: dict) -> ModelConfig:
    """The preset's config with the size flags that were given (SIZE_FLAGS) applied."""
    base = PRESETS[preset].to_json()
    if sizes.get("hidden") is not None and sizes.get("intermediate") is None:
        base["intermediate_size"] = 0  # re-derive from the new hidden size
    base.update({SIZE_FLAGS[k]: v for k, v in sizes.items() if v is not None})
    return ModelConfig.from_json(base)


class QuantBlock(click.ParamType):
    """--quant-block: a positive block length, or 'row' (one scale per output row)."""

    name = "N|row"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip() == "row":
            return "row"
        try:
            block = int(value)
        except ValueError:
            block = 0
        if block < 1:
            self.fail(f"{value!r} is not a positive whole number or 'row'", param, ctx)
        return block


def weight_dtype_options(fn):
    from .formatspec import INT8, WEIGHT_DTYPES
    options = [
        click.option("--weight-dtype", type=click.Choice(WEIGHT_DTYPES), default=None,
                     help="Store the weights as float32, float16, bfloat16 or int8 (docs/model-"
                          "format.md); the file also records the float32 model's logits, from "
                          "which compare reports the quantisation cost [float32]"),
        click.option("--quant-block", type=QuantBlock(), default=None,
                     help=f"int8: values per scale along a row, or 'row' for one scale per output "
                          f"row [{INT8['default_block_size']}: llama.cpp's Q8_0]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def block_size(weight_dtype: str | None, quant_block: int | str | None) -> int | None:
    """The int8 block size --quant-block asks for (None: one scale per row); the flag is an
    error with any other --weight-dtype, rather than ignored."""
    from .dtypes import DEFAULT_BLOCK_SIZE
    if quant_block is not None and weight_dtype != "int8":
        raise click.UsageError("--quant-block applies to --weight-dtype int8 only")
    return None if quant_block == "row" else quant_block or DEFAULT_BLOCK_SIZE


@cli.command(context_settings=CONTEXT)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Named config; the size flags below override its fields.")
@size_options
@input_options
@click.option("--init-std", type=float, default=0.02, show_default=True, help="Weight std")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("model.json"), show_default=True)
@click.option("--format", "container", type=click.Choice(["json", "safetensors"]), default="json",
              show_default=True, help="The file's container (docs/model-format.md).")
@weight_dtype_options
def generate(preset, seq_len, batch_size, pad, pad_len, seed, init_std, output, container,
             weight_dtype, quant_block, **sizes):
    """Write a seeded random-weight model and its inputs as one JSON file."""
    from .generate import finish_model, generate_model
    from .modelfile import write_model
    from .report import print_generate_summary

    start = time.perf_counter()
    block = block_size(weight_dtype, quant_block)
    cfg = config_from_flags(preset, sizes)
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
    mf = finish_model(mf, weight_dtype, block)
    write_model(mf, output, container=container)
    print_generate_summary(mf, output, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# import, export: Hugging Face transformers checkpoints (hf.py, docs/huggingface.md)


DRAW_FLAGS = ("seq_len", "batch_size", "pad", "pad_len")


@cli.command("import", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The model file to write.")
@click.option("--format", "container", type=click.Choice(["json", "safetensors"]), default="json",
              show_default=True, help="The file's container (docs/model-format.md).")
@click.option("--ids", "id_rows", multiple=True, metavar="ID,ID,...",
              help="One input row of token ids (repeatable); shorter rows are padded on the left.")
@click.option("--ids-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Input rows of token ids: one row per line, or a JSON list of lists.")
@input_options
@weight_dtype_options
@click.pass_context
def import_checkpoint(ctx, checkpoint, output, container, id_rows, ids_file, seq_len, batch_size,
                      pad, pad_len, seed, weight_dtype, quant_block):
    """Read a transformers checkpoint directory (LlamaForCausalLM or MiniMind2's dense model:
    config.json and model.safetensors or shards) into a model file, with inputs given by
    --ids / --ids-file or drawn from --seed. Weights keep the checkpoint's dtype when all are
    float16 or all bfloat16 (else float32); --weight-dtype converts them (int8 quantises)."""
    from .generate import check_input_options, draw_inputs
    from .hf import checkpoint_model, given_inputs, parse_ids_text, read_checkpoint
    from .memory import check_forward_memory
    from .modelfile import write_model
    from .report import print_generate_summary

    start = time.perf_counter()
    given = [flag for flag in DRAW_FLAGS
             if ctx.get_parameter_source(flag) != click.core.ParameterSource.DEFAULT]
    if id_rows and ids_file:
        raise click.UsageError("give --ids or --ids-file, not both")
    if (id_rows or ids_file) and given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} draws random inputs; "
                               f"--ids / --ids-file give them")
    rows = None
    if ids_file is not None:
        try:
            text = ids_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"{ids_file}: cannot read ({getattr(exc, 'strerror', None) or exc})",
                                     param_hint="--ids-file")
        rows = parse_ids_text(text, str(ids_file))
    elif id_rows:
        rows = [row for text in id_rows for row in parse_ids_text(text, "--ids")]
    ck = read_checkpoint(checkpoint)
    cfg = ck.config
    if rows is not None:
        ids, mask, padding = given_inputs(rows, cfg, seed)
        inputs = {"given": str(ids_file) if ids_file else "--ids", "padding": padding}
    else:
        if seq_len > cfg.max_position_embeddings:
            raise click.BadParameter(f"{seq_len} exceeds the checkpoint's "
                                     f"max_position_embeddings {cfg.max_position_embeddings}",
                                     param_hint="--seq-len")
        pad = check_input_options(cfg, batch_size, seq_len, pad, pad_len, seed)
        ids, mask, padding = draw_inputs(cfg, batch_size, seq_len, seed, pad, pad_len)
        inputs = {"drawn": True, "pad_rows": pad, "padding": padding}
    mf = checkpoint_model(ck, ids, mask, {"seed": seed, "inputs": inputs})
    check_forward_memory(cfg, *ids.shape, intermediates=False)  # before the reference runs
    block = block_size(weight_dtype, quant_block)
    from .generate import finish_model
    from .hf import keep_checkpoint_dtype
    mf = keep_checkpoint_dtype(mf, ck)  # exact: the upcast values are the stored ones
    mf = finish_model(mf, weight_dtype, block)
    write_model(mf, output, container=container)
    print_generate_summary(mf, output, time.perf_counter() - start)


@cli.command("export", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it is not empty.")
def export_checkpoint(model, directory, force):
    """Write MODEL's weights as a transformers checkpoint DIRECTORY (config.json and
    model.safetensors) that LlamaForCausalLM.from_pretrained loads."""
    from .hf import export_checkpoint as export, is_tied
    from .modelfile import read_model

    mf = read_model(model)
    weights = export(mf, directory, force=force)
    c = mf.config
    click.echo(f"{model} -> {directory} (LlamaForCausalLM, H={c.hidden_size} "
               f"L={c.num_hidden_layers} heads={c.num_attention_heads}/{c.num_key_value_heads} "
               f"V={c.vocab_size}, {'tied' if is_tied(mf) else 'untied'} head, float32, "
               f"{weights.stat().st_size / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------
# convert


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "container", type=click.Choice(["json", "safetensors"]),
              help="The output's container [the other one than MODEL's; with --weight-dtype, "
                   "MODEL's]")
@weight_dtype_options
def convert(model, output, container, weight_dtype, quant_block):
    """Write MODEL (either container) as OUTPUT in the other container; tensors are copied
    byte for byte, config and meta unchanged. With --weight-dtype the weights are converted
    (quantised) too, and OUTPUT records the logits of MODEL's model as its source."""
    from .modelfile import container_of, read_model, write_model

    block = block_size(weight_dtype, quant_block)
    source = container_of(model)
    mf = read_model(model)
    before = mf.weight_dtype
    if weight_dtype is not None:
        from .generate import convert_weights
        mf = convert_weights(mf, weight_dtype, block)
        container = container or source
    container = container or ("json" if source == "safetensors" else "safetensors")
    write_model(mf, output, container=container)
    dtypes = f", weights {before} -> {mf.weight_dtype}" if weight_dtype is not None else ""
    click.echo(f"{model} ({source}) -> {output} ({container}{dtypes})")


# ---------------------------------------------------------------------------------------------
# run


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(backend_names()), default="torch", show_default=True,
              help="; ".join(f"{s.name}: {s.summary}" for s in REGISTRY.values()))
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]),
              default="float32", show_default=True,
              help="Compute dtype (float64: torch only; bfloat16/float16: the backends that "
                   "compute in them, torch and hf; half-precision logits are written as float32).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("logits.npy"), show_default=True, help="Logits (B,S,V) as .npy")
@click.option("--intermediates", type=click.Path(file_okay=False, path_type=Path),
              help="Also write every named intermediate as DIR/NAME.npy")
@click.option("--threads", type=click.IntRange(min=1), help="Thread count [torch's default]")
def run(model, backend, dtype, output, intermediates, threads):
    """Run MODEL's inputs through one backend and write the logits."""
    from .backends import TorchBackend, create_backend
    from .files import save_arrays, save_npy
    from .memory import check_forward_memory
    from .modelfile import read_model

    spec = REGISTRY[backend]
    if dtype != "float32" and not (dtype in spec.compute_dtypes or (dtype, backend) == ("float64", "torch")):
        raise click.UsageError(f"--dtype {dtype}: the {backend} backend computes in "
                               f"{', '.join(spec.compute_dtypes)}")
    spec.check_available()
    mf = read_model(model)
    if intermediates is not None:  # read_model checked the memory of a forward without them
        check_forward_memory(mf.config, mf.batch_size, mf.seq_len, True, where=f"{model}: ")
    runner = (TorchBackend(mf, dtype) if backend == "torch" else
              create_backend(backend, model, mf) if dtype == "float32" else spec.create(model, mf, dtype))
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
    for name in names:
        REGISTRY[name].check_available()
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
@click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default="float32", show_default=True,
              help="What the candidates compute in (engines get it as {dtype}): the budget is "
                   "derived from PyTorch's own error in it (docs/engines.md).")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance [derived from "
              "PyTorch's own error in --dtype against float64]")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance [0]")
@click.option("--decode", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also prefill S-N tokens, decode N one at a time, compare each step.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for every backend [torch's default]")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--intermediates/--no-intermediates", default=True, show_default=True,
              help="Capture intermediates to find the first divergence.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Take the reference from the reference cache when it holds it (no torch "
                   "import), and store it there; --no-cache: compute it, write nothing "
                   "(docs/cache.md).")
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
def compare(ctx, model, backends, engines, engine_output, engine_timeout, dtype, atol, rtol,
            decode, threads, warmup, repeat, intermediates, cache, plot, json_path, save_logits,
            quiet):
    """Compare MODEL's candidates with the PyTorch reference; exit 0 pass, 1 mismatch."""
    if any(REGISTRY[name].uses_core for name in backends):
        from .backends import start_loading_core
        start_loading_core()  # a pending C++ rebuild overlaps the import of torch
    from .compare import CompareOptions, run_compare
    from .files import atomic_write, save_arrays
    from .progress import stderr_console
    from .report import cache_warning, console, print_compare, quiet_lines, report_json

    if not backends and not engines:
        raise click.UsageError("nothing to compare: give --backends and/or --engine")
    opts = CompareOptions(dtype=dtype, backends=backends, engines=engines, engine_output=engine_output,
                          engine_timeout=engine_timeout, atol=atol, rtol=rtol, decode=decode,
                          threads=threads, warmup=warmup, repeat=repeat,
                          intermediates=intermediates, cache=cache, argv=_compare_argv(ctx))
    with stderr_console.status("comparing", spinner="dots") as status:
        result = run_compare(model, opts, progress=lambda text: status.update(text))
    report = result.report
    warning = cache_warning(report["reference_cache"])
    if warning:
        click.echo(f"xvalid compare: {warning}", err=True)
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
    if p["dtype"] != "float32":
        argv += ["--dtype", p["dtype"]]
    if p["decode"]:
        argv += ["--decode", str(p["decode"])]
    return argv


# ---------------------------------------------------------------------------------------------
# cache


@cli.group(context_settings=CONTEXT)
def cache():
    """The reference cache: compare's reference outputs kept between runs (docs/cache.md)."""


@cache.command("info", context_settings=CONTEXT)
def cache_info():
    """Where the cache is, its entries, their total size and the cap."""
    from .refcache import CAP_VARIABLE, MIB, ReferenceCache, cap_bytes

    cap, source = cap_bytes()
    store = ReferenceCache(cap=cap)
    entries = store.list_entries()
    total = sum(e.bytes for e in entries)
    click.echo(f"directory  {store.root}")
    click.echo(f"entries    {len(entries)}")
    click.echo(f"size       {total / MIB:.1f} MiB ({total} bytes)")
    click.echo(f"cap        {cap / MIB:.0f} MiB ("
               f"{'default' if source == 'default' else CAP_VARIABLE}); the least recently used "
               f"entries go first")


@cache.command("clear", context_settings=CONTEXT)
def cache_clear():
    """Remove every entry (nothing else in the directory)."""
    from .refcache import MIB, ReferenceCache

    store = ReferenceCache(cap=0)
    removed, freed = store.clear()
    click.echo(f"removed {removed} {'entry' if removed == 1 else 'entries'} "
               f"({freed / MIB:.1f} MiB) from {store.root}")


# ---------------------------------------------------------------------------------------------
# bench


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--preset", "presets", metavar="NAME[,NAME]",
              help=f"Model presets to generate (no file needed), from: {', '.join(PRESETS)} "
                   f"[minimind2-small]; the size flags below override their fields.")
@size_options
@click.option("--seed", type=int, default=123, show_default=True,
              help="Generated weights and every cell's input tokens.")
@click.option("--grid", default="default", show_default=True,
              type=click.Choice(["quick", "default", "large"]),
              help="Grid preset: quick (about a minute), default, large; --batch, --seq and --gen "
                   "replace its axes.")
@click.option("--batch", metavar="LIST", help="Batch sizes: 1,2,4 or a range 1-8*2.")
@click.option("--seq", metavar="LIST", help="Prompt lengths: 32,128,512 or 32-512*2 or 16-64+16.")
@click.option("--gen", metavar="LIST", help="Decode steps after the prompt (0: prefill only).")
@click.option("--threads", metavar="LIST", help="Thread counts [torch's default].")
@click.option("--weight-dtype", "weight_dtypes", metavar="LIST", default="float32", show_default=True,
              help=f"How the weights are stored, comma separated, from: {', '.join(WEIGHT_DTYPES)} "
                   f"(int8: Q8 blocks of 32); the model is converted for each.")
@click.option("--dtype", "dtypes", metavar="LIST", default="float32", show_default=True,
              help=f"Compute dtypes, comma separated, from: {', '.join(COMPUTE_DTYPES)}; a backend "
                   f"that computes in float32 only gets a 'not supported' row at the others.")
@click.option("--backends", default=",".join(DEFAULT_BACKENDS), show_default=True,
              callback=_backend_list,
              help=f"Built-in backends, comma separated, from: {', '.join(backend_names())}.")
@click.option("--engine", "engines", multiple=True, metavar="'[NAME=]CMD {model} {out}'",
              help="External engine (repeatable), timed through its timing.json (docs/engines.md).")
@click.option("--engine-output", metavar="FILE", help="The engine's logits file name in {out}.")
@click.option("--engine-timeout", type=click.FloatRange(min=0, min_open=True), default=300,
              show_default=True, help="Seconds before an engine run is killed.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed runs per backend and cell after the validation run.")
@click.option("--repeat", type=click.IntRange(min=1),
              help="Timed runs per backend and cell, at least [grid: quick 3, else 5].")
@click.option("--min-time", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Seconds of timed runs per backend and cell, at least [quick 0.2, default 1, "
                   "large 2].")
@click.option("--profile", is_flag=True,
              help="Benchmark one cell (the first value of each axis) and print its per-op time "
                   "table, torch and C++ side by side.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write bench.json, bench.csv, bench.md and the PNG plots into DIR.")
@click.option("--compare", "compare_files", nargs=2, metavar="OLD.json NEW.json",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Compare two bench.json files and run nothing: exit 1 when a row got slower "
                   "beyond --threshold and its spread.")
@click.option("--threshold", type=click.FloatRange(min=0), default=5.0, show_default=True,
              metavar="PCT", help="With --compare: the slowdown in percent that fails.")
@click.pass_context
def bench(ctx, model, presets, seed, grid, batch, seq, gen, threads, weight_dtypes, dtypes,
          backends, engines, engine_output, engine_timeout, warmup, repeat, min_time, profile,
          out, compare_files, threshold, **sizes):
    """Prefill and decode speed over a batch x prompt-length grid, every backend validated
    against the reference before it is timed. Exit 0 all valid, 1 a backend INVALID (or with
    --compare: a regression), 3 an engine failed, 130 interrupted (what was measured is kept)."""
    from .report import console

    if compare_files:
        if model is not None or out is not None or profile:
            raise click.UsageError("--compare OLD.json NEW.json compares two files and runs "
                                   "nothing: drop MODEL, --out and --profile")
        from .bench.gate import compare_runs, load_bench, print_gate
        gate = compare_runs(*(load_bench(path) for path in compare_files), threshold)
        print_gate(gate, *compare_files, console)
        return gate.exit_code
    if any(REGISTRY[name].uses_core for name in backends):
        from .backends import start_loading_core
        start_loading_core()  # a pending C++ rebuild overlaps the import of torch
    import torch

    from .bench.grid import GRID_PRESETS, parse_axis, parse_names
    from .bench.live import LiveView
    from .bench.output import print_bench, write_outputs
    from .bench.run import BenchOptions, ModelSpec, run_bench

    if not backends and not engines:
        raise click.UsageError("nothing to benchmark: give --backends and/or --engine")
    preset = GRID_PRESETS[grid]
    opts = BenchOptions(
        models=_bench_models(model, presets, sizes, ModelSpec),
        batch=parse_axis(batch, "--batch") if batch else list(preset.batch),
        seq=parse_axis(seq, "--seq") if seq else list(preset.seq),
        gen=parse_axis(gen, "--gen", minimum=0) if gen else list(preset.gen),
        threads=parse_axis(threads, "--threads") if threads else [torch.get_num_threads()],
        weight_dtypes=parse_names(weight_dtypes, "--weight-dtype", WEIGHT_DTYPES),
        dtypes=parse_names(dtypes, "--dtype", COMPUTE_DTYPES),
        backends=backends, engines=engines, engine_output=engine_output,
        engine_timeout=engine_timeout, warmup=warmup,
        repeat=repeat if repeat is not None else preset.repeat,
        min_time=min_time if min_time is not None else preset.min_time, seed=seed,
        profile=profile, grid=grid, command=shlex.join(["xvalid", *(ctx.obj or {}).get("argv", [])]))
    result = run_bench(opts, LiveView())
    written = write_outputs(result, out) if out is not None else []
    print_bench(result, console)
    if written:
        console.print(f"wrote {', '.join(path.name for path in written)} in {out}", markup=False)
    if result.partial:
        kept = f"; what was measured is in {out}" if out is not None else ""
        click.echo(f"xvalid bench: interrupted during {result.interrupted_at}{kept} "
                   f"(marked partial)", err=True)
    return result.exit_code


def _bench_models(model: Path | None, presets: str | None, sizes: dict, ModelSpec) -> list:
    """The models of a bench run: the MODEL file, or each --preset (minimind2-small when
    neither is given) with the size flags applied."""
    given = {k: v for k, v in sizes.items() if v is not None}
    if model is not None:
        if presets or given:
            raise click.UsageError("give a MODEL file or --preset / size flags, not both")
        if not model.is_file():
            raise click.BadParameter(f"{model}: no such file", param_hint="MODEL")
        return [ModelSpec(model.name, path=model)]
    names = [n.strip() for n in (presets or "minimind2-small").split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise click.BadParameter(f"unknown preset {unknown[0] if unknown else presets!r} "
                                 f"(choose from {', '.join(PRESETS)})", param_hint="--preset")
    suffix = "".join(f"-{flag.replace('_', '')}{value:g}" for flag, value in given.items())
    return [ModelSpec(name + suffix, config=config_from_flags(name, sizes))
            for name in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------
# entry point


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Console entry: exit codes per errors.py; no traceback unless XVALID_DEBUG=1."""
    command = "xvalid"
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        code = cli.main(args=argv, prog_name="xvalid", standalone_mode=False,
                        obj={"argv": argv})
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

