"""`featx advise`: the decision in each quadrant from synthetic numbers, and the
written pipeline file validates and runs (tiny images, random-init resnet18)."""

import math

import pytest
from click.testing import CliRunner

from featx.advise import (LARGE_IMAGES_PER_CLASS, PROBE_MIN_MARGIN, SIMILAR_MAX_ENTROPY, Measurements, decide,
                          earlier_layer, pipeline_toml, probe_margin)
from featx.cli import cli
from featx.pipeline import load_pipeline

from .conftest import make_split_dataset


def numbers(per_class, entropy, top, earlier, n=400):
    return Measurements(n_classes=10, images_per_class=per_class, entropy=entropy, probe_top=top,
                        probe_earlier=earlier, n_probe=n, top_layer="flatten", earlier_layer="layer3")


QUADRANTS = {
    # images/class, entropy, probe top, probe earlier -> (size, similarity, regime)
    "small, similar": (numbers(40, 0.20, 0.90, 0.75), ("small", "similar", "linear-top")),
    "small, different": (numbers(40, 0.70, 0.55, 0.70), ("small", "different", "linear-earlier")),
    "large, similar": (numbers(2500, 0.15, 0.92, 0.85), ("large", "similar", "finetune-top")),
    "large, different": (numbers(1200, 0.80, 0.60, 0.72), ("large", "different", "finetune-more")),
}


@pytest.mark.parametrize("case", list(QUADRANTS))
def test_each_quadrant(case):
    m, (size, similarity, regime) = QUADRANTS[case]
    a = decide(m)
    assert (a.size, a.similarity, a.regime) == (size, similarity, regime)


def test_reasons_carry_the_numbers():
    a = decide(numbers(40, 0.70, 0.55, 0.70))
    assert a.reasons == (
        "size: 40 train images per class (median) < 1000 -> small",
        "ImageNet entropy: 0.700 mean normalised entropy of the pretrained model's ImageNet predictions (> 0.4) "
        "-> different",
        "linear probe (400 images, CV): top flatten 0.550, earlier layer3 0.700: earlier layer better by 0.150 "
        "(> margin 0.024) -> different",
    )
    assert a.summary == "linear classifier on earlier-layer features"


def test_size_threshold_is_images_per_class():
    assert LARGE_IMAGES_PER_CLASS == 1000
    assert decide(numbers(999, 0.2, 0.9, 0.8)).size == "small"
    assert decide(numbers(1000, 0.2, 0.9, 0.8)).size == "large"


def test_probe_within_its_margin_leaves_the_decision_to_the_entropy():
    m = numbers(40, SIMILAR_MAX_ENTROPY + 0.01, 0.800, 0.810)
    assert probe_margin(m) == pytest.approx(max(PROBE_MIN_MARGIN, math.sqrt(0.805 * 0.195 / 400)))
    a = decide(m)
    assert a.similarity == "different" and "within the margin" in a.reasons[2]
    assert decide(numbers(40, SIMILAR_MAX_ENTROPY, 0.800, 0.810)).similarity == "similar"


def test_a_clear_probe_outweighs_the_entropy():
    a = decide(numbers(40, 0.9, 0.90, 0.70))
    assert a.similarity == "similar"
    assert a.reasons[-1] == "the probe measures this task directly, so it outweighs the entropy -> similar"


def test_without_similarity_measurements_it_assumes_similar():
    a = decide(Measurements(n_classes=3, images_per_class=10))
    assert a.regime == "linear-top" and a.reasons[-1].startswith("no similarity measurement")


def test_earlier_layer_is_the_block_before_the_last_stage():
    assert earlier_layer("resnet18") == "layer3"
    assert earlier_layer("mobilenet_v2") == "features.13"


@pytest.mark.parametrize("case", list(QUADRANTS))
def test_written_pipeline_implements_the_advice_and_validates(tmp_path, case):
    m, _ = QUADRANTS[case]
    a = decide(m)
    (tmp_path / "photos" / "a").mkdir(parents=True)
    text = pipeline_toml(m, a, dataset="photos", backbone="resnet18", weights="none", output_dir="runs/advice")
    (tmp_path / "advice.toml").write_text(text)
    p = load_pipeline(tmp_path / "advice.toml")
    assert text.startswith(f"# Written by `featx advise`: {a.size} and {a.similarity} -> {a.summary}.")
    layers = p.backbones[0]["layers"]
    assert layers == (["flatten"] if a.similarity == "similar" else ["layer3", "flatten"])
    if a.size == "small":
        assert p.finetune is None
    else:
        assert p.finetune["enabled"] and p.finetune["backbone"] == "resnet18"
        assert p.finetune["lr_mult"] == (100.0 if a.similarity == "similar" else 10.0)


def test_advise_measures_writes_and_the_file_runs(tmp_path, monkeypatch):
    make_split_dataset(tmp_path / "colours", counts={"train": 4, "test": 2}, file_name="{name}{i}.jpg")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["advise", "colours", "-b", "resnet18", "-w", "none", "--write", "exp/advice.toml",
                            "--cache", "cache", "--batch-size", "8", "-j", "1", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    assert out[0] == "dataset colours: 18 images, 3 classes; 12 in train"
    assert out[1] == "measured with resnet18 (none) on 12 train images:"
    assert out[2] == "  size: 4 train images per class (median) < 1000 -> small"
    assert out[3].startswith("  ImageNet entropy: ")
    assert out[4].startswith("  linear probe (12 images, CV): top flatten ")
    assert out[-2].startswith("advice: small and ")
    assert out[-1] == "wrote exp/advice.toml (run it with `featx run exp/advice.toml`)"
    p = load_pipeline(tmp_path / "exp" / "advice.toml")
    assert p.dataset["root"] == tmp_path / "colours" and p.output["cache"] == tmp_path / "cache"
    assert p.out_dir == tmp_path / "exp" / "runs" / "advice"
    r = runner.invoke(cli, ["run", "exp/advice.toml", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[2] == "report: exp/runs/advice/report.html"


def test_advise_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["advise", "featx:nothing", "--cache", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 1
    assert r.output == "Error: featx:nothing: featx ships no dataset 'nothing'; it ships featx:clothing-mini\n"
