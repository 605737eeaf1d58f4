"""The `streamprune` command: parses arguments, builds the config, calls the pipeline."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .config import RunConfig
from .errors import StreamPruneError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class Group(click.Group):
    """Turns known failures into one line on stderr and a non-zero exit (traceback with --debug)."""

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or "--debug" in sys.argv
        try:
            return super().invoke(ctx)
        except StreamPruneError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; finished blocks are saved: re-run the same command to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except MemoryError:
            if debug:
                raise
            click.echo("error: out of memory; lower --batch-size or --samples", err=True)
            sys.exit(EXIT_ERROR)
        except OSError as e:
            if debug:
                raise
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(EXIT_ERROR)


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="streamprune")
def main(debug: bool):
    """Structured pruning of Llama-family LLMs, one decoder block in memory at a time."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")


@main.command()
@click.option("--shards", required=True, type=click.Path(path_type=Path), help="Hugging Face model folder (safetensors).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (resumable).")
@click.option("--sparsity", default=0.3, show_default=True, help="Fraction of each block's weights to remove, in [0, 1).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text file.")
@click.option("--samples", default=128, show_default=True, help="Calibration windows.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", default=0, show_default=True)
@click.option("--method", default="magnitude", show_default=True, help="Scoring method.")
@click.option("--batch-size", default=0, help="Calibration windows per micro-batch (0: from memory).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Activation cache folder (default: inside --out).")
@click.option("--keep-cache", is_flag=True, help="Keep the activation cache after a finished run.")
@click.option("--restart", is_flag=True, help="Discard any previous run in --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(quiet: bool, **kwargs):
    """Prune a model; re-running the same command resumes an interrupted run."""
    from .pipeline import run as run_pipeline
    from .scoring import SCORERS
    if kwargs["method"] not in SCORERS:
        raise StreamPruneError(f"unknown --method {kwargs['method']!r}; choose from {', '.join(SCORERS)}")
    report = run_pipeline(RunConfig(progress=not quiet, **kwargs))
    p = report["block_params"]
    click.echo(f"{kwargs['out']}: block params {p['before']:,} -> {p['after']:,} "
               f"({100 * p['removed_fraction']:.1f}% removed) in {report['timing']['seconds']:.1f}s, "
               f"peak RSS {report['timing']['peak_rss_bytes'] / 2**20:.0f} MiB")


@main.command()
@click.option("--shards", required=True, type=click.Path(path_type=Path), help="Hugging Face model folder.")
@click.option("--sparsity", default=0.3, show_default=True, help="Show what this sparsity would remove.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(shards: Path, sparsity: float, as_json: bool):
    """Print the model's shape and the pruning plan, from headers only."""
    from .inspect import describe
    RunConfig(shards=shards, out=shards, sparsity=sparsity)  # validates the sparsity
    info = describe(shards, sparsity)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['model_type']}: {info['layers']} layers, hidden {info['hidden']}, "
               f"{info['heads']} heads / {info['kv_heads']} KV heads (head_dim {info['head_dim']}), "
               f"{info['neurons']} neurons, vocab {info['vocab']}, dtype {info['dtype']}")
    click.echo(f"params: {info['params']:,} total, {info['block_params']:,} in blocks")
    pl = info["plan"]
    click.echo(f"plan at sparsity {sparsity}: heads {info['heads']} -> {pl['heads']}, KV heads "
               f"{info['kv_heads']} -> {pl['kv_heads']}, neurons {info['neurons']} -> {pl['neurons']} per block; "
               f"block params {info['block_params']:,} -> {pl['block_params']:,} "
               f"({100 * pl['removed_fraction']:.1f}% removed); output model_type {pl['output_model_type']}")


if __name__ == "__main__":
    main()
