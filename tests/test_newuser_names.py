"""Issue 19, item 7: backbone and layer names are checked, in any case, before
the dataset is read; suggestions name only what `featx layers` lists."""

import pytest
from click.testing import CliRunner

from featx.backbones import get_backbone
from featx.cli import cli
from featx.errors import did_you_mean
from featx.extract import layer_table

KNOWN = ("resnet18, resnet34, resnet50, vgg16, vgg16_bn, alexnet, inception_v3, mobilenet_v2, mobilenet_v3_large, "
         "efficientnet_b0, densenet121, squeezenet1_1, efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, "
         "convnext_tiny, convnext_small, convnext_base, efficientnet_v2_s, efficientnet_v2_m, regnet_y_1_6gf, "
         "regnet_y_16gf, vit_b_16, vit_l_16, swin_t, swin_s, maxvit_t, dinov2_vits14, dinov2_vitb14")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def nowhere(tmp_path):
    # the names are checked first: a dataset that does not exist is never reached
    return tmp_path / "no-such-dataset"


@pytest.mark.parametrize("command", [
    ["extract"], ["train", "-o", "m.featx"], ["compare"], ["finetune", "-o", "m.featx"], ["advise"]])
def test_a_mistyped_backbone_is_named_with_a_suggestion_before_the_dataset(command, nowhere):
    r = run(command[0], nowhere, "-b", "mobilenet2", *command[1:])
    assert r.exit_code == 1
    assert r.output == f"Error: unknown backbone 'mobilenet2'; known: {KNOWN} (did you mean mobilenet_v2?)\n"


@pytest.mark.parametrize("command", [["extract"], ["train", "-o", "m.featx"], ["compare"]])
def test_a_mistyped_layer_suggests_listed_layers_and_names_the_backbone(command, nowhere):
    r = run(command[0], nowhere, "-b", "mobilenet_v2", "-l", "features.99", *command[1:])
    assert r.exit_code == 1
    assert r.output == ("Error: --layer features.99: no such layer in mobilenet_v2; did you mean features.9, "
                        "features.8, features.7? (list them with `featx layers mobilenet_v2`)\n")
    listed = {row["layer"] for row in layer_table("mobilenet_v2")}
    assert {"features.9", "features.8", "features.7"} <= listed and "features.9.add" not in listed


def test_backbone_names_in_any_case(nowhere):
    assert get_backbone("MobileNet_V2").name == "mobilenet_v2"
    r = run("extract", nowhere, "-b", "MobileNet_V2", "-l", "features.9.add")   # a graph node: valid, unlisted
    assert r.exit_code == 1
    assert r.output.splitlines()[-1].startswith(f"Error: {nowhere}: ")     # got as far as the dataset
    assert did_you_mean("RESNET19", ["resnet18", "vgg16"]) == "did you mean resnet18?"
    assert did_you_mean("zzz", ["resnet18"]) == ""


def test_pipeline_files_use_the_same_suggestions():
    from featx.pipeline import check_layer
    assert check_layer("mobilenet_v2", "features.99") == (
        'no layer "features.99" in mobilenet_v2 (did you mean features.9, features.8, features.7?); '
        "list them with `featx layers mobilenet_v2`")
