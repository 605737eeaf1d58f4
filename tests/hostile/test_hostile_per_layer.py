"""A crafted per_layer_config (config.json of a per-block output, or of any folder): every bad
value is one clear line, from load_pretrained and from every command that reads the folder,
before any weight is read or any large allocation made; never a traceback."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamprune
from streamprune.cli import main
from streamprune.errors import StreamPruneError
from tests.models import TINYSTORIES

EDITS = {
    "negative size": (lambda p: p["0"].update(intermediate_size=-5), "layer 0 intermediate_size must be a positive"),
    "zero size": (lambda p: p["0"].update(intermediate_size=0), "layer 0 intermediate_size must be a positive"),
    "fractional size": (lambda p: p["0"].update(intermediate_size=96.5), "must be a positive integer, got 96.5"),
    "size as text": (lambda p: p["0"].update(num_attention_heads="8"), "num_attention_heads must be a positive"),
    "10^9 neurons": (lambda p: p["0"].update(intermediate_size=10**9), "config says [1000000000, 64]"),
    "10^12 neurons": (lambda p: p["0"].update(intermediate_size=10**12),
                      "must be a positive integer, got 1000000000000"),
    "layer out of range": (lambda p: p.update({"7": {"intermediate_size": 10}}), "layer 7 is out of range"),
    "negative layer": (lambda p: p.update({"-1": {"intermediate_size": 10}}), "key '-1' is not a layer index"),
    "layer twice": (lambda p: p.update({"00": {"intermediate_size": 10}}), "layer 0 is given twice ('0' and '00')"),
    "entry not an object": (lambda p: p.update({"1": 5}), "layer 1 must be an object, got int"),
    "unknown key": (lambda p: p["0"].update(rope_theta=1.0), "layer 0 overrides rope_theta; streamprune supports"),
    "bias switch not a bool": (lambda p: p["0"].update(mlp_bias="yes"), "mlp_bias must be true or false"),
    "skip": (lambda p: p["0"].update(skip=["mlp"]), "skips mlp in layer 0"),
    "sizes disagree with the weights": (lambda p: p["0"].update(intermediate_size=100), "config says [100, 64]"),
}


@pytest.fixture(scope="module")
def per_block(tmp_path_factory):
    """A per-block output of the demo model (different neurons in every block)."""
    out = tmp_path_factory.mktemp("pl") / "out"
    r = CliRunner().invoke(main, ["run", "--shards", str(TINYSTORIES / "stories260K"), "--out", str(out),
                                  "--calib", str(TINYSTORIES / "calib.txt"), "--samples", "8", "--seq-len", "64",
                                  "--sparsity", "0.3", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "per_layer_config" in json.loads((out / "config.json").read_text())
    return out


def crafted(per_block: Path, folder: Path, edit) -> Path:
    shutil.copytree(per_block, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["per_layer_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", EDITS)
def test_each_bad_per_layer_config_is_one_clear_error(per_block, tmp_path, case):
    edit, message = EDITS[case]
    folder = crafted(per_block, tmp_path / "m", edit)
    with pytest.raises(StreamPruneError) as e:
        streamprune.load_pretrained(folder)
    assert message in str(e.value)
    text = str(TINYSTORIES / "eval.txt")
    for args in (["eval", "--model", str(folder), "--text", text, "--quiet"], ["inspect", "--shards", str(folder)],
                 ["plan", "--shards", str(folder), "--no-timing"],
                 ["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--quiet"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, (args, r.output)
        assert message in r.output, (args, r.output)
    assert not (tmp_path / "m.gguf").exists()
