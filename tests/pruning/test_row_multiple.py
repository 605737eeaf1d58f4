"""--row-multiple M: kept neuron counts and query heads x head_dim are multiples of M in every
block (the row lengths of down_proj and o_proj, which a block-quantized GGUF type must split),
independently of --multiple-of's tensor-parallel rule; refused when no cut can keep it. Its default
(32) is fitted: a model that cannot meet it is cut as with 1, with a note, never refused."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamprune.arch.families import architecture
from streamprune.arch.spec import BlockSpec
from streamprune.checks.validate import fit_row_multiple
from streamprune.cli import main
from streamprune.config import DEFAULT_ROW_MULTIPLE, RunConfig
from streamprune.errors import StreamPruneError
from streamprune.pruning.allocation import allocate_global, allocate_uniform, linear_params, param_budget
from streamprune.pruning.selection import Alignment, head_layouts, neuron_step, uniform_sizes
from tests.models import SHARED, SPEC, fake_costs, tiny_config

DEMO = Path(__file__).resolve().parents[2] / "demo"


def aligned(spec: BlockSpec, n_heads: int, intermediate: int, rows: int) -> bool:
    return intermediate % rows == 0 and n_heads * spec.head_dim % rows == 0


@pytest.mark.parametrize("rows", [4, 8, 16])
def test_measured_allocations_keep_rows_aligned_within_the_budget(rows):
    blocks, costs = (SPEC,) * 4, [fake_costs(scale) for scale in (1.0, 2.0, 0.5, 3.0)]
    for sizes in (allocate_global(blocks, costs, 0.3, multiple_of=Alignment(rows=rows)),
                  allocate_uniform(blocks, costs, 0.3, multiple_of=Alignment(rows=rows))):
        kept = [s for s in sizes if s is not None]
        assert kept and all(aligned(SPEC, s.n_heads, s.intermediate, rows) for s in kept), sizes
        assert sum(linear_params(SPEC, s) for s in sizes) <= param_budget(blocks, 0.3) + 1e-6


def test_rows_and_gpus_combine():
    a = Alignment(gpus=2, rows=3)
    assert a.neurons == 6 and neuron_step(SPEC, a) % 6 == 0
    assert all(kv * g % 2 == 0 and kv * g * SPEC.head_dim % 3 == 0 for kv, g in head_layouts(SPEC, a))
    assert Alignment().free and a.options() == "--multiple-of 2 --row-multiple 3"


def test_fixed_rule_keeps_rows_aligned():
    sizes = uniform_sizes(SPEC, 0.3, Alignment(rows=8))
    assert aligned(SPEC, sizes.n_heads, sizes.intermediate, 8)


def test_inspect_takes_a_row_multiple_that_tensor_parallelism_refuses():
    """The issue's case: 64 on an 8-head model is no GPU count, but a fine row length (head_dim 8: 8 heads)."""
    r = CliRunner().invoke(main, ["inspect", "--shards", str(DEMO / "stories260K"), "--multiple-of", "64"])
    assert r.exit_code == 2 and "--multiple-of 64: block 0" in r.output
    r = CliRunner().invoke(main, ["inspect", "--shards", str(DEMO / "stories260K"), "--sparsity", "0.1",
                                  "--row-multiple", "64"])
    assert r.exit_code == 0, r.output
    assert "--row-multiple 64: neuron counts and query heads x head_dim 8 are multiples of 64" in r.output
    r = CliRunner().invoke(main, ["inspect", "--shards", str(DEMO / "stories260K"), "--row-multiple", "1024"])
    assert r.exit_code == 2 and "(use a smaller --row-multiple)" in r.output


@pytest.mark.parametrize("field", ["multiple_of", "row_multiple"])
def test_one_is_not_in_the_fingerprint_so_earlier_runs_resume(field):
    """1 (no constraint; --row-multiple's default before it became 32) is left out of the fingerprint,
    so a journal written before the option existed resumes; any other value, the default 32 too, is in it:
    a run of --row-multiple 1 never resumes into one of 32."""
    cfg = RunConfig(shards=DEMO, out=DEMO, calib=DEMO / "calib.txt", **{field: 1})
    assert field not in cfg.fingerprint()
    assert RunConfig(shards=DEMO, out=DEMO, calib=DEMO / "calib.txt", **{field: 32}).fingerprint()[field] == 32
    with pytest.raises(StreamPruneError, match=f"--{field.replace('_', '-')} must be in"):
        RunConfig(shards=DEMO, out=DEMO, **{field: 0})


def test_the_default_row_multiple_is_32():
    assert RunConfig(shards=DEMO, out=DEMO).row_multiple == DEFAULT_ROW_MULTIPLE == 32


def fitted(arch, sparsity=0.3, given=False, **options):
    cfg = RunConfig(shards=DEMO, out=DEMO, sparsity=sparsity, adaptable=() if given else ("row_multiple",), **options)
    return fit_row_multiple(cfg, arch)


def test_the_default_is_kept_where_the_model_meets_it():
    arch = architecture(json.loads((SHARED / "models" / "kjv-llama-6.8m" / "config.json").read_text()))
    assert fitted(arch) == (RunConfig(shards=DEMO, out=DEMO, adaptable=("row_multiple",)), None, False)


@pytest.mark.parametrize("case, why", [
    ("demo", "own neuron counts or query heads x head_dim (172) are not multiples of 32"),
    ("high sparsity", "this model allows at most"),
])
def test_a_model_that_cannot_meet_the_default_is_cut_as_with_one(case, why):
    """Never refused because of the default: its own sizes (the demo's 172 neurons) or a sparsity the
    aligned cuts cannot reach (8 heads of head_dim 8: at least 4 heads) give --row-multiple 1 and a note."""
    if case == "demo":
        arch, sparsity = architecture(json.loads((DEMO / "stories260K" / "config.json").read_text())), 0.3
    else:
        arch, sparsity = architecture(tiny_config("llama", intermediate=96).to_dict()), 0.8
    cfg, note, lost = fitted(arch, sparsity)
    assert cfg.row_multiple == 1 and why in note and note.startswith("--row-multiple 1, not the default 32")
    assert lost == (case != "demo")  # the demo's own matrices do not quantize whole either: a log-file line only
    given, note, _ = fitted(arch, sparsity, given=True)  # --row-multiple 32 typed: kept, refused where run refuses
    assert given.row_multiple == 32 and note is None
