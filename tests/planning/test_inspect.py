"""inspect says why: which GQA layout the fixed rule keeps (and the nearest others), and why the
output is written as another family when it is."""

import json

from click.testing import CliRunner

from streamprune.arch.families import read_config
from streamprune.arch.output_config import family_change, heterogeneous_config
from streamprune.cli import main
from streamprune.planning.inspect import describe
from streamprune.printing.inspect_text import render_description
from tests.models import save_tiny_model


def tiny_llama(tmp_path):
    return save_tiny_model(tmp_path / "llama", "llama", layers=2, hidden=64, heads=8, kv=4)


def test_rule_explains_why_half_the_query_heads_go(tmp_path):
    info = describe(tiny_llama(tmp_path), 0.3)
    chosen, nearest = info["plan"]["layouts"][:2]
    assert (chosen["kv_heads"], chosen["heads_per_group"], info["plan"]["heads"]) == (4, 1, 4)
    assert abs(chosen["attention_kept"] - 0.7) < abs(nearest["attention_kept"] - 0.7)
    assert info["plan"]["output_model_type"] == "llama" and info["plan"]["output_model_type_reason"] is None
    text = render_description(info)
    assert "why 4 of 8 query heads" in text and "4 KV groups x 1 = 4 heads keep 66.7%   <- kept" in text
    assert "3 KV groups x 2 = 6 heads keep 75.0%" in text  # the runner-up, farther from 70%
    assert "--allocation global (the default) and uniform choose the shapes from costs measured" in text
    assert "stays a llama only when every kept block has the same number of query heads" in text
    assert info["output_family"] == {"written_as": "mistral", "head_counts": [1, 2, 4, 8]}


def test_says_why_the_output_becomes_mistral(tmp_path):
    info = describe(tiny_llama(tmp_path), 0.25)  # 3 groups x 2 = 6 heads, which do not divide 64
    assert info["plan"]["output_model_type"] == "mistral"
    reason = info["plan"]["output_model_type_reason"]
    assert "LlamaConfig needs num_attention_heads to divide hidden_size" in reason
    assert "6 query heads do not divide hidden_size 64" in reason
    assert f"why mistral: {reason}" in render_description(info)


def test_family_change_of_per_block_head_counts(tmp_path):
    config = read_config(tiny_llama(tmp_path))
    shapes = [{"n_heads": 8, "n_kv": 4, "intermediate": 96}, {"n_heads": 4, "n_kv": 4, "intermediate": 64}]
    out = heterogeneous_config(config, shapes)
    assert "the number of query heads differs from block to block" in family_change(config, out)
    assert family_change(config, heterogeneous_config(config, [shapes[1], shapes[1]])) is None


def test_cli_inspect_with_multiple_of(tmp_path):
    folder = tiny_llama(tmp_path)
    r = CliRunner().invoke(main, ["inspect", "--shards", str(folder), "--multiple-of", "4", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)["plan"]
    assert plan["heads"] % 4 == 0 and plan["neurons"] % 4 == 0 and 4 % plan["kv_heads"] == 0
    r = CliRunner().invoke(main, ["inspect", "--shards", str(folder), "--multiple-of", "16"])
    assert r.exit_code == 2 and "--multiple-of 16: block 0 has 8 query heads" in r.output
