"""What pruning did, from report.json: a terminal summary (one table row per layer) and a picture
(kept heads per layer as a map with KV-group lines, per-block relative reconstruction error, and
kept neurons and params per layer, or, when every block has one shape, what it keeps and the
time per block). The picture needs matplotlib, an optional extra: pip install 'streamprune[plot]'."""

from __future__ import annotations

from pathlib import Path

from ..errors import StreamPruneError
from ..store.records import Damaged, check_block_record, expect, expect_fields, read_checked_json

SECTIONS = {"arguments": {}, "model": {}, "plan": {},
            "block_params": {"before": (int,), "after": (int,), "removed_fraction": (int, float)},
            "eval": {"text": (str,), "tokens": (int,), "seq_len": (int,), "ppl_before": (int, float),
                     "ppl_after": (int, float)},
            "timing": {}}


def load_report(out_dir: Path) -> dict:
    path = Path(out_dir)
    if not path.exists():
        raise StreamPruneError(f"not found: {out_dir}")
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise StreamPruneError(f"no report.json in {out_dir} (is it a finished streamprune output?)")
    report, problem = read_checked_json(path, check_report)
    if problem:
        raise StreamPruneError(f"{path} is damaged or not a streamprune report ({problem})")
    return report


def check_report(report) -> None:
    """The structure render_report and plot_report read (what engine/run_report.build_report writes)."""
    expect(report, (dict,), "the file")
    for name, fields in SECTIONS.items():
        if name in report:
            expect(report[name], (dict,), repr(name))
            expect_fields(report[name], fields, repr(name))
    for key in ("seconds", "peak_rss_bytes"):
        if report.get("timing", {}).get(key) is not None:
            expect(report["timing"][key], (int, float), f"'timing'[{key!r}]")
    if "blocks" not in report:
        raise Damaged("no 'blocks'")
    expect(report["blocks"], (list,), "'blocks'")
    if not report["blocks"]:
        raise Damaged("no per-block results")
    for i, block in enumerate(report["blocks"]):
        check_block_record(block, f"'blocks'[{i}]")


def arrow(pair) -> str:
    return f"{pair[0]}" if pair[0] == pair[1] else f"{pair[0]}->{pair[1]}"


def table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def render_report(report: dict) -> str:
    """The terminal summary: arguments, one row per layer, totals, perplexity, time."""
    args, model, blocks = report.get("arguments", {}), report.get("model", {}), report["blocks"]
    lines = [f"{args.get('shards', '?')} ({model.get('model_type', '?')}, {model.get('layers', len(blocks))} layers) "
             f"pruned to a {model.get('output_model_type', '?')}",
             f"sparsity {args.get('sparsity', '?')}, method {args.get('method', '?')}, "
             f"calibration {args.get('samples', '?')} x {args.get('seq_len', '?')} tokens of {args.get('calib', '?')}"
             + (f", --multiple-of {args['multiple_of']} (tensor parallelism)"
                if args.get("multiple_of", 1) != 1 else "")
             + (f", --row-multiple {args['row_multiple']} (quantized rows)"
                if args.get("row_multiple", 1) != 1 else ""),
             ""]
    rows = [["layer", "heads", "kv", "neurons", "params", "rel.err", "kept heads"]]
    for b in blocks:
        rows.append([str(b["layer"]), arrow(b["heads"]), arrow(b["kv_heads"]), arrow(b["neurons"]),
                     f"{b['params'][0]:,}->{b['params'][1]:,}", f"{b['relative_error']:.4f}",
                     " ".join(str(h) for h in b.get("kept_heads", []))])
    lines += table(rows, right={0, 1, 2, 3, 4, 5})
    p = report.get("block_params")
    if p:
        lines += ["", f"block params {p['before']:,} -> {p['after']:,} ({100 * p['removed_fraction']:.1f}% removed)"]
    e = report.get("eval")
    if e:
        change = f" ({100 * (e['ppl_after'] / e['ppl_before'] - 1):+.1f}%)" if e["ppl_before"] else ""
        lines.append(f"perplexity {e['ppl_before']:.3f} -> {e['ppl_after']:.3f}{change} on {e['text']} "
                     f"({e['tokens']:,} tokens, windows of {e['seq_len']})")
    t = report.get("timing")
    if t and "seconds" in t:
        rss = f", peak RSS {t['peak_rss_bytes'] / 2**20:.0f} MiB" if t.get("peak_rss_bytes") else ""
        ev = t.get("eval_seconds") or {}
        evals = f"; evaluation {sum(ev.values()):.1f}s" if ev else ""
        total = f"; {t['wall_seconds_total']:.1f}s in all" if "wall_seconds_total" in t else ""
        lines.append(f"time {work_time(t)}{evals}{total}{rss}")
    return "\n".join(lines)


