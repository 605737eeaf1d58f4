"""The checks before any work (planning/validate.py): sizes as people read them, the sparsity a
model allows, the paths a run may write, NaN/Inf activations."""

import pytest
import torch

from streamprune.arch.families import architecture, read_config
from streamprune.checks.validate import check_paths, check_sparsity, max_sparsity
from streamprune.errors import StreamPruneError
from streamprune.store.finite import check_finite_activations
from streamprune.units import size_text
from tests.models import tiny_config


def test_size_text_is_mib_under_a_gib_and_gib_from_one():
    assert size_text(0) == "0.0 MiB"
    assert size_text(5 * 2**20 + 2**19) == "5.5 MiB"
    assert size_text(2**30 - 2**20) == "1023.0 MiB"
    assert size_text(2**30) == "1.00 GiB"
    assert size_text(70 * 2**30 + 2**29) == "70.50 GiB"


def test_check_sparsity_refuses_what_no_layout_reaches(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    arch = architecture(read_config(tmp_path))
    most = max_sparsity(arch.blocks[0])
    assert 0.5 < most < 1
    check_sparsity(arch, 0.0)
    check_sparsity(arch, most)
    with pytest.raises(StreamPruneError) as e:
        check_sparsity(arch, round(most + 0.01, 3))
    assert str(e.value) == (f"--sparsity {round(most + 0.01, 3)} would remove every attention head of each block; "
                            f"this model allows at most {most:.3f}")


def test_check_paths_keeps_the_output_and_the_cache_out_of_the_input(tmp_path):
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    check_paths(model, out, None)
    check_paths(model, out, tmp_path / "cache")
    with pytest.raises(StreamPruneError, match=r"--out .*model/pruned is inside the input folder .*model; choose"):
        check_paths(model, model / "pruned", None)
    with pytest.raises(StreamPruneError, match=r"--out .*model is the input folder"):
        check_paths(model, model, None)
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(StreamPruneError, match="is the input folder"):  # through a symlink too
        check_paths(model, tmp_path / "link", None)
    with pytest.raises(StreamPruneError, match=r"the input folder .*model is inside --out"):
        check_paths(model, tmp_path, None)
    with pytest.raises(StreamPruneError, match=r"--cache-dir .*model/cache is inside the input folder"):
        check_paths(model, out, model / "cache")


def test_check_finite_activations_names_the_layer_and_the_first_sample():
    y = torch.zeros(2, 4, 8)
    check_finite_activations(y, 3, 8)
    y[1, 2, 5] = float("inf")
    with pytest.raises(StreamPruneError) as e:
        check_finite_activations(y, 3, 8)
    assert str(e.value) == ("layer 3 produced Inf activations on calibration samples from 8; "
                            "the model's weights or dtype overflow on this input")
    y[0, 0, 0] = float("nan")
    with pytest.raises(StreamPruneError, match="^layer 0 produced NaN activations on calibration samples from 0;"):
        check_finite_activations(y, 0, 0)
