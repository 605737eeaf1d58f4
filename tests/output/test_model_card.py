"""The output's model card says how to run it: transformers (stock or streamprune.load_pretrained),
vLLM (with streamprune's plugin where the blocks differ, and the GPUs --multiple-of splits over), and
llama.cpp."""

from streamprune.output.model_card import model_card

REPORT = {"arguments": {"sparsity": 0.3, "allocation": "global", "method": "perturb", "compensate": "lsq",
                        "samples": 32, "seq_len": 256, "multiple_of": 1},
          "plan": {"blocks_kept": 2, "dropped_blocks": [], "heads": [8, 8], "kv_heads": [4, 4], "neurons": [96, 64]},
          "block_params": {"before": 1000, "after": 700, "removed_fraction": 0.3},
          "model": {"layers": 2, "model_type": "llama", "output_model_type": "llama"}}


def card(architecture: str, per_layer: bool, multiple_of: int = 1) -> str:
    config = {"model_type": "llama", "architectures": [architecture]}
    if per_layer:
        config["per_layer_config"] = {"1": {"intermediate_size": 64}}
    report = dict(REPORT, arguments=dict(REPORT["arguments"], multiple_of=multiple_of))
    return model_card(report, config, "org/model")


def test_a_per_block_output_names_the_plugin_and_its_loader():
    text = card("StreamPruneLlamaForCausalLM", per_layer=True)
    assert "streamprune.load_pretrained(\"THIS_FOLDER\")" in text and "vllm serve THIS_FOLDER" in text
    assert "`StreamPruneLlamaForCausalLM`, which streamprune registers in vLLM" in text
    assert "pip install streamprune" in text and "--tensor-parallel-size" not in text


def test_a_stock_output_runs_in_vllm_as_it_is():
    text = card("LlamaForCausalLM", per_layer=False, multiple_of=4)
    assert "AutoModelForCausalLM.from_pretrained" in text and "vllm serve THIS_FOLDER" in text
    assert "pip install streamprune" not in text
    assert "splits over 4 GPUs, or any divisor of 4 (`--tensor-parallel-size 4`)" in text