def work_time(timing: dict) -> str:
    """The run's own time (report.json's timing), as `run` and `report` print it."""
    sessions = f" over {timing['sessions']} sessions" if timing.get("sessions", 1) > 1 else ""
    return f"{timing['seconds']:.1f}s of setup, survey, pruning and writing{sessions}{dense_passes(timing)}"


def dense_passes(timing: dict) -> str:
    """' = 4.2 dense passes (one: 61.0s)': the run's time against one dense streaming forward over
    the same calibration windows, measured in the same run (engine/run_report.dense_passes)."""
    if not timing.get("dense_passes"):
        return ""
    return f" = {timing['dense_passes']:.1f} dense passes (one: {timing['dense_pass_seconds']:.1f}s)"


def kept_head_map(blocks: list[dict]) -> list[list[float]]:
    """(layers, original heads): 1 where the head was kept, 0 where it was removed, -1 in a block
    dropped whole."""
    rows = []
    for b in blocks:
        kept = set(b.get("kept_heads", range(b["heads"][1])))
        rows.append([-1.0 if b.get("dropped") else 1.0 if h in kept else 0.0 for h in range(b["heads"][0])])
    return rows


def kv_group_boundaries(blocks: list[dict]) -> list[tuple[float, int]]:
    """(x, row) of every line between two KV groups in the head map: query head h belongs to KV
    group h // (heads / KV heads)."""
    lines = []
    for row, b in enumerate(blocks):
        heads, kv = b["heads"][0], b["kv_heads"][0]
        group = heads // kv if kv else heads
        lines += [(k * group - 0.5, row) for k in range(1, kv)]
    return lines


HEAD_COLOURS = {-1.0: ("#bbbbbb", "block dropped"), 0.0: ("#f3e3e1", "head removed"), 1.0: ("#3a7d44", "head kept")}


def draw_head_map(ax, blocks: list[dict], layers: list[int]) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    cells = kept_head_map(blocks)
    width = max(len(r) for r in cells)
    grid = [r + [float("nan")] * (width - len(r)) for r in cells]  # blocks with fewer heads: blank cells
    values = sorted(HEAD_COLOURS)
    ax.imshow(grid, aspect="auto", cmap=ListedColormap([HEAD_COLOURS[v][0] for v in values]), vmin=-1.5, vmax=1.5,
              interpolation="nearest")
    bounds = kv_group_boundaries(blocks)
    if bounds:
        ax.vlines([x for x, _ in bounds], [r - 0.5 for _, r in bounds], [r + 0.5 for _, r in bounds],
                  colors="#222222", linewidths=1.5, label="KV group boundary")
    ax.set(title="attention heads per layer", xlabel="query head", ylabel="layer", xlim=(-0.5, width - 0.5),
           ylim=(len(layers) - 0.5, -0.5), yticks=range(len(layers)), yticklabels=layers)
    shown = {v for row in cells for v in row}
    handles = [Patch(facecolor=HEAD_COLOURS[v][0], edgecolor="#888888", label=HEAD_COLOURS[v][1])
               for v in (1.0, 0.0, -1.0) if v in shown]
    if bounds:
        handles.append(ax.collections[-1])
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncol=2, fontsize="small",
              frameon=False)


KINDS = (("query heads", "heads", "#3a7d44"), ("KV heads", "kv_heads", "#7fb3d5"),
         ("MLP neurons", "neurons", "#d98c3a"), ("parameters", "params", "#555555"))


def kept_percent(blocks: list[dict], key: str) -> list[float]:
    """% of each block's `key` (heads, kv_heads, neurons, params) kept; 0 for a dropped block."""
    return [0.0 if b.get("dropped") or not b[key][0] else 100 * b[key][1] / b[key][0] for b in blocks]


