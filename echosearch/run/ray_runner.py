"""The Ray Data runner: read as CPU tasks, encode in an actor pool, write one Parquet shard per unit of work.

``echosearch index SOURCE... --index DIR --executor ray [--address ADDR]``. The driver (where this runs) plans
the units (a walk, no file read), binds the model to the catalog as the local runner does, and hands the
units that have no finished shard to Ray; then :func:`echosearch.run.merge.merge_shards` loads the shards.
A unit whose shard exists is not run again (resume), unless its shard recorded failures (they are retried,
as the local runner retries failed files). Ray retries the tasks of a worker that dies and restarts a dead
encode actor; a retried unit writes the same shard name, replacing its own shard.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.errors import ConfigError
from echosearch.model.encode import Encoder
from echosearch.run.encode import EncodeSpec, EncodeStage
from echosearch.run.merge import merge_shards, write_sidecars
from echosearch.run.read import ReadContext, read_unit
from echosearch.run.records import UnitResult
from echosearch.run.setup import load_run_encoder, prepare_run
from echosearch.run.shards import shard_meta, write_shard
from echosearch.run.units import DEFAULT_UNIT_FILES, Unit, plan_units, shard_path

log = logging.getLogger(__name__)
READ_MEMORY = 1 << 30  # bytes reserved per read task (worker ~0.3 GB + a unit's decoded, prepared frames)
INSTALL_HINT = 'the Ray executor needs Ray: pip install "echosearch[ray]"'


@dataclass
class RayIndexSummary:
    """What ``index --executor ray`` did: units planned / already done / run, and the merge."""

    units: int = 0
    units_done: int = 0
    units_run: int = 0
    clips_encoded: int = 0
    failed: int = 0
    report_objects: int = 0
    actors: int = 0
    gpus_per_actor: float = 0.0
    elapsed_s: float = 0.0
    ray_seconds: float = 0.0  # starting (or joining) Ray and running the units
    stage_seconds: dict[str, float] = field(default_factory=dict)  # setup / ray_start / units / merge
    merge: dict[str, Any] = field(default_factory=dict)


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a ConfigError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return ray


def pending_units(index_dir: Path, units: Sequence[Unit]) -> list[Unit]:
    """Units without a finished shard (a shard that recorded failures counts as unfinished: retried)."""
    out = []
    for u in units:
        path = shard_path(index_dir, u.name)
        try:
            if path.exists() and int(shard_meta(path).get("failures", 0)) == 0:
                continue
        except Exception:  # noqa: BLE001 - an unreadable shard is written again
            pass
        out.append(u)
    return out


# ---- the Ray Data stages (module level: pickled by reference) ---------------------------------------------
def _read_batch(batch: dict[str, np.ndarray], ctx: ReadContext) -> dict[str, np.ndarray]:
    units = [pickle.loads(b) for b in batch["unit"]]
    results = [read_unit(u.name, u.ordinal, u.items, ctx) for u in units]
    return {"payload": np.array([pickle.dumps(r, protocol=5) for r in results], dtype=object)}


class _EncodeActor:
    """One encoder per actor (one GPU each where the cluster has GPUs)."""

    def __init__(self, spec: EncodeSpec) -> None:
        import ray

        if ray.get_gpu_ids():
            spec = EncodeSpec(**{**asdict(spec), "device": "cuda"})
        self.stage = EncodeStage.from_spec(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.stage.encode_unit(pickle.loads(b)) for b in batch["payload"]]
        return {"payload": np.array([pickle.dumps(r, protocol=5) for r in out], dtype=object)}


def _write_batch(batch: dict[str, np.ndarray], index_dir: str, meta: dict[str, Any], dim: int,
                 identity_dim: int | None) -> dict[str, np.ndarray]:
    units: list[UnitResult] = [pickle.loads(b) for b in batch["payload"]]
    for u in units:
        write_shard(shard_path(Path(index_dir), u.name), u, meta, dim, identity_dim)
    return {"unit": np.array([u.name for u in units], dtype=object),
            "clips": np.array([len(u.encoded) for u in units], dtype=np.int64),
            "failed": np.array([sum(not f.is_report for f in u.failures) for u in units], dtype=np.int64),
            "reports": np.array([sum(f.is_report for f in u.failures) for u in units], dtype=np.int64)}


# ---- the driver ---------------------------------------------------------------------------------------
def start_local_ray(ray: Any, num_cpus: int | None) -> None:
    """A local Ray instance on 127.0.0.1 only, no dashboard, no usage reporting.

    Ray resolves 127.0.0.1 to the machine's routable address unless its cluster mode is off (as on macOS),
    and then binds its servers to every interface: this instance turns it off while it starts, so that every
    Ray server (GCS, raylet, workers) listens on the loopback interface alone."""
    import importlib

    try:
        ray_constants: Any = importlib.import_module("ray._private.ray_constants")
    except ImportError:  # another Ray layout: _node_ip_address alone
        ray_constants = None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster_mode = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if cluster_mode is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    finally:
        if cluster_mode is not None:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    if ray.util.get_node_ip_address() != "127.0.0.1":
        log.warning("the local Ray instance runs on %s, not 127.0.0.1", ray.util.get_node_ip_address())


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a local instance on 127.0.0.1; True when started here."""
    if ray.is_initialized():
        return False
    if address:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(ray, num_cpus)
    return True


