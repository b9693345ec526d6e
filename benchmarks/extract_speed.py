"""How fast is featx extract, against the loop tutorials write and the
model's own compute ceiling? All numbers come from one process run on the
same images.

    python benchmarks/extract_speed.py                    # mobilenet_v2 and resnet50
    python benchmarks/extract_speed.py --backbone mobilenet_v2 --n 512

(a) naive: PIL open + weights.transforms() per image in the main process,
    stack 32, fp32 forward (model as torchvision builds it), append to a list
(b) forward only: featx's network (BN folded into convs, channels_last,
    inference_mode) on pre-made uint8 batches, in the precision featx uses,
    run by torch (eager, compiled) and by ONNX Runtime: the compute ceilings
(c) featx extract end to end, cold cache, HDF5 writes included: with
    --runtime torch (--compile off/on) and with the defaults
    (--runtime auto: ONNX Runtime for fp32 on CPU)

Also: where featx's time goes (decode, forward, write), peak RSS for N and
4N images (extraction streams, so it must not grow), and the downstream
accuracy of a logistic-regression probe on fp32 vs reduced-precision
features of the same images.

Images: ../shared/data/clothing-small when present, else generated JPEGs
of the same size range (600-900 px).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "clothing-small"


def image_list(n: int, workdir: Path) -> list[Path]:
    if SHARED.is_dir():
        paths = sorted(SHARED.glob("train/*/*.jpg")) + sorted(SHARED.glob("test/*/*.jpg"))
        rng = np.random.default_rng(0)
        return [paths[i] for i in rng.permutation(len(paths))[:n]]
    from PIL import Image
    out = workdir / "generated"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = out / f"c{i % 10}" / f"{i}.jpg"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(600, 900)), int(rng.integers(600, 900))
            base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            Image.fromarray(base).resize((w, h), Image.BILINEAR).save(p, quality=90)
        paths.append(p)
    return paths


def samples_for(paths):
    from featx.data import Sample, content_id
    return [Sample(p, p.parent.name, "train", content_id(p)) for p in paths]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def naive(backbone: str, weights, paths, batch=32, device="cpu"):
    """What a tutorial does (on a GPU: model and batch moved there, fp32)."""
    from PIL import Image
    lb = __import__("featx").load_backbone(backbone, weights)
    enum = lb.info.weights_enum
    tv_weights = enum[lb.weights.name] if lb.weights.kind == "torchvision" else enum.DEFAULT
    transform = tv_weights.transforms()
    model = lb.model.to(device)
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), batch):
            xs = [transform(Image.open(p).convert("RGB")) for p in paths[s:s + batch]]
            feats.append(model(torch.stack(xs).to(device)).cpu().numpy())
    return len(paths) / (time.perf_counter() - t0)


def tuned(backbone: str, weights, paths, batch=32, device="cpu"):
    """A carefully written PyTorch loop: a DataLoader with one decode worker
    per core running weights.transforms(), channels_last, inference_mode."""
    import os

    from PIL import Image
    lb = __import__("featx").load_backbone(backbone, weights)
    enum = lb.info.weights_enum
    transform = (enum[lb.weights.name] if lb.weights.kind == "torchvision" else enum.DEFAULT).transforms()

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB"))

    model = lb.model.eval().to(device).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=os.cpu_count() or 1,
                                         pin_memory=torch.device(device).type == "cuda")
    with torch.inference_mode():
        for x in loader:
            model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)).cpu()
    return len(paths) / (time.perf_counter() - t0)


def whole_command(backbone, weights, paths, precision, cache_dir, device="cpu", extra=(), home=None):
    """``featx extract`` as a user runs it: a new process over a folder of
    ``paths`` (symlinked), timed from outside, start to exit. ``home``: its
    per-user folder (FEATX_HOME, where exported networks are kept for every
    cache folder); a new one is a first-ever run."""
    import shutil
    root = Path(cache_dir) / "images"
    if root.exists():
        shutil.rmtree(root)
    for i, p in enumerate(paths):
        q = root / p.parent.name / f"{i:05d}{p.suffix}"
        q.parent.mkdir(parents=True, exist_ok=True)
        q.symlink_to(p.resolve())
    featx_bin = Path(sys.executable).with_name("featx")
    cmd = [str(featx_bin), "extract", str(root), "-b", backbone, "--weights", weights, "--precision", precision,
           "--device", device, "--cache", str(Path(cache_dir) / "cache"), "--quiet", *extra]
    t0 = time.perf_counter()
    env = {**os.environ, "FEATX_HOME": str(home)} if home is not None else None
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-300:]}")
    return len(paths) / dt


def startup(backbone, weights, n=64):
    """Where the seconds before the first batch go, each measured alone:
    importing featx's CLI with torch, building the network, exporting it to
    ONNX (and what the stored export costs instead), starting ONNX Runtime,
    and the decode workers' first batch."""
    import featx
    from featx.extract import ImageBatches, OnnxForward
    from featx.quantize import ModelStore
    out = {}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import os, featx.cli, featx.extract; os._exit(0)"], check=True)
    out["new process: import featx and torch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import os, featx.cli, featx.extract, featx.backbones as b; "
                    f"b.resolve_weights({backbone!r}, {weights!r}); os._exit(0)"], check=True)
    out["new process: the same + resolve the weights (registry, torchvision's table)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import os, featx.cli, featx.extract, torchvision; os._exit(0)"],
                   check=True)
    out["new process: import featx, torch and torchvision (building a network needs it)"] = \
        time.perf_counter() - t0
    featx.backbones.registry()   # the parts below are timed with their modules imported, as in a command
    __import__("onnxruntime.quantization")
    t0 = time.perf_counter()
    lb = featx.load_backbone(backbone, weights)
    out["build the network, load weights"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        store = ModelStore(d, shared=None)
        t0 = time.perf_counter()
        OnnxForward(lb, [lb.info.default_layer], "avg", store=store)
        out["ONNX export + check + session (first run)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        OnnxForward(lb, [lb.info.default_layer], "avg", store=store)
        out["session from the stored export (later runs)"] = time.perf_counter() - t0
    paths = image_list(n, Path(tempfile.gettempdir()))
    t0 = time.perf_counter()
    batches = ImageBatches(paths, lb.preprocess, batch_size=32, workers=None, progress=False)
    next(iter(batches))
    out["decode workers: first batch"] = time.perf_counter() - t0
    batches.close()
    return out


def threads_vs_workers(backbone, weights, paths, precision, work: Path):
    """Whole featx extract (in-process) for each split of the cores between
    ONNX Runtime's threads and decode workers. One cache whose entries are
    dropped between runs: the stored export (and int8 model) are shared."""
    import os
    import featx
    cpus = os.cpu_count() or 1
    rows = []
    saved = torch.get_num_threads()
    cache = featx.FeatureCache(work / "tw")
    featx.extract(samples_for(paths[:8]), backbone, weights=weights, precision=precision, cache=cache,
                  progress=False, runtime="onnx")   # the store is filled before any timing
    for threads in sorted({1, max(1, cpus // 2), cpus}):
        for workers in sorted({1, max(1, cpus - 1), cpus, cpus + 1}):
            for key in cache.keys():
                cache.remove(key)
            torch.set_num_threads(threads)   # ONNX Runtime's intra-op threads follow torch's
            t0 = time.perf_counter()
            rep = featx.extract(samples_for(paths), backbone, weights=weights, precision=precision, cache=cache,
                                progress=False, workers=workers)
            rows.append((threads, workers, rep.n_extracted / (time.perf_counter() - t0)))
    torch.set_num_threads(saved)
    return rows


def forward_only(backbone, weights, n, precision, compile=False, batch=32, plain=False, onnx=False, device="cpu",
                 int8=False):
    """Forward passes on pre-made batches: ``plain`` = the torchvision model as
    built (fp32, NCHW); ``onnx`` = featx's ONNX Runtime forward; else
    featx's torch Forward (folded BN, channels_last, optionally compiled;
    compile and export time excluded). On a GPU the uint8 batch starts in
    pinned host memory, so the copy to the GPU is included, as in extraction."""
    import featx
    from featx.extract import Forward, OnnxForward
    lb = featx.load_backbone(backbone, weights)
    crop = lb.preprocess.crop
    x = torch.randint(0, 255, (batch, 3, crop, crop), dtype=torch.uint8)
    if torch.device(device).type == "cuda":
        x = x.pin_memory()
    if plain:
        xf = (x.float() / 255).to(device)
        model = lb.model.to(device)
        def step():
            with torch.inference_mode():
                model(xf)
    elif onnx:
        calibration = None
        if int8:   # calibrated on real images, as extraction does
            from featx.quantize import calibration_for
            calibration = calibration_for(samples_for(image_list(128, Path(tempfile.gettempdir()))))
        ort = OnnxForward(lb, [lb.info.default_layer], "avg", calibration=calibration)
        def step():
            ort(x)
    else:
        fwd = Forward(lb, [lb.info.default_layer], "avg", torch.device(device), precision, compile=compile)
        def step():
            fwd(x)
    step()
    _sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        step()
        done += batch
    _sync(device)
    return done / (time.perf_counter() - t0)


def featx_extract(backbone, weights, paths, precision, cache_dir, workers=None, compile="auto", runtime="auto",
                  device="cpu"):
    import featx
    samples = samples_for(paths)
    t0 = time.perf_counter()
    rep = featx.extract(samples, backbone, weights=weights, precision=precision, cache=cache_dir,
                        progress=False, workers=workers, compile=compile, runtime=runtime, device=device)
    dt = time.perf_counter() - t0
    return rep.n_extracted / dt, rep


def breakdown(backbone, weights, paths, precision, runtime, device="cpu", batch=32):
    """Time per stage with no overlap: decode+resize (one core, as in a
    worker), host-to-GPU copy (on a GPU), forward, HDF5 write."""
    import featx
    from featx.cache import FeatureCache, FeatureSpec
    from featx.extract import ImageFiles, collate, make_forward
    lb = featx.load_backbone(backbone, weights)
    ds = ImageFiles(paths, lb.preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in a DataLoader worker
    t0 = time.perf_counter()
    items = [ds[i] for i in range(len(ds))]
    t_decode = time.perf_counter() - t0
    torch.set_num_threads(threads)
    dev = torch.device(device)
    fwd = make_forward(lb, [lb.info.default_layer], "avg", dev, precision,
                       n_images=10**6, compile="off", runtime=runtime)
    batches = [collate(items[s:s + batch])[0] for s in range(0, len(items), batch)]
    t_copy = 0.0
    if dev.type == "cuda":
        batches = [x.pin_memory() for x in batches]
        fwd(batches[0])   # warm-up: cuDNN picks its kernels
        _sync(dev)
        t0 = time.perf_counter()
        for x in batches:
            x.to(dev, non_blocking=True)
        _sync(dev)
        t_copy = time.perf_counter() - t0
    outs = []
    t0 = time.perf_counter()
    for x in batches:
        outs.append(fwd(x)[0])   # returns host arrays: synchronised
    t_forward = time.perf_counter() - t0 - t_copy   # Forward copies the batch itself
    with tempfile.TemporaryDirectory() as d:
        cache = FeatureCache(d)
        spec = FeatureSpec(backbone, "bench", lb.info.default_layer, "avg", lb.preprocess.as_dict(), precision)
        t0 = time.perf_counter()
        for i, o in enumerate(outs):
            cache.write_part(spec.key, spec, [f"{i:08d}{j:024d}" for j in range(len(o))], o)
        cache.consolidate(spec.key, spec)
        t_write = time.perf_counter() - t0
    total = t_decode + t_copy + t_forward + t_write
    out = {"decode+resize": t_decode / total}
    if dev.type == "cuda":
        out["copy to GPU"] = t_copy / total
    out.update({"forward": t_forward / total, "hdf5 write": t_write / total,
                "decode ms/img": 1000 * t_decode / len(paths)})
    return out


def peak_rss_child(backbone, weights, paths, precision, device="cpu") -> float:
    """Peak RSS (MiB) of a fresh process extracting ``paths`` (workers included)."""
    code = (
        "import sys, json, resource, featx, pathlib\n"
        "from featx.data import Sample, content_id\n"
        "paths=[pathlib.Path(p) for p in json.load(open(sys.argv[1]))]\n"
        "s=[Sample(p, p.parent.name, 'train', content_id(p)) for p in paths]\n"
        "featx.extract(s, sys.argv[2], weights=sys.argv[3], precision=sys.argv[4], cache=sys.argv[5], progress=False, device=sys.argv[6])\n"
        "me=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; ch=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'self': me/1024, 'children': ch/1024}))\n")
    with tempfile.TemporaryDirectory() as d:
        listing = Path(d) / "paths.json"
        listing.write_text(json.dumps([str(p) for p in paths]))
        out = subprocess.run([sys.executable, "-c", code, str(listing), backbone, weights, precision, d + "/cache",
                              device],
                             capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["self"], r["children"]


def probe_accuracy(backbone, weights, n_train, precisions, cache_dir, n_classes=0, cv=0, repeats=1):
    """A logistic-regression probe on features of the same images in each
    precision: fit on a stratified ``n_train`` subset of clothing-small's
    train split (or all of the shipped clothing-mini's when clothing-small
    is absent), scored on the whole test split; ``n_classes``: only the
    first classes (a second, easier dataset made of the same photos).

    ``cv`` folds (``repeats`` times, stratified, over every photo of the
    dataset, train and test alike): the same probe fitted and scored on the
    same folds for each precision, so the accuracy difference is paired fold
    by fold; a finer measure than the test split alone (one test photo is
    0.27 points of clothing-small's 372)."""
    import featx
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    root = SHARED if SHARED.is_dir() else Path(featx.__file__).parent / "datasets" / "clothing-mini"
    ds = featx.open_dataset(root)
    train, test = ds.subset("train"), ds.subset("test")
    if n_classes:
        keep = set(ds.classes[:n_classes])
        train, test = [s for s in train if s.label in keep], [s for s in test if s.label in keep]
    if n_train < len(train):
        train, _ = train_test_split(train, train_size=n_train, random_state=0, stratify=ds.labels(train))
    name = f"{root.name}, its first {n_classes} classes" if n_classes else root.name
    out = {"dataset": f"{name}: {len(train)} train, {len(test)} test images"}
    preds = {}
    for prec in precisions:
        t0 = time.perf_counter()
        rep = featx.extract(train + test, backbone, weights=weights, precision=prec, cache=cache_dir, progress=True)
        seconds = time.perf_counter() - t0
        cache = featx.FeatureCache(cache_dir)
        Xtr, Xte = (cache.read(rep.keys[0], [x.id for x in part]) for part in (train, test))
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        clf.fit(Xtr, ds.labels(train))
        preds[prec] = clf.predict(Xte)
        out[prec] = {"accuracy": float((preds[prec] == ds.labels(test)).mean()), "seconds": seconds,
                     "images/s": rep.n_extracted / seconds if rep.n_extracted else None,
                     "features": Xte, "all": np.concatenate([Xtr, Xte])}
    if cv:
        out["cv"] = _probe_cv(out, precisions, np.concatenate([ds.labels(train), ds.labels(test)]), cv, repeats)
    ref = out[precisions[0]]["features"]
    for prec in precisions[1:]:
        X = out[prec]["features"]
        out[prec]["agreement"] = float((preds[prec] == preds[precisions[0]]).mean())
        out[prec]["feature rel. error"] = float(np.linalg.norm(X - ref) / np.linalg.norm(ref))
    for prec in precisions:
        del out[prec]["features"], out[prec]["all"]
    return out


def _probe_cv(out, precisions, labels, folds, repeats):
    """Accuracy of each precision on the same stratified folds, and the paired
    difference to the first precision: mean and a normal 95% interval over
    the folds (folds share training photos, so the interval is optimistic)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    y = np.asarray(labels)
    acc = {prec: [] for prec in precisions}
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=0)
    for tr, te in splitter.split(np.zeros(len(y)), y):
        for prec in precisions:
            X = out[prec]["all"]
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(X[tr], y[tr])
            acc[prec].append(float((clf.predict(X[te]) == y[te]).mean()))
    res = {"folds": folds, "repeats": repeats, "photos": len(y),
           "accuracy": {prec: float(np.mean(a)) for prec, a in acc.items()}}
    for prec in precisions[1:]:
        d = 100 * (np.asarray(acc[prec]) - np.asarray(acc[precisions[0]]))
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        res[prec] = {"points": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)]}
    return res


@contextlib.contextmanager
def featx_home(path):
    """FEATX_HOME (where exported networks are kept for every cache folder)
    set to ``path`` inside the block, as it was after it."""
    before = os.environ.get("FEATX_HOME")
    os.environ["FEATX_HOME"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FEATX_HOME", None)
        else:
            os.environ["FEATX_HOME"] = before


def run(backbone, weights, n, precision, do_rss, compile_rows, device="cpu"):
    from featx.extract import auto_batch_size, resolve_device, resolve_precision, resolve_runtime
    dev = resolve_device(device)
    device = str(dev)
    precision = resolve_precision(precision, device)
    runtime = resolve_runtime("auto", dev, precision, n)
    batch = 32
    if dev.type == "cuda":   # what featx extract picks there
        import featx
        from featx.extract import FeatureNet
        lb = featx.load_backbone(backbone, weights)
        net = FeatureNet(lb.model, [lb.info.default_layer], "avg", lb.preprocess, fuse=True).eval().to(dev)
        batch = auto_batch_size(net.to(memory_format=torch.channels_last), lb.preprocess.crop, dev, precision)
        del net, lb
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        with featx_home(work / "home"):   # in-process rows: nothing exported before them either
            paths = image_list(max(n, 4 * n if do_rss else n), work)
            main = paths[:n]
            row = {"backbone": backbone, "n": n, "precision": precision, "threads": torch.get_num_threads(),
                   "runtime": runtime, "device": device, "batch": batch}
            row["a_naive"] = naive(backbone, weights, main, device=device)
            row["a2_tuned"] = tuned(backbone, weights, main, batch=batch, device=device)
            # a first-ever run: a new cache folder and a new per-user folder (nothing exported yet)
            row["c_command"] = whole_command(backbone, weights, main, precision, work / "cmd", device,
                                             home=work / "home-first")
            if runtime == "onnx":   # fp32 again into a new, empty cache folder: the per-user folder has the export
                row["c_command_stored"] = whole_command(backbone, weights, main, precision, work / "cmd2", device,
                                                        home=work / "home-first")
            if runtime == "onnx":   # int8: first run (calibration and quantization included), then with the stored model
                row["c_int8_first"] = whole_command(backbone, weights, main, "int8", work / "cmd8", device,
                                                    home=work / "home-int8")
                import shutil
                shutil.rmtree(work / "cmd8" / "cache" / next(p.name for p in (work / "cmd8" / "cache").iterdir()
                                                             if "-int8-" in p.name))
                row["c_int8"] = whole_command(backbone, weights, main, "int8", work / "cmd8", device,
                                              home=work / "home-int8")
            # featx's own runs before anything compiles: inductor leaves a pool of
            # compile workers behind that would share the two cores with them
            row["c_default"], rep = featx_extract(backbone, weights, main, precision, work / "c3", device=device)
            assert rep.runtime == runtime
            row["c_eager"], _ = featx_extract(backbone, weights, main, precision, work / "c1", compile="off",
                                              runtime="torch", device=device)
            row["b_plain"] = forward_only(backbone, weights, n, precision, plain=True, batch=batch, device=device)
            row["b_eager"] = forward_only(backbone, weights, n, precision, compile=False, batch=batch, device=device)
            if runtime == "onnx":
                row["b_onnx"] = forward_only(backbone, weights, n, precision, onnx=True)
                row["b_onnx_int8"] = forward_only(backbone, weights, n, precision, onnx=True, int8=True)
            if compile_rows:
                row["b_compiled"] = forward_only(backbone, weights, n, precision, compile=True, batch=batch,
                                                 device=device)
                row["c_compiled"], _ = featx_extract(backbone, weights, main, precision, work / "c2", compile="on",
                                                     runtime="torch", device=device)
            row["b_forward"] = row["b_onnx"] if runtime == "onnx" else row["b_eager"]
            row["c/a"] = row["c_default"] / row["a_naive"]
            row["c/b"] = row["c_default"] / row["b_forward"]
            for c in ("c_command", "c_command_stored", "c_int8"):
                if c in row:
                    row[f"{c}/a"] = row[c] / row["a_naive"]
                    row[f"{c}/a2"] = row[c] / row["a2_tuned"]
                    row[f"{c}/b"] = row[c] / row["b_onnx_int8" if c == "c_int8" else "b_forward"]
            row["c_torch/b_torch"] = row["c_eager"] / row["b_eager"]
            row["breakdown"] = breakdown(backbone, weights, main[: min(n, max(256, 4 * batch))], precision, runtime,
                                         device, batch)
            if do_rss:
                row["rss_N"] = peak_rss_child(backbone, weights, paths[:n], precision, device)
                row["rss_4N"] = peak_rss_child(backbone, weights, paths[: 4 * n], precision, device)
    return row


ROWS = [("(a) naive loop (PIL + transforms per image, fp32 NCHW, main process)", "a_naive"),
        ("(a2) tuned PyTorch loop (DataLoader, a worker per core, channels_last, inference_mode)", "a2_tuned"),
        ("(b) forward only, torchvision model as built (fp32 NCHW)", "b_plain"),
        ("(b) forward only, featx network in torch (BN folded, channels_last)", "b_eager"),
        ("(b) forward only, featx network in torch, compiled", "b_compiled"),
        ("(b) forward only, featx network in ONNX Runtime", "b_onnx"),
        ("(b) forward only, featx network in ONNX Runtime int8", "b_onnx_int8"),
        ("(c) featx extract --runtime torch --compile off, cold cache", "c_eager"),
        ("(c) featx extract --runtime torch --compile on (compile time included)", "c_compiled"),
        ("(c) **featx extract, defaults** (runtime {runtime}), cold cache", "c_default"),
        ("(c) `featx extract` command, defaults, timed from outside, first-ever run (exports)", "c_command"),
        ("(c) `featx extract` command, defaults, new empty cache folder, export in the per-user folder",
         "c_command_stored"),
        ("(c) `featx extract --precision int8` command, first run (calibration + quantization)", "c_int8_first"),
        ("(c) `featx extract --precision int8` command, quantized model stored", "c_int8")]


def print_row(r):
    print(f"\n## {r['backbone']}: {r['n']} images on {r['device']}, precision {r['precision']}, batch {r['batch']}, "
          f"{r['threads']} CPU threads")
    print("| path | images/s | vs (a) |")
    print("|---|---:|---:|")
    a = r["a_naive"]
    for label, key in ROWS:
        if key in r:
            print(f"| {label.format(**r)} | {r[key]:.1f} | {r[key] / a:.2f}x |")
    print(f"\n(c)/(a) = {r['c/a']:.2f}x   (c)/(b) = {r['c/b']:.2f} (b = the same network in the same runtime "
          f"and precision); with --runtime torch: (c)/(b) = {r['c_torch/b_torch']:.2f}")
    for c, what in (("c_command", "featx extract command"),
                    ("c_command_stored", "featx extract command, export stored"),
                    ("c_int8", "featx extract --precision int8 command")):
        if c in r:
            print(f"{what}: (c)/(a) = {r[f'{c}/a']:.2f}x, (c)/(a2) = {r[f'{c}/a2']:.2f}x, "
                  f"(c)/(b) = {r[f'{c}/b']:.2f}")
    b = r["breakdown"]
    print("where the time goes (serial, no overlap): " + ", ".join(
        f"{k} {v:.0%}" for k, v in b.items() if k != "decode ms/img") + f"; decode {b['decode ms/img']:.1f} ms/img")
    if "rss_N" in r:
        (sN, cN), (s4, c4) = r["rss_N"], r["rss_4N"]
        print(f"peak RSS: N={r['n']}: {sN:.0f} MiB (+ workers {cN:.0f}); 4N={4 * r['n']}: {s4:.0f} MiB "
              f"(+ workers {c4:.0f}); growth {100 * (s4 / sN - 1):+.1f}%")
    sys.stdout.flush()


def print_probe(p, precisions):
    print(f"\n## logistic-regression probe, fp32 vs reduced precision ({p['dataset']})")
    print("| precision | test accuracy | agreement with fp32 | feature rel. error | extract img/s |")
    print("|---|---:|---:|---:|---:|")
    for prec in precisions:
        q = p[prec]
        rate = f"{q['images/s']:.1f}" if q["images/s"] else "cached"
        print(f"| {prec} | {q['accuracy']:.4f} | {q.get('agreement', 1.0):.4f} | "
              f"{q.get('feature rel. error', 0.0):.1e} | {rate} |")
    for prec in precisions[1:]:
        print(f"{prec}: accuracy {100 * (p[prec]['accuracy'] - p[precisions[0]]['accuracy']):+.2f} points vs fp32")
    if "cv" in p:
        cv = p["cv"]
        print(f"\n{cv['repeats']}x {cv['folds']}-fold cross-validation over all {cv['photos']} photos "
              "(the same folds for each precision):")
        for prec in precisions[1:]:
            lo, hi = cv[prec]["ci95"]
            print(f"{prec}: {cv[prec]['points']:+.2f} points vs fp32 (95% interval {lo:+.2f} to {hi:+.2f}; "
                  f"fp32 {cv['accuracy'][precisions[0]]:.4f})")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", help="default: mobilenet_v2 and resnet50")
    ap.add_argument("--weights", default="none",
                    help="auto for real weights where installed; none (default) gives the same speed for any backbone")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto: where (a), (b) and (c) run")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling takes minutes)")
    ap.add_argument("--probe-train", type=int, default=0,
                    help="train images for the fp32 vs reduced-precision probe (0: skip; it runs on --weights auto)")
    ap.add_argument("--probe-precision", action="append", help="reduced precisions to probe [default: bf16]")
    ap.add_argument("--probe-cache", default=None, help="cache folder for the probe [default: a temporary one]")
    ap.add_argument("--probe-cv", type=int, default=0, metavar="K",
                    help="also K-fold cross-validation over all the probe's photos, paired by fold (0: skip)")
    ap.add_argument("--probe-repeats", type=int, default=2, help="repeats of --probe-cv [default: 2]")
    ap.add_argument("--probe-classes", type=int, action="append",
                    help="also probe on the first K classes only (repeatable; 0: all) [default: all]")
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="run the speed rows")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--startup", action="store_true", help="where the seconds before the first batch go")
    ap.add_argument("--threads", action="store_true",
                    help="whole extraction for each split of the cores between ONNX Runtime threads and decode workers")
    args = ap.parse_args()
    # never the user's own per-user folder: no row starts with an export made before this run
    import atexit
    import shutil
    os.environ["FEATX_HOME"] = tempfile.mkdtemp(prefix="featx-bench-home-")
    atexit.register(shutil.rmtree, os.environ["FEATX_HOME"], ignore_errors=True)
    rows = []
    if args.speed:
        for bb in args.backbone or ["mobilenet_v2", "resnet50"]:
            r = run(bb, args.weights, args.n, args.precision, not args.no_rss, not args.no_compile, args.device)
            print_row(r)
            rows.append(r)
    for bb in (args.backbone or ["mobilenet_v2"]) if args.startup else ():
        print(f"\n## start-up of {bb} (each part alone, seconds)")
        print("| part | s |\n|---|---:|")
        for k, v in startup(bb, args.weights).items():
            print(f"| {k} | {v:.2f} |")
        sys.stdout.flush()
    for bb in (args.backbone or ["mobilenet_v2"]) if args.threads else ():
        with tempfile.TemporaryDirectory() as d:
            paths = image_list(args.n, Path(d))
            rows_tw = threads_vs_workers(bb, args.weights, paths, args.precision, Path(d))
        print(f"\n## {bb}: ONNX Runtime threads x decode workers, whole extraction of {args.n} images (img/s)")
        print("| threads | workers | img/s |\n|---:|---:|---:|")
        for t, w, v in rows_tw:
            print(f"| {t} | {w} | {v:.1f} |")
        sys.stdout.flush()
    if args.probe_train:
        precisions = ["fp32"] + (args.probe_precision or ["bf16"])
        for k in args.probe_classes or [0]:
            with tempfile.TemporaryDirectory() as d:
                p = probe_accuracy((args.backbone or ["mobilenet_v2"])[0], "auto", args.probe_train, precisions,
                                   args.probe_cache or d, k, cv=args.probe_cv, repeats=args.probe_repeats)
            print_probe(p, precisions)
            rows.append({"probe": p})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
