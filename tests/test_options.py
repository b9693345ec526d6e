"""One declaration per option (featx.options): the click options, the pipeline schema
and the library functions all follow the tables."""

import importlib
import inspect

import click
import pytest
from click.testing import CliRunner

from featx import options
from featx.cli import cli
from featx.options import CLASSIFY, DATASET, EXTRACT, FINETUNE, Option, click_options, problem


def _help(*command):
    r = CliRunner().invoke(cli, [*command, "-h"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("command, tables", [
    (("extract",), (EXTRACT, DATASET)), (("train",), (EXTRACT, DATASET, CLASSIFY)),
    (("compare",), (EXTRACT, DATASET, CLASSIFY)), (("finetune",), (FINETUNE, DATASET))])
def test_every_option_of_a_table_is_on_its_commands(command, tables):
    text = _help(*command)
    for table in tables:
        for o in table:
            assert o.cli_flag in text, (command, o.cli_flag)
            first_words = o.help.split("[")[0].split()[:3]
            assert " ".join(first_words) in " ".join(text.split()), (command, o.name)


def test_every_option_with_a_table_is_a_pipeline_key_with_its_default_and_choices():
    from featx.pipeline import SCHEMA
    for table in (DATASET, EXTRACT, CLASSIFY, FINETUNE):
        for o in table:
            if o.table is None:
                continue
            key = SCHEMA[o.table][o.name]
            assert (key.kind, key.default) == (o.kind, o.default), o.name
            assert key.choices == o.choices, o.name


def _defaults(func):
    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_library_functions_default_to_the_tables():
    ex = importlib.import_module("featx.extract")
    finetune = importlib.import_module("featx.finetune").finetune
    open_dataset = importlib.import_module("featx.data").open_dataset
    compare = importlib.import_module("featx.train").compare
    # extraction: what is computed (the "backbones" keys) goes to feature_specs, how it runs to RunOptions
    what = tuple(o for o in EXTRACT if o.table == "backbones")
    how = tuple(o for o in EXTRACT if o.table != "backbones")
    for func, table, skip in ((ex.feature_specs, what, ()), (ex.RunOptions, how, ()), (finetune, FINETUNE, ()),
                              (open_dataset, DATASET, ()),
                              # jobs/threads: the CLI uses every core, the library one unless asked
                              (compare, CLASSIFY, ("jobs", "threads"))):
        got = _defaults(func)
        for o in table:
            if o.name in skip:
                continue
            assert o.name in got, (func.__name__, o.name)
            assert got[o.name] == o.default, (func.__name__, o.name, got[o.name], o.default)
    assert {o.name for o in EXTRACT} <= set(ex._SPEC_OPTIONS) | set(ex._RUN_OPTIONS)   # extract(ds, "name", **them)


def test_a_newcomer_adds_an_option_in_one_place(monkeypatch):
    from featx.pipeline import schema
    new = Option("tile_size", "int", None, "Split big images into tiles of this many pixels.", low=32, table="engine")
    monkeypatch.setattr(options, "EXTRACT", options.EXTRACT + (new,))

    @click.command()
    @click_options(options.EXTRACT)
    def extract_like(**kw):
        click.echo(repr(kw["tile_size"]))

    r = CliRunner().invoke(extract_like, ["--help"])
    assert "--tile-size" in r.output and "Split big images into tiles" in r.output
    assert CliRunner().invoke(extract_like, ["--tile-size", "64"]).output.strip() == "64"
    bad = CliRunner().invoke(extract_like, ["--tile-size", "8"])
    assert bad.exit_code == 2 and "8 is not in the range x>=32" in bad.output
    keys = schema._keys(options.EXTRACT, "engine")
    assert keys["tile_size"].default is None and keys["tile_size"].check(8) == "must be at least 32"


def test_problems_read_the_same_everywhere():
    assert problem(DATASET[2], 1.0) == "must be in [0, 1)"
    assert problem(FINETUNE[2], 0.0) == "must be above 0"
    assert problem(CLASSIFY[0], 1) == "must be at least 2"
    assert problem(EXTRACT[0], "mean") == "must be one of avg, max, avgmax, none, cls"
    assert problem(EXTRACT[0], "avg") is None