def index_with_ray(sources: Sequence[Path], index_dir: Path, settings: Settings, *, address: str | None = None,
                   reports: Path | None = None, labels: Path | None = None, unit_files: int = DEFAULT_UNIT_FILES,
                   num_cpus: int | None = None, actors: int | None = None, merge: bool = True,
                   progress: bool = True, encoder: Encoder | None = None) -> RayIndexSummary:
    """Index ``sources`` into ``index_dir`` on a Ray cluster (``address``) or a local Ray instance.

    ``num_cpus``: CPUs of a local instance (default: all). ``actors``: encode actors (default: one per GPU,
    else half the CPUs). ``merge``: load the shards into the catalog at the end (else run ``merge`` later)."""
    ray = require_ray()
    from echosearch.ingest.discover import load_sidecars

    t0 = time.perf_counter()
    summary = RayIndexSummary()
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    enc = encoder or load_run_encoder(settings)
    with Catalog.open(index_dir, create=True) as cat:
        setup = prepare_run(cat, settings, enc)
        known = cat.encoded_hashes()
    meta = {**setup.meta, "run": run}
    spec = setup.encode_spec()
    sources = [Path(s) for s in sources]
    side = load_sidecars(sources, reports=reports, labels=labels)
    write_sidecars(index_dir, side, run)
    units = plan_units(sources, meta["config"], unit_files)
    todo = pending_units(index_dir, units)
    summary.units, summary.units_run, summary.units_done = len(units), len(todo), len(units) - len(todo)
    stages = summary.stage_seconds
    t_setup = time.perf_counter()
    stages["setup"] = round(t_setup - t0, 3)
    if todo:
        ctx = setup.read_context(side, known)
        started = _start_ray(ray, address, num_cpus)
        t_ray = time.perf_counter()
        stages["ray_start"] = round(t_ray - t_setup, 3)
        try:
            summary.actors, summary.gpus_per_actor = _run_units(ray, todo, ctx, spec, index_dir, meta, enc, summary,
                                                               actors, progress)
        finally:
            if started:
                ray.shutdown()
            stages["units"] = round(time.perf_counter() - t_ray, 3)
            summary.ray_seconds = round(time.perf_counter() - t_setup, 3)
    if merge:
        t_merge = time.perf_counter()
        summary.merge = asdict(merge_shards(index_dir, settings, encoder=enc))
        stages["merge"] = round(time.perf_counter() - t_merge, 3)
    summary.elapsed_s = round(time.perf_counter() - t0, 3)
    return summary


def _run_units(ray: Any, todo: list[Unit], ctx: ReadContext, spec: EncodeSpec, index_dir: Path, meta: dict[str, Any],
               enc: Encoder, summary: RayIndexSummary, actors: int | None, progress: bool) -> tuple[int, float]:
    from ray.data import ActorPoolStrategy, DataContext

    dctx = DataContext.get_current()
    dctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_actors = actors or (gpus if gpus else max(1, cpus // 2))
    per_actor: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    identity_dim = int(meta["identity_model"]["embed_dim"]) if meta["identity_model"] else None
    ds = ray.data.from_items([{"unit": pickle.dumps(u, protocol=5)} for u in todo], override_num_blocks=len(todo))
    # read: CPU tasks of their own (their memory reservation also keeps Ray from fusing them into the actors)
    ds = ds.map_batches(_read_batch, batch_size=1, batch_format="numpy", num_cpus=1, memory=READ_MEMORY,
                        fn_kwargs={"ctx": ctx})
    ds = ds.map_batches(_EncodeActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs={"spec": spec},
                        compute=ActorPoolStrategy(min_size=1, max_size=n_actors), **per_actor)
    ds = ds.map_batches(_write_batch, batch_size=1, batch_format="numpy", num_cpus=0.25,
                        fn_kwargs={"index_dir": str(index_dir), "meta": meta, "dim": enc.embed_dim,
                                   "identity_dim": identity_dim})
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("units"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:  # stdout: --json
        task = bar.add_task("", total=len(todo))
        for row in ds.iter_rows():
            summary.clips_encoded += int(row["clips"])
            summary.failed += int(row["failed"])
            summary.report_objects += int(row["reports"])
            bar.update(task, advance=1)
    return n_actors, float(per_actor.get("num_gpus", 0.0))
