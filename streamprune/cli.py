"""The `streamprune` command: parses arguments and calls the Python API (api.py) or the planning and
output functions; prints what they return."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .config import GGUF_TYPES, INSPECT, PLAN, RUN, SURVEY_FREE, Option, RunConfig, options_of, parse_sparsities
from .errors import StreamPruneError, error_message, one_line, user_facing
from .signals import finish, handle_signals, received, report_interrupt
from .units import parse_bytes

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
            if debug or not user_facing(e):
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


class Parsed(click.ParamType):
    """A value given as text and parsed (--max-memory 24GiB, --preview 0.2,0.4); what does not parse is
    click's usage error with the parser's message."""

    def __init__(self, name: str, parse, parsed: type):
        self.name, self.parse, self.parsed = name, parse, parsed

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, self.parsed) else self.parse(value)
        except StreamPruneError as e:
            self.fail(str(e), param, ctx)


class Device(click.ParamType):
    """--device: refused while parsing, with the run's own message, unless it names a device here."""
    name = "device"

    def convert(self, value, param, ctx):
        from .device import check_device
        check_device(value)
        return value


class PlanDevice(click.ParamType):
    """plan's --device: cpu, cuda or cuda:N, present here or described (--max-memory, --gpu)."""
    name = "device"

    def convert(self, value, param, ctx):
        import torch

        from .device import check_device, parse_device
        if parse_device(value).type == "cuda" and torch.cuda.is_available():
            check_device(value)
        return value


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


def table_options(command: str):
    """The options `command` (run, plan or inspect) takes from the one table of options, config.RunConfig's
    fields (config.option), as click options in their order there."""
    def decorate(f):
        for field, how in reversed(options_of(command)):
            if how.alias:
                flag, value, text = how.alias
                f = click.option(flag, field.name, flag_value=value, help=text)(f)
            f = table_option(field, how, command)(f)
        return f
    return decorate


def table_option(field, how: Option, command: str):
    """One option of the table as a click option: a flag for a bool (spelled as its negation, or as
    `how.flag`, when the default is True), else a value of the kind the table says."""
    default = field.default
    if isinstance(default, bool):
        flag = how.flag or ("--no-" if default else "--") + field.name.replace("_", "-")
        return click.option(flag, field.name, flag_value=not default, default=default, help=how.help)
    types = {"file": PathArg(dir_okay=False), "folder": PathArg(), "size": Parsed("size", parse_bytes, int),
             "text": click.STRING,
             "device": PlanDevice() if command == PLAN else Device(), "choice": click.Choice(how.choices),
             "sparsities": Parsed("sparsities", parse_sparsities, tuple)}
    kwargs = {"show_default": how.show_default} if default is not None and how.show_default else {}
    if how.kind == "sparsities":  # (click takes a tuple default for several values)
        default = ",".join(f"{v:g}" for v in default)
    return click.option(how.flag or "--" + field.name.replace("_", "-"), field.name,
                        type=types.get(how.kind, type(default)), default=default, help=how.help, **kwargs)


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
    from .inputs.hub import model_for_planning
    model = model_for_planning(arg, revision)
    if not isinstance(model, Path):
        echo_err(f"{arg}: read from the Hugging Face Hub's safetensors headers (weights not downloaded)")
    elif model != Path(arg):
        echo_err(f"{arg}: Hugging Face Hub snapshot {model}")
    return model


TEXT_FIELD_HELP = dict((f.name, how.help) for f, how in options_of())["text_field"]  # (eval's --text-field too)


