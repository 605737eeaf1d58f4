"""The `streamprune` command: parses arguments and calls the Python API (api.py) or the planning and
output functions; prints what they return."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .config import ALLOCATIONS, COMPENSATIONS, GGUF_TYPES, RunConfig
from .errors import StreamPruneError, error_message, one_line
from .signals import finish, handle_signals, received, report_interrupt

EXIT_ERROR = 2


def fail(message: str) -> None:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(EXIT_ERROR)


def usage_message(e: click.ClickException) -> str:
    """click's message ("Invalid value for '--seed': ...") in the style of the others, plus where help is."""
    text = e.format_message().rstrip(".")
    text = text[:1].lower() + text[1:]
    ctx = getattr(e, "ctx", None)
    return f"{text} (see {ctx.command_path} --help)" if ctx is not None else text


NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class Group(click.Group):
    """Turns known failures into one line on stderr and a non-zero exit (traceback with --debug):
    refusals (StreamPruneError), usage errors (bad, missing or unknown options), out of memory,
    OS errors. --help and --version work as usual."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS_HELP as e:  # a bare `streamprune`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:  # usage errors while parsing the top level or a command
            fail(usage_message(e))
        except click.Abort as e:  # click's name for a KeyboardInterrupt outside a command
            if isinstance(e.__context__, KeyboardInterrupt):  # click already started a new line
                sys.exit(report_interrupt(e.__context__, newline=False))
            fail("aborted")
        sys.exit(rv if isinstance(rv, int) else 0)  # an int is click's exit code (--help, --version)

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or "--debug" in sys.argv
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            sys.exit(report_interrupt(e))
        except Exception as e:
            if received:  # a library swallowed the signal's KeyboardInterrupt and failed after it
                sys.exit(report_interrupt())
            if debug or not isinstance(e, (StreamPruneError, MemoryError, OSError)):
                raise
            fail(error_message(e))


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="streamprune")
def main(debug: bool):
    """Structured pruning of Llama-family LLMs, one decoder block in memory at a time."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    show_messages(logging.DEBUG if debug else logging.WARNING)


class Terminal(logging.Handler):
    """streamprune's messages on stderr ("warning: ..."), printed above a progress bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        tqdm.write(prefix + one_line(record.getMessage()), file=sys.stderr)


def show_messages(level: int) -> None:
    """Print streamprune's log records from `level` up on the terminal (the run's log file, when a
    run writes one, gets them all)."""
    from .store.runlog import FileOnly
    logger = logging.getLogger("streamprune")
    for h in [h for h in logger.handlers if isinstance(h, Terminal)]:
        logger.removeHandler(h)
    terminal = Terminal(level)
    terminal.addFilter(FileOnly())
    logger.addHandler(terminal)
    logger.propagate = False  # (the root handler would print them a second time)
    logger.setLevel(min(level, logging.INFO))


class PathArg(click.Path):
    """A path option; an empty value (an unset shell variable: --out "$OUT") is refused, not read as '.'."""

    def __init__(self, **kwargs):
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (not value.strip() or "\0" in value):
            self.fail(f"{value!r} is not a usable path", param, ctx)
        return super().convert(value, param, ctx)


class Size(click.ParamType):
    """--max-memory: '24GiB', '512MB', '1.5g' -> bytes."""
    name = "size"

    def convert(self, value, param, ctx):
        from .planning.plan import parse_bytes
        try:
            return value if isinstance(value, int) else parse_bytes(value)
        except StreamPruneError as e:
            self.fail(str(e), param, ctx)


class Device(click.ParamType):
    """--device: refused while parsing, with the run's own message, unless it names a device here."""
    name = "device"

    def convert(self, value, param, ctx):
        check_device(value)
        return value


class PlanDevice(click.ParamType):
    """plan's --device: cpu, cuda or cuda:N, present here or described (--max-memory, --gpu)."""
    name = "device"

    def convert(self, value, param, ctx):
        import torch

        from .arch.model import parse_device
        if parse_device(value).type == "cuda" and torch.cuda.is_available():
            check_device(value)
        return value


