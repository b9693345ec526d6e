"""Pipeline files and `featx run`: validation messages, the plan, reuse, relative paths, dry runs.

One tiny dataset (3 colours; train 4 / val 2 / test 2 per class) and a random-init
resnet18; the run-and-rerun story is one test so the stages it checks happen in order.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from featx.cli import cli
from featx.pipeline import PACKAGE_DATASET_PREFIX, dump_toml, load_pipeline, resolve_dataset_path

from .conftest import make_split_dataset

PIPELINE = """\
[dataset]
path = "data"

[[backbones]]
name = "resnet18"
weights = "none"
layers = ["layer3", "flatten"]

[classifiers]
names = ["logreg", "linear-svm"]

[classifiers.grids]
logreg = [0.01, 0.1]

[output]
dir = "out"
cache = "cache"

[engine]
batch_size = 8
jobs = 1
"""


def make_data(root: Path):
    return make_split_dataset(root, counts=(4, 2, 2), file_name="{name}{i}.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pipeline") / "data")


@pytest.fixture
def project(tmp_path, data, monkeypatch):
    """tmp/p.toml beside tmp/data (a link to the shared images); cwd = tmp."""
    (tmp_path / "data").symlink_to(data, target_is_directory=True)
    (tmp_path / "p.toml").write_text(PIPELINE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------
# validation: one line, the file, the key, what is allowed


BASE = PIPELINE.split("[output]")[0]

MISTAKES = {
    "syntax": ("[dataset\npath = 1",
               "p.toml: not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 9)"),
    "unknown table": (BASE + "[datset]\npath = 'x'\n",
                      "p.toml: datset: unknown table (did you mean dataset?); allowed: dataset, backbones, "
                      "classifiers, finetune, evaluate, report, output, engine"),
    "unknown key": (BASE.replace('path = "data"', 'path = "data"\nlayuot = "folders"'),
                    "p.toml: dataset.layuot: unknown key (did you mean layout?); allowed: path, layout, "
                    "label_regex, val_fraction, test_fraction, seed"),
    "wrong type": (BASE.replace('layers = ["layer3", "flatten"]', 'layers = "flatten"'),
                   'p.toml: backbones[0].layers: expected a list of strings, got a string ("flatten")'),
    "wrong item type": (BASE.replace('layers = ["layer3", "flatten"]', 'layers = ["layer3", 4]'),
                        "p.toml: backbones[0].layers[1]: expected a string, got an integer (4)"),
    "second table": (BASE + '[[backbones]]\nname = "resnet18"\npool = 3\n',
                     "p.toml: backbones[1].pool: expected a string, got an integer (3)"),
    "missing key": (BASE.replace('path = "data"\n', ""),
                    "p.toml: dataset.path: missing; give the dataset folder or CSV manifest (relative to this "
                    "file), or featx:NAME for a dataset shipped with featx"),
    "missing table": ('[dataset]\npath = "data"\n', "p.toml: backbones: missing; add a [[backbones]] table"),
    "not allowed": (BASE.replace('weights = "none"', 'weights = "none"\npool = "mean"'),
                    'p.toml: backbones[0].pool: "mean" is not allowed; use one of avg, max, avgmax, none, cls'),
    "out of range": (BASE.replace("[classifiers]", "[classifiers]\ncv = 1"),
                     "p.toml: classifiers.cv: 1 must be at least 2"),
    "fractions": (BASE.replace('path = "data"', 'path = "data"\nval_fraction = 0.5\ntest_fraction = 0.5'),
                  "p.toml: dataset.test_fraction: val_fraction + test_fraction = 1 must be below 1"),
    "unknown backbone": (BASE.replace('"resnet18"', '"resnet19"'),
                         'p.toml: backbones[0].name: "resnet19" is not allowed (did you mean resnet18?); use one of '
                         "resnet18, resnet34, resnet50, vgg16, vgg16_bn, alexnet, inception_v3, mobilenet_v2, "
                         "mobilenet_v3_large, efficientnet_b0, densenet121, squeezenet1_1, efficientnet_lite0, "
                         "efficientnet_lite1, efficientnet_lite2, convnext_tiny, convnext_small, convnext_base, "
                         "efficientnet_v2_s, efficientnet_v2_m, regnet_y_1_6gf, regnet_y_16gf, vit_b_16, vit_l_16, "
                         "swin_t, swin_s, maxvit_t, dinov2_vits14, dinov2_vitb14"),
    "unknown layer": (BASE.replace('"layer3"', '"layer9"'),
                      'p.toml: backbones[0].layers[0]: no layer "layer9" in resnet18 (did you mean layer4, layer3, '
                      "layer2?); list them with `featx layers resnet18`"),
    "unknown weights": (BASE.replace('"none"', '"IMAGENET9"'),
                        'p.toml: backbones[0].weights: "IMAGENET9": resnet18 has no weights \'IMAGENET9\'; '
                        "choose from auto, DEFAULT, IMAGENET1K_V1, none, FILE.pth"),
    "missing weights file": (BASE.replace('"none"', '"weights/r18.pth"'),
                             'p.toml: backbones[0].weights: "weights/r18.pth": no such file'),
    "duplicate backbone": (BASE + '[[backbones]]\nname = "resnet18"\nweights = "none"\nlayers = ["layer2"]\n',
                           "p.toml: backbones[1]: same backbone, weights, pool and precision as backbones[0]; "
                           "put all its layers in one table"),
    "unknown classifier": (BASE.replace('"linear-svm"]', '"svm"]'),
                           'p.toml: classifiers.names[1]: "svm" is not allowed (did you mean rbf-svm?); '
                           "use one of logreg, linear-svm, sgd, knn, rbf-svm"),
    "grid of an unlisted classifier": (BASE.replace("logreg = [0.01, 0.1]", "knn = [3]"),
                                       "p.toml: classifiers.grids.knn: knn is not in classifiers.names "
                                       "(logreg, linear-svm)"),
    "bad grid value": (BASE.replace("logreg = [0.01, 0.1]", "logreg = [0.1, -1]"),
                       "p.toml: classifiers.grids.logreg[1]: -1: C must be positive"),
    "pca with sgd": (BASE.replace('"linear-svm"]', '"sgd"]\npca = 16'),
                     "p.toml: classifiers.pca: does not apply to sgd (it streams features; PCA needs them all); "
                     "drop pca or sgd"),
    "scheduler without dask": (BASE + "[engine]\nscheduler = 'tcp://x:8786'\n",
                               'p.toml: engine.scheduler: needs engine.kind = "dask"'),
    "onnx with torch.compile": (BASE + '[engine]\nruntime = "onnx"\ncompile = "on"\n',
                                'p.toml: engine.compile on is torch.compile: use it with engine.runtime torch '
                                '(or auto)'),
    "onnx with bf16": (BASE.replace('weights = "none"\n', 'weights = "none"\nprecision = "bf16"\n')
                       + '[engine]\nruntime = "onnx"\n',
                       'p.toml: engine.runtime onnx computes in fp32; use backbones[0].precision fp32, '
                       'or engine.runtime torch for bf16'),
    "freeze epochs": (BASE + "[finetune]\nepochs = 2\nfreeze_epochs = 3\n",
                      "p.toml: finetune.freeze_epochs: 3 must be at most finetune.epochs (2)"),
    "dataset not found": (BASE.replace('"data"', '"nowhere"'), None),
    "unknown shipped dataset": (BASE.replace('"data"', '"featx:clothing-maxi"'),
                                "p.toml: dataset.path: featx:clothing-maxi: featx ships no dataset 'clothing-maxi'; "
                                "it ships featx:clothing-mini"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_kind_of_mistake_is_one_line_naming_file_key_and_what_is_allowed(project, case):
    text, message = MISTAKES[case]
    if message is None:
        message = f'p.toml: dataset.path: "nowhere": no such file or folder ({project / "nowhere"})'
    (project / "p.toml").write_text(text)
    r = run("run", "p.toml")
    assert r.exit_code == 1
    assert r.output == f"Error: {message}\n"
    assert not (project / "out").exists()          # validated before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_mistake_in_the_file(project):
    (project / "p.toml").write_text(BASE + '[engine]\ndevice = "cuda"\n')
    r = run("run", "p.toml", "--dry-run")
    assert r.exit_code == 1
    assert r.output == 'Error: p.toml: engine.device: "cuda": no CUDA GPU is available here; use auto or cpu\n'


def test_missing_pipeline_file_and_folder(project):
    assert run("run", "nope.toml").output == "Error: nope.toml: no such pipeline file\n"
    assert run("run", "data").output == "Error: data: is a folder; give a pipeline .toml file\n"


# --------------------------------------------------------------------------
# paths


def test_paths_are_relative_to_the_file_not_the_working_folder(project, tmp_path, monkeypatch):
    sub = project / "experiments"
    sub.mkdir()
    (sub / "q.toml").write_text(PIPELINE.replace('"data"', '"../data"').replace('"out"', '"../results/q"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = load_pipeline(Path("..") / "experiments" / "q.toml")
    assert p.dataset["root"] == project / "data"
    assert p.out_dir == project / "results" / "q"
    assert p.output["cache"] == sub / "cache"
    # the default output folder sits beside the file
    (sub / "r.toml").write_text(PIPELINE.replace('"data"', '"../data"').replace('dir = "out"\n', ""))
    assert load_pipeline(sub / "r.toml").out_dir == sub / "runs" / "r"


def test_shipped_dataset_resolves_inside_the_package():
    root = resolve_dataset_path(PACKAGE_DATASET_PREFIX + "clothing-mini")
    assert root.is_dir() and (root / "train" / "dress").is_dir()
    assert root == Path(__import__("featx").__file__).parent / "datasets" / "clothing-mini"


def test_shipped_pipelines_validate():
    repo = Path(__file__).resolve().parents[1]
    quick = load_pipeline(repo / "pipelines" / "quickstart.toml")
    assert quick.dataset["path"] == "featx:clothing-mini"
    assert quick.out_dir == repo / "runs" / "quickstart" and quick.output["cache"] == repo / "cache"
    assert [b["layers"] for b in quick.backbones] == [["features.13", "flatten"]]
    assert quick.classifiers["names"] == ["logreg", "linear-svm"]
    clothing = load_pipeline(repo / "pipelines" / "clothing.toml") \
        if (repo.parent / "shared" / "data" / "clothing-small").is_dir() else None
    if clothing is not None:
        assert clothing.dataset["root"] == (repo.parent / "shared" / "data" / "clothing-small").resolve()


@pytest.mark.parametrize("template, dataset", [("template-folders.toml", "photos"), ("template-csv.toml", "photos.csv")])
def test_templates_validate_once_their_dataset_exists(tmp_path, template, dataset):
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "pipelines" / template, tmp_path / template)
    if dataset.endswith(".csv"):
        (tmp_path / dataset).write_text("path,label\nx.jpg,a\n")
    else:
        (tmp_path / dataset).mkdir()
    p = load_pipeline(tmp_path / template)
    assert p.dataset["root"] == tmp_path / dataset
    assert p.out_dir.parent == tmp_path / "runs"


def test_resolved_copy_round_trips(project):
    p = load_pipeline("p.toml")
    text = dump_toml(p.resolved(), "resolved")
    (project / "copy.toml").write_text(text)
    q = load_pipeline(project / "copy.toml")
    assert q.dataset["root"] == p.dataset["root"] and q.backbones == p.backbones
    assert q.out_dir == p.out_dir and q.engine == p.engine
    # the copy spells out the default grid: the same models, so they are reused
    from featx.classify import CLASSIFIERS
    assert q.classifiers == {**p.classifiers, "grids": {"logreg": [0.01, 0.1],
                                                        "linear-svm": list(CLASSIFIERS["linear-svm"].grid)}}


# --------------------------------------------------------------------------
# the plan and reuse


def _mtimes(folder: Path, pattern: str) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def _action(plan_line: str) -> str:
    return next(a for a in ("compute", "cached", "reuse", "skip") if f"  {a}" in plan_line)


def _summary_tail(output: str) -> str:
    return output.strip().splitlines()[-1].rsplit(" (", 1)[0]


@pytest.mark.slow
def test_plan_run_and_reuse(project):
    # dry run on a fresh project: the plan, nothing written
    r = run("run", "p.toml", "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "pipeline p.toml -> out",
        "dataset data: 24 images, 3 classes (train 12, val 6, test 6)",
        "cache cache",
        "extract   resnet18 layer3 (avg, fp32)            compute  24 of 24 images",
        "extract   resnet18 flatten (avg, fp32)           compute  24 of 24 images",
        "train     resnet18 layer3 logreg                 compute  C: 2 values",
        "train     resnet18 layer3 linear-svm             compute  C: 1e-06..1e+05 (adaptive)",
        "train     resnet18 flatten logreg                compute  C: 2 values",
        "train     resnet18 flatten linear-svm            compute  C: 1e-06..1e+05 (adaptive)",
        "finetune  -                                      skip     no [finetune] table",
        "evaluate  best model on test                     compute  (best model known after training)",
        "report    report.html, metrics.json, comparison  compute",
        "8 to compute, 0 cached or reused",
        "dry run: nothing was computed or written",
    ]
    assert not (project / "out").exists()

    # first run: everything computed, every output written
    r = run("run", "p.toml", "-q")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("best model: resnet18 ") and ", chosen by val score " in lines[0]
    assert lines[1].startswith("test accuracy: ") and "(6 images), macro-F1 " in lines[1]
    assert lines[2:4] == ["report: out/report.html", "bundle: out/best.featx"]
    assert _summary_tail(r.output) == "computed: 2 feature sets, 4 models, 1 evaluation, 1 report; reused: nothing"
    out = project / "out"
    for name in ["pipeline.toml", "stages.json", "metrics.json", "comparison.csv", "comparison.md",
                 "confusion_matrix.png", "predictions.csv", "report.html", "best.featx/manifest.json"]:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["chosen_by"] == "val/CV score" and len(metrics["comparison"]) == 4
    assert metrics["evaluation"]["split"] == "test" and metrics["evaluation"]["n"] == 6
    assert load_pipeline(out / "pipeline.toml").backbones[0]["layers"] == ["layer3", "flatten"]
    assert "selected (best val/CV score)" in (out / "comparison.md").read_text()
    bundle = json.loads((out / "best.featx" / "manifest.json").read_text())
    assert bundle["kind"] == "linear" and bundle["pipeline"]["file"] == str(project / "p.toml")
    entries = _mtimes(project / "cache", "*/seg-*.h5")
    models = _mtimes(out / "models", "*/model.json")
    assert len({k.split("/")[0] for k in entries}) == 2 and len(models) == 4     # segments of 2 entries
    # one key per fit: a model is named by its digest in the fit store that `featx compare` shares
    for model_id, record in json.loads((out / "stages.json").read_text())["train"].items():
        assert model_id.endswith("-" + record["digest"][:10]), model_id
        assert (project / "cache" / "results" / record["digest"] / "record.json").is_file()

    # unchanged: nothing extracted, nothing trained, and it says what it reused
    r = run("run", "p.toml")
    assert r.exit_code == 0, r.output
    assert "[extract] resnet18 flatten (avg, fp32): cached (24 images)" in r.stderr
    assert r.stderr.count(": reused models/") == 4
    assert "[report] reused" in r.stderr
    assert _summary_tail(r.stdout) == "computed: nothing; reused: 2 feature sets, 4 models, 1 evaluation, 1 report"
    assert _mtimes(project / "cache", "*/seg-*.h5") == entries and _mtimes(out / "models", "*/model.json") == models

    # a classifier's grid changes: that classifier re-trains on both layers, nothing is extracted
    (project / "p.toml").write_text(PIPELINE.replace("logreg = [0.01, 0.1]", "logreg = [0.01, 1.0]"))
    plan = run("run", "p.toml", "--dry-run").output.splitlines()[3:12]
    assert [_action(line) for line in plan] == ["cached", "cached", "compute", "reuse", "compute", "reuse",
                                                "skip", "compute", "compute"]
    r = run("run", "p.toml", "-q")
    assert _summary_tail(r.output) == "computed: 2 models, 1 evaluation, 1 report; reused: 2 feature sets, 2 models"
    assert _mtimes(project / "cache", "*/seg-*.h5") == entries

    # a layer changes: only that layer is extracted, only its models are trained
    (project / "p.toml").write_text(PIPELINE.replace('"layer3"', '"layer2"').replace("[0.01, 0.1]", "[0.01, 1.0]"))
    r = run("run", "p.toml")
    assert r.exit_code == 0, r.output
    assert "[extract] resnet18 (none): layer2, flatten in one pass" in r.stderr
    # the best model stays a flatten one: its evaluation stands, the report (new rows) is redone
    assert _summary_tail(r.stdout) == "computed: 1 feature set, 2 models, 1 report; " \
                                      "reused: 1 feature set, 2 models, 1 evaluation"
    now = _mtimes(project / "cache", "*/seg-*.h5")
    assert len({k.split("/")[0] for k in now}) == 3 and all(now[k] == v for k, v in entries.items())

    # --force train refits every model and extracts nothing; the refits are the same
    # bytes (same inputs, same seed), so the evaluation of the best one still holds
    r = run("run", "p.toml", "--force", "train", "-q")
    assert _summary_tail(r.output) == "computed: 4 models; reused: 2 feature sets, 1 evaluation, 1 report"
    assert _mtimes(project / "cache", "*/seg-*.h5") == now

    # --force extract recomputes the features; the models stay valid (same inputs, same numbers)
    r = run("run", "p.toml", "--force", "extract")
    assert "--force extract: dropping cache entry" in r.stderr
    assert _summary_tail(r.stdout) == "computed: 2 feature sets; reused: 4 models, 1 evaluation, 1 report"

    # --force evaluate rewrites the bundle and its evaluation, and so the report
    r = run("run", "p.toml", "--force", "evaluate", "-q")
    assert _summary_tail(r.output) == "computed: 1 evaluation, 1 report; reused: 2 feature sets, 4 models"


@pytest.mark.slow
def test_finetune_stage_runs_and_is_reused(project, monkeypatch):
    import sys

    import featx.backbones
    import featx.finetune.trainer
    callers = []
    real = featx.backbones.resolve_weights

    def counted(*args, **kwargs):   # the real resolver; who called it is noted
        callers.append(sys._getframe(1).f_code.co_name)
        return real(*args, **kwargs)
    monkeypatch.setattr(featx.backbones, "resolve_weights", counted)
    monkeypatch.setattr(featx.finetune.trainer, "resolve_weights", counted)
    text = PIPELINE.replace('["layer3", "flatten"]', '["flatten"]').replace('"linear-svm"', '"knn"') \
        .replace("logreg = [0.01, 0.1]", "logreg = [0.1]")
    text = text.replace("jobs = 1", "jobs = 1\nworkers = 0")
    text += "\n[finetune]\nepochs = 1\nimage_size = 32\nbatch_size = 3\nmax_train_images = 6\npatience = 0\n"
    (project / "p.toml").write_text(text)
    r = run("run", "p.toml", "-q")
    assert r.exit_code == 0, r.output
    assert _summary_tail(r.output) == ("computed: 1 feature set, 2 models, 1 fine-tuned model, 1 evaluation, "
                                       "1 report; reused: nothing")
    rows = json.loads((project / "out" / "metrics.json").read_text())["comparison"]
    assert sorted(x["classifier"] for x in rows) == ["finetune", "knn", "logreg"]
    assert (project / "out" / "finetune.featx" / "manifest.json").is_file()
    # weights are resolved once, at load (the [[backbones]] table's, which [finetune] shares):
    # neither the plan's stage key nor the trainer resolves them again
    assert callers and not {"_finetune_inputs", "_plan"} & set(callers), callers
    r = run("run", "p.toml", "-q")
    assert _summary_tail(r.output) == ("computed: nothing; reused: 1 feature set, 2 models, 1 fine-tuned model, "
                                       "1 evaluation, 1 report")
    # switched off: the stage is skipped, the rest reused
    (project / "p.toml").write_text(text.replace("[finetune]\n", "[finetune]\nenabled = false\n"))
    assert "finetune  -" in run("run", "p.toml", "--dry-run").output


def test_force_rejects_unknown_stages(project):
    r = run("run", "p.toml", "--force", "fit")
    assert r.exit_code == 2 and "'fit' is not one of 'extract', 'train', 'finetune', 'evaluate', 'report', 'all'" in r.output


def test_dask_engine_is_validated_and_passed_through(project, monkeypatch):
    pytest.importorskip("distributed")
    (project / "p.toml").write_text(PIPELINE.replace("jobs = 1", 'jobs = 1\nkind = "dask"\nscheduler = "tcp://127.0.0.1:1"\nshard_size = 8'))
    p = load_pipeline("p.toml")
    assert p.engine["kind"] == "dask" and p.engine["scheduler"] == "tcp://127.0.0.1:1"
    import featx.distributed as dist
    seen = {}

    def fake_engine(kind, scheduler=None, *, shard_size=None, notify=None, **_):
        seen.update(kind=kind, scheduler=scheduler, shard_size=shard_size)
        raise dist.FeatxError("no scheduler here")
    monkeypatch.setattr(dist, "engine", fake_engine)
    r = run("run", "p.toml", "-q")
    assert r.output == "Error: no scheduler here\n"
    assert seen == {"kind": "dask", "scheduler": "tcp://127.0.0.1:1", "shard_size": 8}


def test_an_int8_dry_run_writes_nothing(project, featx_home):
    pytest.importorskip("onnxruntime")
    (project / "p.toml").write_text(PIPELINE.replace('layers = ["layer3", "flatten"]\n',
                                                     'layers = ["flatten"]\nprecision = "int8"\n'))
    r = run("run", "p.toml", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "extract   resnet18 flatten (avg, int8)" in r.output and "compute  24 of 24 images" in r.output
    # not even the calibration record: it is written when int8 features are extracted (reading the
    # dataset keeps its file hashes, hashes.sqlite, as every command does)
    assert not (project / "cache" / "onnx").exists() and not any(featx_home.iterdir())
    assert [p.name for p in project.rglob("*") if p.is_file() and "data" not in p.relative_to(project).parts
            and p.name != "p.toml"] == ["hashes.sqlite"]


@pytest.mark.slow
def test_an_int8_pipeline_knows_its_keys_before_extracting_and_reruns_nothing(project):
    pytest.importorskip("onnxruntime")
    toml = PIPELINE.replace('layers = ["layer3", "flatten"]\n', 'layers = ["flatten"]\nprecision = "int8"\n')
    (project / "p.toml").write_text(toml.replace('names = ["logreg", "linear-svm"]', 'names = ["logreg"]'))
    r = run("run", "p.toml", "-q")
    assert r.exit_code == 0, r.output
    assert _summary_tail(r.output) == "computed: 1 feature set, 1 model, 1 evaluation, 1 report; reused: nothing"
    (entry,) = [p.name for p in (project / "cache").iterdir() if "-int8-" in p.name]
    r = run("run", "p.toml")
    assert r.exit_code == 0, r.output
    assert "[extract] resnet18 flatten (avg, int8): cached (24 images)" in r.stderr
    assert _summary_tail(r.stdout) == "computed: nothing; reused: 1 feature set, 1 model, 1 evaluation, 1 report"
    bundle = json.loads((project / "out" / "best.featx" / "manifest.json").read_text())
    assert bundle["features"]["key"] == entry          # and it keeps its ranges, to predict anywhere
    assert list(bundle["int8"]) == [json.loads(bundle["features"]["spec"])["calibration"]]
    (project / "p.toml").write_text(toml.replace("[engine]\n", '[engine]\nkind = "dask"\n'))
    r = run("run", "p.toml")
    assert r.exit_code == 1 and "engine.kind: Dask workers do not run int8 (backbones[0].precision)" in r.output