@main.command()
@model_options("--shards", "Model to prune")
@click.option("--out", required=True, type=PathArg(), help="Output folder (resumable).")
@table_options(RUN)
def run(revision: str | None, shards: Path, out: Path, **options):
    """Prune a model; re-running the same command resumes an interrupted run."""
    from .api import ADAPTABLE, prune
    warn_beyond_physical(options["max_memory"], options["device"])
    if options["progress"] and not click.get_current_context().find_root().params.get("debug"):
        show_messages(logging.INFO)
    result = prune(shards, out, revision=revision, notify=echo_err, adaptable=defaulted(*ADAPTABLE), **options)
    if result.report is None and result.previews is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return
    if result.previews is not None:
        from .printing.preview_text import render_previews
        click.echo("\n".join(render_previews(result.previews, result.input_blocks)))
        free = ", ".join(f"--{name.replace('_', '-')}" for name in SURVEY_FREE)
        click.echo(f"survey kept in {out}: prune from it as often as you like with the same command, without "
                   f"--survey-only, plus --survey-from {out} --out NEW and any {free}")
        return
    click.echo("\n".join(run_summary(result)))


def run_summary(result) -> list[str]:
    """`run`'s last lines: the parameters removed, the time and memory; the perplexities (with --eval).
    What an older report.json does not hold is left out."""
    from .output.report import work_time
    t, e = result.report.get("timing") or {}, result.report.get("eval")
    line = f"{result.out}:"
    if result.params_before is not None and result.params_after is not None:
        line += f" block params {result.params_before:,} -> {result.params_after:,}"
        if result.removed_fraction is not None:
            line += f" ({100 * result.removed_fraction:.1f}% removed)"
    if "seconds" in t:
        line += f" in {work_time(t)}"
    if result.peak_rss_bytes is not None:
        line += f", peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB"
    if not e:
        return [line]
    ev = t.get("eval_seconds", {})
    return [line, f"perplexity on {e['text']} over {e['windows']} windows of {e['seq_len']} tokens: "
                  f"{e['ppl_before']:.3f} -> {e['ppl_after']:.3f} (evaluation "
                  f"{ev.get('before', 0) + ev.get('after', 0):.1f}s; {t.get('wall_seconds_total', 0):.1f}s in all)"]


@main.command()
@model_options("--shards", "Model")
@table_options(INSPECT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(shards: Path, revision: str | None, sparsity: float, multiple_of: int, row_multiple: int, as_json: bool):
    """Print the model's shape and the fixed rule's cut, with the reasons, from headers only."""
    from .planning.inspect import describe
    from .printing.inspect_text import render_description
    info = describe(planning_model(shards, revision), sparsity, multiple_of, row_multiple, defaulted("row_multiple"))
    click.echo(json.dumps(info, indent=2) if as_json else render_description(info))


@main.command("plan")
@model_options("--shards", "Model")
@click.option("--out", type=PathArg(), default=Path("."), help="Where the output would go; free disk is checked "
              "there (default: the current folder).")
@table_options(PLAN)
@click.option("--gpu", "gpu_name", help="Plan for a known GPU (its datasheet memory and peak speed): "
              "rtx-3090, rtx-4090, l4, t4, a100-40gb, a100-80gb, h100, h200. Implies --device cuda.")
@click.option("--no-timing", is_flag=True, help="Skip the short speed calibration (no time estimate).")
@click.option("--nproc", default=1, show_default=True,
              help="Processes of a data-parallel run (torchrun --nproc-per-node N): memory and disk per process, "
                   "speed-up.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_command(shards, revision, out, gpu_name, no_timing, nproc, as_json, **options):
    """Predict disk, memory, micro-batch and time of a run, from headers only. Exit code 0: it
    fits; 1: it does not (the prediction and what would fit are printed); 2: an error."""
    from .planning.advice import describe_plan
    from .printing.plan_text import render_plan
    if gpu_name and options["device"] == RunConfig.device:
        options["device"] = "cuda"
    model = planning_model(shards, revision)
    remote = not isinstance(model, Path)  # a Hub model known from its headers, weights not downloaded
    cfg = RunConfig(shards=model.folder if remote else model, out=out,
                    adaptable=defaulted("samples", "seq_len", "row_multiple"),
                    **options)
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
    from .engine.evaluate import perplexity
    from .inputs.hub import resolve_model
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
                                                        dynamic_ncols=True)), notify=echo_err)
    bars[0].close()
    for name, written, why in r.fallbacks:
        click.echo(f"  {name}: {written} ({why})")
    if r.advice:
        click.echo(f"  {r.advice}")
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