def check_device(device: str) -> None:
    """arch.model.check_device, plus the GPU number: cuda:N must exist."""
    import torch

    from .arch.model import check_device as check_device_type
    dev = check_device_type(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise StreamPruneError(f"--device {device}: this machine has {n} CUDA GPU{'s' if n > 1 else ''} "
                               f"(cuda:0 to cuda:{n - 1})")


def warn_beyond_physical(max_memory: int | None, device: str) -> None:
    """A --max-memory above what the machine has is allowed (the plan still has to fit), but said."""
    from .planning.advice import memory_warning
    warning = memory_warning(max_memory, device)
    if warning:
        click.echo(f"warning: {warning}", err=True)


def defaulted(*names: str) -> tuple[str, ...]:
    """Which of the current command's options were left at their defaults (run adapts those)."""
    ctx = click.get_current_context()
    return tuple(n for n in names if ctx.get_parameter_source(n) is click.core.ParameterSource.DEFAULT)


def compensation_options(command):
    """--compensate lsq|mean|none and its shorthand --no-compensate (run and plan share them)."""
    command = click.option("--no-compensate", "compensate", flag_value="none",
                           help="Same as --compensate none.")(command)
    return click.option(
        "--compensate", type=click.Choice(COMPENSATIONS), default=RunConfig.compensate, show_default=True,
        help="After slicing: lsq refits o_proj and down_proj by least squares; mean adds the removed units' "
             "mean output to their biases (FLAP; Llama, and Qwen3 attention); none.")(command)


def model_options(name: str, what: str):
    """--shards / --model (a folder, or a Hub id) and --revision."""
    def decorate(command):
        command = click.option("--revision", help="Hub revision (branch, tag or commit) of a Hub id.")(command)
        return click.option(name, required=True, type=PathArg(),
                            help=f"{what}: a folder, or a Hugging Face Hub id (org/name: downloaded into the "
                                 "Hub cache, safetensors only; a local path wins).")(command)
    return decorate


def echo_err(text: str) -> None:
    click.echo(text, err=True)


def planning_model(arg: Path, revision: str | None):
    """inspect and plan: a folder (a local path, or a Hub id in the cache), or the model.Model of
    a Hub id read from the Hub's safetensors headers, without downloading its weights."""
    from .arch.hub import model_for_planning
    model = model_for_planning(arg, revision)
    if not isinstance(model, Path):
        echo_err(f"{arg}: read from the Hugging Face Hub's safetensors headers (weights not downloaded)")
    elif model != Path(arg):
        echo_err(f"{arg}: Hugging Face Hub snapshot {model}")
    return model


TEXT_FIELD_HELP = "The text field of JSON lines / Parquet rows or a dataset's column."


def preview_sparsities(sparsity: float, text: str) -> list[float]:
    """--sparsity, then the --preview list (comma-separated), each once, in order."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StreamPruneError(f"--preview must be sparsities separated by commas (e.g. 0.2,0.4), "
                               f"got {text!r}") from None
    return sorted({sparsity, *values})


def multiple_of_option(command):
    """--multiple-of N and --row-multiple M (run, plan and inspect share them)."""
    command = click.option(
        "--row-multiple", default=RunConfig.row_multiple, show_default=True,
        help="Keep neuron counts and query heads x head_dim multiples of M in every block, so a quantized "
             "GGUF type splits every row (32: q8_0, q5_0, q4_0).")(command)
    return click.option(
        "--multiple-of", default=RunConfig.multiple_of, show_default=True,
        help="Keep query heads and neurons multiples of N, and KV heads a multiple or divisor of N, in every "
             "block, so N GPUs (tensor parallelism, e.g. vLLM) can split the output.")(command)


@main.command()
@model_options("--shards", "Model to prune")
@click.option("--out", required=True, type=PathArg(), help="Output folder (resumable).")
@click.option("--sparsity", default=RunConfig.sparsity, show_default=True,
              help="Fraction of the decoder blocks' weights to remove, in [0, 1) (0.3 for 30%). Over all blocks "
                   "together: under --allocation global some blocks lose much more, others less or nothing.")
@click.option("--calib", type=PathArg(dir_okay=False),
              help="Calibration text: a plain text file, JSON lines (.jsonl, .json, .gz) or Parquet.")
@click.option("--calib-dataset",
              help="Calibration from a `datasets` dataset: NAME[:CONFIG][:SPLIT] (instead of --calib).")
@click.option("--text-field", default=RunConfig.text_field, show_default=True, help=TEXT_FIELD_HELP)
@click.option("--samples", default=RunConfig.samples, show_default=f"{RunConfig.samples}, or what the text holds",
              help="Calibration windows (unset: fewer when the text is short, with a warning).")
@click.option("--seq-len", default=RunConfig.seq_len,
              show_default=f"{RunConfig.seq_len}, at most max_position_embeddings",
              help="Tokens per calibration window (unset: shorter when the text is very short).")
@click.option("--device", type=Device(), default=RunConfig.device, show_default=True, help="cpu or cuda.")
@click.option("--seed", default=RunConfig.seed, show_default=True)
@click.option("--method", default=RunConfig.method, show_default=True,
              help="Scoring method: perturb, magnitude, wanda-sp or flap.")
@click.option("--budget", default=RunConfig.budget, show_default=True,
              help="Scales perturbations and tokens per block (perturb).")
@compensation_options
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=RunConfig.allocation, show_default=True,
              help="How each block's shape is chosen: global (each block its own, from measured costs, whole blocks "
                   "may go), uniform (one shape for all, from measured costs), rule (one shape by a fixed rule).")
@multiple_of_option
@click.option("--calibrate-on", type=click.Choice(["pruned", "dense"]), default=RunConfig.calibrate_on,
              show_default=True, help="Calibrate block i+1 on the outputs of the pruned or the dense block i.")
@click.option("--batch-size", default=0, help="Calibration windows per micro-batch (0: from memory).")
@click.option("--max-memory", type=Size(),
              help="Memory the run may use, e.g. 24GiB (host on CPU, GPU on CUDA; default: what is free).")
@click.option("--cache-dir", type=PathArg(), help="Activation cache folder (default: inside --out).")
@click.option("--keep-cache", is_flag=True, help="Keep the activation cache after a finished run.")
@click.option("--restart", is_flag=True, help="Discard any previous run in --out and start over.")
@click.option("--no-overlap", "overlap", flag_value=False, default=True,
              help="Read and write blocks synchronously (no prefetch; for benchmarks).")
@click.option("--profile", is_flag=True,
              help="Exact seconds per phase in report.json on a GPU (synchronizes it at every phase; a little slower).")
@click.option("--eval", "eval", type=PathArg(dir_okay=False),
              help="Held-out text: measure perplexity before and after (streaming), into report.json. "
                   "Plain text, JSON lines or Parquet.")
@click.option("--eval-dataset",
              help="Held-out text from a `datasets` dataset: NAME[:CONFIG][:SPLIT] (instead of --eval).")
@click.option("--eval-seq-len", default=0,
              help="Tokens per evaluation window (0: 2048, at most max_position_embeddings; as `eval`).")
@click.option("--survey-only", is_flag=True,
              help="Measure the costs (the survey) and show each block's shape at --sparsity and the --preview "
                   "sparsities; prune nothing. A later run into the same --out at any sparsity reuses the survey.")
@click.option("--preview", default="0.2,0.3,0.4,0.5", show_default=True,
              help="With --survey-only: the other sparsities to show (comma-separated).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(quiet: bool, revision: str | None, preview: str, shards: Path, out: Path, sparsity: float,
        calib: Path | None, **options):
    """Prune a model; re-running the same command resumes an interrupted run."""
    from .api import ADAPTABLE, prune
    sparsities = preview_sparsities(sparsity, preview) if options["survey_only"] else ()
    warn_beyond_physical(options["max_memory"], options["device"])
    if not quiet and not click.get_current_context().find_root().params.get("debug"):
        show_messages(logging.INFO)
    result = prune(shards, out, sparsity, calib, revision=revision, progress=not quiet,
                   notify=echo_err, adaptable=defaulted(*ADAPTABLE), **options)
    if result.report is None and result.costs is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return
    if result.costs is not None:
        from .planning.preview import render_previews, survey_previews
        cfg = RunConfig(result.model.folder, out, sparsity, calib, **options)
        previews = survey_previews(cfg, result.model.arch, result.costs, sparsities)
        click.echo("\n".join(render_previews(previews, result.model.arch.blocks)))
        click.echo(f"survey kept in {out}: `streamprune run` with the same arguments and any --sparsity, "
                   "--allocation (global, uniform), --method, --multiple-of or --row-multiple reuses it")
        return
    from .output.report import work_time
    t = result.report["timing"]
    click.echo(f"{out}: block params {result.params_before:,} -> {result.params_after:,} "
               f"({100 * result.removed_fraction:.1f}% removed) in {work_time(t)}, "
               f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB")
    if "eval" in result.report:
        e, ev = result.report["eval"], t.get("eval_seconds", {})
        click.echo(f"perplexity on {e['text']} over {e['windows']} windows of {e['seq_len']} tokens: "
                   f"{e['ppl_before']:.3f} -> {e['ppl_after']:.3f} (evaluation "
                   f"{ev.get('before', 0) + ev.get('after', 0):.1f}s; {t.get('wall_seconds_total', 0):.1f}s in all)")


@main.command()
@model_options("--shards", "Model")
@click.option("--sparsity", default=RunConfig.sparsity, show_default=True, help="Show what this sparsity would remove.")
@multiple_of_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(shards: Path, revision: str | None, sparsity: float, multiple_of: int, row_multiple: int, as_json: bool):
    """Print the model's shape and the fixed rule's cut, with the reasons, from headers only."""
    from .planning.inspect import describe, render_description
    info = describe(planning_model(shards, revision), sparsity, multiple_of, row_multiple)
    click.echo(json.dumps(info, indent=2) if as_json else render_description(info))


@main.command("plan")
@model_options("--shards", "Model")
@click.option("--out", type=PathArg(), default=Path("."), help="Where the output would go; free disk is checked "
              "there (default: the current folder).")
@click.option("--cache-dir", type=PathArg(), help="Where the activation cache would go (default: inside --out).")
@click.option("--sparsity", default=RunConfig.sparsity, show_default=True)
@click.option("--calib", type=PathArg(dir_okay=False),
              help="The run's calibration text: windows are fitted to it as run fits them (without one: "
                   "--samples and --seq-len as given).")
@click.option("--calib-dataset", help="The run's --calib-dataset NAME[:CONFIG][:SPLIT] (instead of --calib).")
@click.option("--text-field", default=RunConfig.text_field, show_default=True, help=TEXT_FIELD_HELP)
@click.option("--samples", default=RunConfig.samples, show_default=True)
@click.option("--seq-len", default=RunConfig.seq_len, show_default=True)
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=RunConfig.allocation, show_default=True,
              help="The run's --allocation (global and uniform survey the model first; rule does not).")
@click.option("--device", type=PlanDevice(), default=RunConfig.device, show_default=True,
              help="cpu or cuda; cuda without a GPU here plans for the GPU --max-memory or --gpu describes.")
@click.option("--gpu", "gpu_name", help="Plan for a known GPU (its datasheet memory and peak speed): "
              "rtx-3090, rtx-4090, l4, t4, a100-40gb, a100-80gb, h100, h200. Implies --device cuda.")
@click.option("--method", default=RunConfig.method, show_default=True)
@click.option("--budget", default=RunConfig.budget, show_default=True, help="perturb's work per block.")
@compensation_options
@multiple_of_option
@click.option("--batch-size", default=0, help="Micro-batch (0: the largest that fits).")
@click.option("--max-memory", type=Size(), help="Memory the run may use, e.g. 24GiB (host on CPU, GPU on CUDA; "
              "default: what is free, or the --gpu's memory).")
@click.option("--no-timing", is_flag=True, help="Skip the short speed calibration (no time estimate).")
@click.option("--nproc", default=1, show_default=True,
              help="Processes of a data-parallel run (torchrun --nproc-per-node N): memory and disk per process, "
                   "speed-up.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_command(shards, revision, out, cache_dir, sparsity, calib, calib_dataset, text_field, samples, seq_len,
                 allocation, device, gpu_name, method, budget, compensate, multiple_of, row_multiple, batch_size,
                 max_memory, no_timing, nproc, as_json):
    """Predict disk, memory, micro-batch and time of a run, from headers only. Exit code 0: it
    fits; 1: it does not (the prediction and what would fit are printed); 2: an error."""
    from .planning.advice import describe_plan
    from .planning.render import render_plan
    if gpu_name and device == RunConfig.device:
        device = "cuda"
    model = planning_model(shards, revision)
    remote = not isinstance(model, Path)  # a Hub model known from its headers, weights not downloaded
    cfg = RunConfig(shards=model.folder if remote else model, out=out, cache_dir=cache_dir, sparsity=sparsity,
                    calib=calib, calib_dataset=calib_dataset, text_field=text_field, allocation=allocation,
                    samples=samples, seq_len=seq_len, device=device, method=method, budget=budget,
                    compensate=compensate, multiple_of=multiple_of, row_multiple=row_multiple, batch_size=batch_size,
                    max_memory=max_memory,
                    adaptable=defaulted("samples", "seq_len"))
    info = describe_plan(cfg, timing=not no_timing, gpu_name=gpu_name, remote_model=model if remote else None,
                         processes=nproc)
    if as_json:
        for warning in info["warnings"]:
            click.echo(f"warning: {warning}", err=True)
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo("\n".join(render_plan(info)))
    return 0 if info["fits"] else 1


@main.command("eval")
@model_options("--model", "Model (input or pruned)")
@click.option("--text", type=PathArg(dir_okay=False),
              help="Held-out text: a plain text file, JSON lines (.jsonl, .json, .gz) or Parquet.")
@click.option("--text-dataset",
              help="Held-out text from a `datasets` dataset: NAME[:CONFIG][:SPLIT] (instead of --text).")
@click.option("--text-field", default=RunConfig.text_field, show_default=True, help=TEXT_FIELD_HELP)
@click.option("--seq-len", default=0, help="Tokens per window (0: 2048, at most max_position_embeddings).")
@click.option("--device", type=Device(), default=RunConfig.device, show_default=True, help="cpu or cuda.")
@click.option("--batch-size", default=0, help="Windows per micro-batch (0: automatic).")
@click.option("--max-windows", default=0, help="Use only the first N windows (0: the whole text).")
@click.option("--cache-dir", type=PathArg(), help="Where the activation cache goes (default: temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(model, revision, text, text_dataset, text_field, seq_len, device, batch_size, max_windows, cache_dir,
                 as_json, quiet):
    """Perplexity on held-out text, streaming one block at a time."""
    from .arch.hub import resolve_model
    from .engine.evaluate import perplexity
    from .store.documents import TextSource
    if seq_len < 0 or batch_size < 0 or max_windows < 0:
        raise StreamPruneError("--seq-len, --batch-size and --max-windows must be >= 0")
    if (text is None) == (text_dataset is None):
        raise StreamPruneError("give --text FILE or --text-dataset NAME (one of them)")
    source = TextSource(file=text, dataset=text_dataset, field=text_field)
    folder = resolve_model(model, revision, progress=not quiet and not as_json, notify=echo_err)
    r = perplexity(folder, source, seq_len or None, device, batch_size, max_windows or None, cache_dir,
                   progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(dict(r.as_dict(), model=str(model)), indent=2))
        return
    click.echo(f"{model}: perplexity {r.ppl:.4f} on {r.text} over {r.windows} windows of {r.seq_len} tokens "
               f"({r.tokens:,} predicted; {r.seconds:.1f}s)")


@main.command()
@click.argument("model_dir", type=PathArg(file_okay=False))
@click.option("--gguf", "gguf_file", required=True, type=PathArg(dir_okay=False),
              help="The GGUF file to write (llama.cpp, and engines built on it).")
@click.option("--type", "ggml_type", type=click.Choice(list(GGUF_TYPES)), default="f16", show_default=True,
              help="Weight type; a tensor whose rows a quantized type cannot split stays f16 (listed).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(model_dir: Path, gguf_file: Path, ggml_type: str, quiet: bool):
    """Write MODEL_DIR (an input, or any streamprune output) as one GGUF file for llama.cpp; per-block
    shapes as llama.cpp's 'deci' architecture. One tensor in memory at a time."""
    from tqdm import tqdm

    from .output.gguf_export import export_gguf
    bars = []
    r = export_gguf(model_dir, gguf_file, ggml_type, progress=lambda n: bars[0].update(n),
                    on_total=lambda n: bars.append(tqdm(total=n, unit="tensor", desc="exporting", disable=quiet,
                                                        dynamic_ncols=True)))
    bars[0].close()
    for name, written, why in r.fallbacks:
        click.echo(f"  {name}: {written} ({why})")
    click.echo(f"{r.path}: llama.cpp architecture {r.architecture}, {r.tensors} tensors in {r.ggml_type}"
               + (f" ({len(r.fallbacks)} in another type, listed above)" if r.fallbacks else "")
               + f", {r.bytes / 2**20:,.1f} MiB")


@main.command()
@click.argument("out_dir", type=PathArg())
@click.option("--png", type=PathArg(dir_okay=False), help="Picture path (default: OUT_DIR/report.png).")
@click.option("--no-png", is_flag=True, help="Terminal summary only.")
def report(out_dir: Path, png: Path | None, no_png: bool):
    """Summarize a pruned model's report.json; draw kept units, errors and params per layer."""
    from .output.report import load_report, plot_report, render_report
    data = load_report(out_dir)
    click.echo(render_report(data))
    if no_png:
        return
    path = png or Path(out_dir) / "report.png"
    if plot_report(data, path):
        click.echo(f"picture: {path}")
    else:
        click.echo("no picture: matplotlib is not installed (pip install 'streamprune[plot]')")


def entry_point():
    """The `streamprune` command. Ctrl-C (SIGINT) and SIGTERM end in the resume message and exit
    130 / 143 whenever they land: during the run, in click before or after the command, after it
    returned, or when a library swallowed the exception the signal raised."""
    handle_signals(arm=True)
    try:
        try:
            main(prog_name="streamprune")
            code = 0
        finally:
            handle_signals(arm=False)  # from here on a signal is only recorded
    except KeyboardInterrupt as e:
        handle_signals(arm=False)
        code = report_interrupt(e)
    except SystemExit as e:
        code = e.code
    except Exception:
        if not received:
            raise
        code = report_interrupt()  # a library swallowed the signal's KeyboardInterrupt and failed after it
    finish(code)


if __name__ == "__main__":
    entry_point()