def draw_kept(ax, blocks: list[dict], layers: list[int]) -> None:
    """Per block, the share of its query heads, KV heads, neurons and parameters kept."""
    for label, key, colour in KINDS:
        ax.plot(layers, kept_percent(blocks, key), marker="o", markersize=4, color=colour, label=label,
                linewidth=2.5 if key == "params" else 1.5, linestyle="--" if key == "params" else "-")
    dropped = [b["layer"] for b in blocks if b.get("dropped")]
    if dropped:
        ax.scatter(dropped, [0] * len(dropped), marker="x", s=80, color="#b5443b", zorder=3, label="block dropped")
    every_head = all(b["heads"][1] == b["heads"][0] for b in blocks if not b.get("dropped"))
    ax.set(title="kept per block" + (" (every query head kept)" if every_head else ""), ylabel="% kept",
           ylim=(-5, 108), xticks=layers)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.08), ncol=5, fontsize="small", frameon=False)


def draw_error(ax, blocks: list[dict], layers: list[int]) -> None:
    ax.plot(layers, [b["relative_error"] for b in blocks], marker="o", color="#b5443b")
    ax.set(title="what it cost: relative reconstruction error of the block's output", xlabel="layer",
           ylabel="|y - y_dense|² / |y_dense - x|²", xticks=layers)
    ax.set_ylim(bottom=0)


def figure_title(report: dict) -> str:
    """Model, options and size on the first line; the perplexities with their window on the second."""
    args, e, p = report.get("arguments", {}), report.get("eval"), report.get("block_params")
    title = (f"{Path(str(args.get('shards', 'model'))).name}: sparsity {args.get('sparsity', '?')} "
             f"({args.get('method', '?')}, allocation {args.get('allocation', '?')})")
    if p:
        title += f", block params {p['before']:,} -> {p['after']:,} ({1 - p['after'] / p['before']:.1%} removed)"
    if e:
        window = (f", {e['windows']} windows of {e['seq_len']} tokens" if "windows" in e
                  else f", windows of {e['seq_len']} tokens")
        title += (f"\nperplexity {e['ppl_before']:.3f} -> {e['ppl_after']:.3f} "
                  f"({e['ppl_after'] / e['ppl_before'] - 1:+.1%}) on {Path(e['text']).name}{window}")
    return title


def report_figure(report: dict):
    """The picture as a matplotlib Figure (Agg): per block, what was kept (shares of heads, KV heads,
    neurons, parameters) and the error it cost, above each other on one layer axis; beside them the
    map of which query heads were kept (with KV-group lines), drawn only when some head was removed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = report["blocks"]
    layers = [b["layer"] for b in blocks]
    heads_cut = any(b["heads"][1] < b["heads"][0] for b in blocks)
    width = max(8.0, 0.32 * len(layers) + 4)
    if heads_cut:
        fig = plt.figure(figsize=(width + 5, 8))
        grid = fig.add_gridspec(2, 2, width_ratios=(width, 5))
        kept, error = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
        draw_head_map(fig.add_subplot(grid[:, 1]), blocks, layers)
    else:
        fig, (kept, error) = plt.subplots(2, 1, figsize=(width, 8))
    draw_kept(kept, blocks, layers)
    draw_error(error, blocks, layers)
    fig.suptitle(wrapped(figure_title(report), fig.get_figwidth()))
    fig.tight_layout()
    return fig


TITLE_CHARACTERS_PER_INCH = 7.5  # matplotlib's default title font (12 pt DejaVu Sans), with a margin


def wrapped(title: str, width_inches: float) -> str:
    """`title` with each of its lines wrapped at spaces to the figure's width."""
    import textwrap
    columns = int(width_inches * TITLE_CHARACTERS_PER_INCH)
    return "\n".join(part for line in title.splitlines() for part in textwrap.wrap(line, columns) or [""])


def plot_report(report: dict, path: Path) -> bool:
    """Write the picture to `path`, in the format its extension names (none: PNG); False (and
    nothing written) when matplotlib is missing. A format matplotlib cannot write is refused."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    kind = Path(path).suffix.lstrip(".").lower() or "png"
    if kind not in formats:
        raise StreamPruneError(f"cannot draw the picture as .{kind} ({path}); give --png a file ending in "
                               f"{', '.join('.' + k for k in sorted(formats))}")
    fig = report_figure(report)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format=kind)
    plt.close(fig)
    return True
