"""The featx command as a user meets it: exact messages, no tracebacks."""

import pytest
from click.testing import CliRunner

from featx.cli import cli


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()

    def _run(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return _run


def test_backbones_lists_every_required_backbone_with_availability(run):
    r = run("backbones")
    assert r.exit_code == 0
    for name in ["resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "alexnet", "inception_v3",
                 "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "squeezenet1_1"]:
        assert f"\n{name} " in r.output
    line = next(l for l in r.output.splitlines() if l.startswith("mobilenet_v2 "))
    assert "IMAGENET1K_V1 (offline)" in line and " 1280 " in line
    assert "299px" in next(l for l in r.output.splitlines() if l.startswith("inception_v3 "))


def test_layers_shows_shapes(run):
    r = run("layers", "mobilenet_v2")
    assert r.exit_code == 0
    assert "flatten  (default)" in r.output
    assert "features.18" in r.output and "1280x7x7" in r.output


def test_unknown_backbone_is_one_line(run):
    r = run("layers", "resnet9000")
    assert r.exit_code == 1
    from featx.backbones import list_backbones
    known = list_backbones()
    assert known[:13] == ["resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "alexnet", "inception_v3",
                          "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "squeezenet1_1",
                          "efficientnet_lite0"]
    assert r.output == f"Error: unknown backbone 'resnet9000'; known: {', '.join(known)} (did you mean resnet50?)\n"


def test_extract_then_cache_ls_info_rm(run, folder_dataset, tmp_path):
    cache = tmp_path / "cache"
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "none", "--batch-size", "8", "-q", "--cache", cache)
    assert r.exit_code == 0, r.output
    assert "extracted 24 images" in r.output
    assert "features: " in r.output and "(24 x 512)" in r.output
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "none", "-q", "--cache", cache)
    assert "nothing to extract: all 24 images already cached" in r.output

    r = run("cache", "ls", "--cache", cache)
    assert "resnet18-none-flatten-avg-fp32-" in r.output and " 24 " in r.output
    r = run("cache", "info", "resnet18-none", "--cache", cache)
    assert r.exit_code == 0
    fields = dict(line.split(None, 1) for line in r.output.splitlines() if line.strip())
    assert fields["images"].strip() == "24" and fields["dims"].strip() == "512"
    assert "dataset" in r.output and "shapes (24 images, 3 classes)" in r.output
    r = run("cache", "rm", "resnet18-none", "--cache", cache)
    assert r.output.startswith("removed resnet18-none-flatten-avg-fp32-")
    assert run("cache", "ls", "--cache", cache).output == f"no cache entries in {cache}\n"


def test_cache_info_unknown_key(run, tmp_path):
    r = run("cache", "info", "nothing-here", "--cache", tmp_path)
    assert r.exit_code == 1
    assert r.output == f"Error: no cache entry 'nothing-here' in {tmp_path} (see `featx cache ls`)\n"


def test_extract_errors_name_the_option(run, folder_dataset, tmp_path):
    r = run("extract", tmp_path / "missing", "--cache", tmp_path / "c")
    assert r.exit_code == 1 and r.output == f"Error: {tmp_path / 'missing'}: no such file or folder\n"
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "IMAGENET9", "--cache", tmp_path / "c")
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == ("Error: --weights IMAGENET9: resnet18 has no weights 'IMAGENET9'; "
                                         "choose from auto, DEFAULT, IMAGENET1K_V1, none, FILE.pth")
    r = run("extract", folder_dataset, "-w", tmp_path / "nope.pth", "--cache", tmp_path / "c")
    assert r.output.splitlines()[-1] == f"Error: --weights {tmp_path / 'nope.pth'}: no such file"
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "none", "--device", "tpu", "--cache", tmp_path / "c")
    assert r.output.splitlines()[-1] == "Error: --device tpu: use auto, cpu or cuda[:N]"


def test_strict_stops_on_a_bad_image_with_one_line(run, folder_dataset, tmp_path):
    (folder_dataset / "red" / "bad.png").write_text("nope")
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "none", "--strict", "-q", "--cache", tmp_path / "c")
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == (f"Error: {folder_dataset / 'red' / 'bad.png'}: not an image (unknown format) "
                                         "(--strict stops at the first bad image)")


def test_missing_file_in_a_csv_is_counted_and_stops_a_strict_run(run, folder_dataset, tmp_path):
    rows = [f"{p},{p.parent.name}" for p in sorted(folder_dataset.glob("*/*.png"))]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows + [f"{folder_dataset}/red/gone.png,red"]) + "\n")
    base = ("extract", tmp_path / "m.csv", "-b", "resnet18", "-w", "none", "-q", "--cache", tmp_path / "c")
    r = run(*base, "--strict")
    assert r.exit_code == 1
    assert r.output.splitlines()[-1].startswith(f"Error: {folder_dataset}/red/gone.png: ")
    assert r.output.splitlines()[-1].endswith("(--strict stops at the first bad image)")
    r = run(*base)
    assert r.exit_code == 0 and "; 0 were cached; 1 skipped" in r.output


def test_a_dataset_with_no_readable_image_fails_and_leaves_the_cache_usable(run, folder_dataset, tmp_path):
    bad = tmp_path / "bad"
    for name in ("a", "b"):
        (bad / name).mkdir(parents=True)
        (bad / name / "1.jpg").write_text(f"not a photo of {name}")
    cache = tmp_path / "c"
    r = run("extract", bad, "-b", "resnet18", "-w", "none", "-q", "--cache", cache)
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == (f"Error: {bad}: none of its 2 images could be read "
                                         f"(first: {bad / 'a' / '1.jpg'}: not an image (unknown format))")
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "none", "-q", "--cache", cache)
    assert r.exit_code == 0, r.output
    assert "extracted 24 images" in r.output and not list(cache.glob("*.tmp-*"))
    r = run("extract", folder_dataset, "-b", "resnet18", "-w", "none", "-q", "--cache", cache)
    assert "nothing to extract: all 24 images already cached" in r.output


def test_the_console_entry_point_keeps_exit_codes_and_flushes_its_output(folder_dataset, tmp_path):
    """main() leaves with os._exit once torch is loaded (its teardown cost a second): the
    output still arrives whole, through a pipe, and failures still exit non-zero."""
    import subprocess
    import sys
    entry = [sys.executable, "-c", "from featx.cli import main; main()"]
    ok = subprocess.run([*entry, "extract", str(folder_dataset), "-b", "resnet18", "--weights", "none", "-q",
                         "--cache", str(tmp_path / "c")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("extracted 24 images in ") and ok.stdout.rstrip().endswith("(24 x 512)")
    bad = subprocess.run([*entry, "extract", str(folder_dataset), "-b", "resnet18", "--weights", "none",
                          "--precision", "int8", "--runtime", "torch", "--cache", str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("Error: --precision int8 runs on ONNX Runtime")
    usage = subprocess.run([*entry, "extract", "--no-such-option"], capture_output=True, text=True)
    assert usage.returncode == 2 and "No such option '--no-such-option'" in usage.stderr


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path):
    import importlib

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module("featx.extract"), "extract", interrupted)
    root = tmp_path / "d" / "a"
    root.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(root / "x.png")
    r = CliRunner().invoke(cli, ["extract", str(tmp_path / "d"), "-b", "resnet18", "-w", "none",
                                 "--cache", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 130
    assert r.output.strip().splitlines()[-1] == ("interrupted: nothing is left half-written and finished work is "
                                                 "kept; run the same command again to go on")
