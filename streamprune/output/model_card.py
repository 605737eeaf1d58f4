"""README.md of every output: a model card with the Hub's YAML front matter, saying what was
removed, the measured perplexities, and how to run the model. Built from report.json and the
output's config.json only, so a resumed run writes the same bytes."""

from __future__ import annotations

from pathlib import Path

CARD = "README.md"


def model_card(report: dict, config: dict, base_model: str) -> str:
    args, plan, params = report["arguments"], report["plan"], report["block_params"]
    per_layer = "per_layer_config" in config
    lines = ["---", f"base_model: {base_model}", "library_name: transformers",
             "tags:", "- streamprune", "- pruned", "- structured-pruning", "---", "",
             f"# {base_model}, {params['removed_fraction']:.0%} of its block weights removed", "",
             f"Pruned with streamprune (`--sparsity {args['sparsity']}`, `--allocation {args['allocation']}`, "
             f"`--method {args['method']}`, `--compensate {args['compensate']}`, calibration: "
             f"{args['samples']} windows of {args['seq_len']} tokens).", "",
             "## What was removed", "",
             f"- Decoder-block parameters: {params['before']:,} -> {params['after']:,} "
             f"({params['removed_fraction']:.1%} removed).",
             f"- Blocks kept: {plan['blocks_kept']} of {report['model']['layers']}"
             + (f" (dropped: {', '.join(map(str, plan['dropped_blocks']))})" if plan["dropped_blocks"] else "") + ".",
             f"- Query heads per block: {_counts(plan['heads'])}; KV heads: {_counts(plan['kv_heads'])}; "
             f"MLP neurons: {_counts(plan['neurons'])}."]
    if report["model"].get("output_model_type") != report["model"]["model_type"]:
        lines.append(f"- Written as `{config['model_type']}` (the same computation as the input's "
                     f"`{report['model']['model_type']}`, with head_dim written out).")
    ev = report.get("eval")
    lines += ["", "## Perplexity", ""]
    if ev:
        lines += [f"On `{Path(ev['text']).name}` over {ev['windows']} windows of {ev['seq_len']} tokens: "
                  f"{ev['ppl_before']:.3f} before, {ev['ppl_after']:.3f} after "
                  f"({ev['ppl_after'] / ev['ppl_before'] - 1:+.1%})."]
    else:
        lines += ["Not measured (run with `--eval FILE`, or `streamprune eval --model THIS_FOLDER --text FILE`)."]
    lines += ["", "## How to run it", ""]
    if per_layer:
        lines += ["Its blocks have different shapes, written in transformers' `per_layer_config`. Stock "
                  "`from_pretrained` (transformers 5.x) reads that config but does not build per-layer shapes yet, "
                  "and refuses the folder (`AmbiguousGlobalPerLayerAttributeError`). Load it with the family's "
                  "stock classes, layer by layer, no remote code:", "",
                  "```python", "import streamprune", "model = streamprune.load_pretrained(\"THIS_FOLDER\")", "```"]
    else:
        lines += ["Every block has the same shape: a stock config.", "",
                  "```python", "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")", "```"]
    lines += ["", *vllm_lines(config, args.get("multiple_of", 1))]
    lines += ["", "For llama.cpp (and the engines built on it), write a GGUF file"
              + (" (per-block shapes use llama.cpp's `deci` architecture):" if per_layer else ":"), "",
              "```bash",
              "streamprune export THIS_FOLDER --gguf model.gguf --type q8_0   # f32, f16, bf16, q8_0, q5_0, q4_0",
              "```", ""]
    return "\n".join(lines)


def vllm_lines(config: dict, multiple_of: int) -> list[str]:
    """How to serve the output in vLLM: its own classes, or (per-block shapes, architectures naming
    StreamPrune...) the ones streamprune's plugin registers when installed beside vLLM."""
    plugin = config["architectures"][0].startswith("StreamPrune")
    lines = ["In vLLM" + (f" (its blocks need `{config['architectures'][0]}`, which streamprune registers in vLLM "
                          "when installed in vLLM's environment: `pip install streamprune`):" if plugin else ":"), "",
             "```bash", "vllm serve THIS_FOLDER   # Python: vllm.LLM(model=\"THIS_FOLDER\")", "```"]
    if multiple_of > 1:
        lines += ["", f"Every block splits over {multiple_of} GPUs, or any divisor of {multiple_of} "
                      f"(`--tensor-parallel-size {multiple_of}`)."]
    return lines


def _counts(values) -> str:
    if not isinstance(values, list):
        return str(values)
    kept = [v for v in values if v is not None]
    if len(set(kept)) == 1:
        return str(kept[0])
    return f"{min(kept)} to {max(kept)} ({', '.join('dropped' if v is None else str(v) for v in values)})"


def base_model_name(folder) -> str:
    """The input's name for the card: `org/name` for a Hub cache snapshot
    (.../models--org--name/snapshots/<commit>), else the folder's name."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return folder.resolve().name


def write_card(out: Path, report: dict, base_model: str) -> None:
    """OUT/README.md from the report and OUT/config.json (written before it)."""
    from ..store.fsutil import atomic_write_bytes
    from ..store.input_files import read_json
    config = read_json(Path(out) / "config.json", "config.json is not valid JSON")
    atomic_write_bytes(Path(out) / CARD, model_card(report, config, base_model).encode())
