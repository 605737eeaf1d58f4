"""The plan as `streamprune plan` prints it, from advice.describe_plan's dict (what --json prints)."""

from __future__ import annotations

from ..planning.timing import duration
from ..units import size_text

CAUSES = {"samples": "all the windows at once", "memory": "the largest that fits",
          "--batch-size": "as --batch-size asks"}


def render_plan(info: dict) -> list[str]:
    """The plan as printed: model, disk, memory breakdown, time, verdict, what would fit."""
    gpu = info["peak_device_bytes"] > 0
    where = (f"{info['gpu']['name']} (datasheet numbers)" if info["gpu"] else
             "a GPU described by --max-memory (none here)" if not info["device_here"] else info["device"])
    lines = [f"plan for {where}: {info['samples']} windows of {info['seq_len']} tokens"
             + (f", {info['processes']} processes of {info['windows_per_process']} windows (disk and memory below "
                "are one process's)" if info.get("processes") else ""),
             f"largest block: {size_text(info['block_stored_bytes'])} stored, {size_text(info['block_compute_bytes'])} "
             f"in the compute dtype ({'as stored' if gpu else 'fp32'} on {info['device']})", "disk:"]
    for d in info["disk"]:
        lines.append(f"  {d['folder']}: needs {size_text(d['need_bytes'])} ({', '.join(d['parts'])}), "
                     f"{size_text(d['free_bytes'])} free: {'fits' if d['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  (output in {info['out']}, activation cache in {info['cache_folder']})")
    cap = info["activation_cap_bytes"]
    cause = (f"capped: on a CPU a micro-batch is kept under {size_text(cap)} of activations "
             f"({size_text(info['activation_bytes_per_window'])} per window), larger ones stop paying off; "
             "--batch-size N overrides"
             if info["limited_by"] == "activation cap" else CAUSES[info["limited_by"]])
    lines.append(f"memory with micro-batch {info['micro_batch']} ({cause}):")
    for c in info["breakdown"]:
        lines.append(f"  {c['name'].replace('_', ' '):<20}{size_text(c['bytes']):>12}  {c['memory']:<4}  {c['what']}")
    lines.append("  (scoring and compensation run one after the other, the larger counts; the embedding rows are "
                 "read before any block, the larger of them and the block's memory counts)")
    peaks = [("host", info["peak_host_bytes"], info["host_limit_bytes"], "free now")]
    if gpu:
        peaks.insert(0, ("GPU", info["peak_device_bytes"], info["max_memory_bytes"], info["limit_from"]))
    else:
        peaks[0] = ("host", info["peak_host_bytes"], info["max_memory_bytes"], info["limit_from"])
    for what, peak, limit, source in peaks:
        if limit is None:
            lines.append(f"  peak {what}: {size_text(peak)}; not checked here: the GPU's machine needs that much free")
        else:
            lines.append(f"  peak {what}: {size_text(peak)} of {size_text(limit)} ({source}; "
                         f"{info['usable_fraction']:.0%} is planned for): "
                         f"{'DOES NOT FIT' if info['short_of'] == what else 'fits'}")
    if info.get("grams_on") == "host":
        lines.append(f"  the Gram matrices of OBS and least squares do not fit beside the block on the GPU: kept and "
                     f"factored in host memory, formed {info['gram_chunk_columns']} columns at a time on the GPU")
    lines += [f"warning: {w}" for w in info["warnings"]]
    t = info["time"]
    if t is not None:
        if t["seconds"] is not None:
            lines.append(f"time: about {duration(t['seconds'])} (from {duration(t['low_seconds'])} to "
                         f"{duration(t['high_seconds'])})")
        elif t["at_least_seconds"] is not None:
            lines.append(f"time: at least {duration(t['at_least_seconds'])}")
        else:
            lines.append("time: not measured here")
        passes, fewest = info["passes"], sum(info["passes_without_head_cuts"].values())
        lines.append(f"  work: {sum(passes.values()):.1f} dense passes over {info['samples']} x {info['seq_len']} "
                     "tokens (" + ", ".join(f"{k} {v:.1f}" for k, v in passes.items())
                     + f"); {fewest:.1f} if no block loses heads")
        lines.append(f"  how: {t['how']}")
    if info.get("expected_speedup"):
        seconds = t["seconds"] if t and t["seconds"] is not None else None
        lines.append(f"{info['processes']} processes: expected speed-up {info['expected_speedup']:.2f}x"
                     + (f", about {duration(seconds / info['expected_speedup'])}" if seconds else "")
                     + " (the windows' work and cache divide; each process reads every block's weights and scores "
                       "perturb's token sample whole)")
    lines.append(f"verdict: {info['verdict']}")
    if info["suggestions"]:
        lines.append("it would fit with any one of:")
        for s in info["suggestions"]:
            peak = f"micro-batch {s['micro_batch']}, peak {size_text(s['peak_bytes'])}" if s["peak_bytes"] else ""
            notes = "; ".join(x for x in (peak, s["note"]) if x)
            lines.append(f"  {s['change']}" + (f" ({notes})" if notes else ""))
    elif not info["fits"]:
        lines.append("no single change of these options makes it fit")
    return lines
