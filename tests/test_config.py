"""The one table of options (config.RunConfig's fields): the fingerprint that guards resume is what
it was before the table (a journal written then still resumes), and the command line's run, plan
and inspect options and the API's keyword checks come from it."""

from pathlib import Path

import click
import pytest

from streamprune import config
from streamprune.cli import main
from streamprune.config import RunConfig, options_of
from tests.harness import DEMO

MODEL, CALIB = DEMO / "stories260K", DEMO / "calib.txt"


def test_the_fingerprint_of_the_defaults_is_the_one_journals_hold():
    """With --row-multiple 1, the default when those journals were written (a run fits the default 32 to 1
    where the model cannot meet it, as the demo's 172 neurons; where it can, 32 is in the fingerprint)."""
    fp = RunConfig(MODEL, Path("o"), calib=CALIB, row_multiple=1).fingerprint()
    assert fp == {"shards": str(MODEL.resolve()), "sparsity": 0.3, "calib": str(CALIB.resolve()), "samples": 128,
                  "seq_len": 2048, "device": "cpu", "seed": 0, "method": "perturb", "budget": 1.0,
                  "allocation": "global", "compensate": "lsq", "calibrate_on": "pruned",
                  "calib_sha256": "2977d6073b6552646a2c9bf3a1ea0d60184cfd4885275ac6de208c8d42ca88a4"}
    assert RunConfig(MODEL, Path("o"), calib=CALIB).fingerprint() == dict(fp, row_multiple=32)


def test_every_option_set_gives_the_fingerprint_journals_hold():
    """Values recorded with the code before the table (every option other than the default); the
    options that change no output byte are left out, those added later only when set."""
    cfg = RunConfig(MODEL, Path("o"), calib=CALIB, sparsity=0.5, method="flap", budget=2.0, allocation="uniform",
                    compensate="mean", multiple_of=2, row_multiple=32, calibrate_on="dense", batch_size=4,
                    max_memory=2**30, cache_dir=Path("c"), keep_cache=True, survey_only=True, restart=True,
                    progress=False, overlap=False, profile=True, eval=DEMO / "eval.txt", eval_seq_len=64,
                    adaptable=("samples",), seed=7, samples=8, seq_len=64, text_field="body")
    assert cfg.fingerprint() == {
        "shards": str(MODEL.resolve()), "sparsity": 0.5, "calib": str(CALIB.resolve()), "text_field": "body",
        "samples": 8, "seq_len": 64, "device": "cpu", "seed": 7, "method": "flap", "budget": 2.0,
        "allocation": "uniform", "compensate": "mean", "multiple_of": 2, "row_multiple": 32, "calibrate_on": "dense",
        "calib_sha256": "2977d6073b6552646a2c9bf3a1ea0d60184cfd4885275ac6de208c8d42ca88a4"}


def test_the_derived_lists_are_those_of_before():
    assert set(config.NOT_FINGERPRINTED) >= {
        "out", "cache_dir", "keep_cache", "survey_only", "restart", "progress", "batch_size", "max_memory", "overlap",
        "profile", "eval", "eval_dataset", "eval_seq_len", "adaptable"}
    assert set(config.FINGERPRINTED_WHEN_SET) == {"calib_dataset", "text_field", "multiple_of", "row_multiple"}
    assert set(config.SURVEY_FREE) == {"sparsity", "allocation", "method", "budget", "multiple_of", "row_multiple",
                                       "calibrate_on"}


@pytest.mark.parametrize("command", ["run", "plan", "inspect"])
def test_each_commands_options_come_from_the_table(command):
    params = {}
    for p in main.commands[command].params:
        params.setdefault(p.name, p)  # (--compensate, then its alias --no-compensate)
    for field, how in options_of(command):
        p = params[field.name]
        default = p.type.convert(p.default, p, None) if how.kind == "sparsities" else p.default  # (given as text)
        assert p.help == how.help and default == field.default, field.name
        if how.choices:
            assert tuple(p.type.choices) == how.choices
    table = {f.name for f, _ in options_of()}
    assert {n for n in params if n in table} == {f.name for f, _ in options_of(command)}


def test_a_flag_whose_default_is_true_is_spelled_as_its_negation():
    params = {p.name: p for p in main.commands["run"].params}
    assert params["overlap"].opts == ["--no-overlap"] and params["progress"].opts == ["--quiet"]
    assert isinstance(params["keep_cache"], click.Option) and params["keep_cache"].is_flag


def test_the_survey_reuse_help_names_what_the_survey_does_not_depend_on():
    how = dict((f.name, o) for f, o in options_of())["survey_from"]
    named = set(how.help.split("again: any ")[1].split(";")[0].replace(" ", "").split(","))
    assert named == {f"--{name.replace('_', '-')}" for name in config.SURVEY_FREE}
