"""Search while indexing: text-search latency through the server during an ingest job, and the job's rate
against ``echosearch index`` on the same files (issue 27 targets: p95 <= 500 ms; rate >= 0.8x).

Two synthetic cohorts (seeds apart from any tuning): A seeds an index, B is what gets ingested.

1. direct: a copy of the seeded index, ``echosearch index B`` (its own process, as a user runs it);
2. server: another copy served by ``echosearch server``; B is submitted as an ingest job while a client
   sends text searches (a pause of ``--pause`` seconds between them) and records each latency while the
   job runs; a second client loads what the app's four pages read (``RemoteAppIndex``, as under
   ``echosearch serve``) in a loop and records each load's time and any error.

The rate is videos encoded per second of the pipeline (the summaries' ``elapsed_s``; the server's job
reuses the server's loaded model, the direct run loads it, so wall times are also printed). Usage:

    .venv/bin/python bench/live.py                       # 16 + 16 patients, demo model, CPU
    .venv/bin/python bench/live.py --patients 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = ("severely reduced left ventricular systolic function", "severe aortic stenosis",
           "pacemaker lead in the right ventricle", "dilated left ventricle", "normal study",
           "bioprosthetic aortic valve", "mitral regurgitation")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ECHOSEARCH_API_TOKEN", "ECHOSEARCH_APP_PASSWORD")}
    env.setdefault("ECHOSEARCH_SECRET", "bench-secret-0123456789abcdef")
    return env | {"ECHOSEARCH_MODEL": args.model, "ECHOSEARCH_DEVICE": "cpu",
                  "ECHOSEARCH_FRAMES_PER_VIDEO": str(args.frames)}


def direct(index: Path, cohort: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "echosearch", "index", str(cohort), "--index", str(index),
                          "--reports", str(cohort / "reports.csv"), "--json"], capture_output=True, text=True,
                         env=env, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads(out.stdout)
    return {"videos": summary["videos_encoded"], "elapsed_s": summary["elapsed_s"], "wall_s": round(wall, 2),
            "rate": summary["videos_encoded"] / summary["elapsed_s"], "stage_seconds": summary["stage_seconds"],
            "model_seconds": summary["model_seconds"], "steady_frames_per_s": summary["steady_frames_per_s"]}


def through_server(index: Path, cohort: Path, env: dict[str, str], pause: float, log: Path,
                   pages_client: bool = True) -> dict[str, Any]:
    import httpx

    from echosearch.serve.client import ServerClient, recorded_server

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "echosearch", "server", "--index", str(index), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while recorded_server(index) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        client = ServerClient(f"http://127.0.0.1:{port}")
        client.search({"text": QUERIES[0], "k": 10})  # the text tower is loaded before the clock starts
        lat: list[float] = []
        counts: list[int] = []
        running = threading.Event()
        done = threading.Event()

        def searcher() -> None:
            with httpx.Client(base_url=client.url, timeout=60) as http:
                i = 0
                while not done.is_set():
                    t0 = time.perf_counter()
                    r = http.post("/v1/search", json={"text": QUERIES[i % len(QUERIES)], "k": 10})
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    if running.is_set():
                        lat.append(dt * 1000)
                        counts.append(r.json()["n_available"])
                    i += 1
                    time.sleep(pause)

        pages: list[float] = []
        page_errors: list[str] = []

        def pages_loader() -> None:
            """What the app's four pages read, through the server as `echosearch serve` runs them."""
            from echosearch.appcore.remote import RemoteAppIndex

            app = RemoteAppIndex(client.url, index, timeout=60)
            try:
                while not done.is_set():
                    t0 = time.perf_counter()
                    try:
                        pts = app.patients()
                        app.filter_options()
                        if pts.height:
                            app.patient_timeline(int(pts["patient_key"][0]))
                        app.audit_results()
                        app.status()
                        app.ingest_errors()
                        app.access_log(100)
                    except Exception as exc:  # noqa: BLE001 - counted, the bench goes on
                        page_errors.append(f"{type(exc).__name__}: {exc}")
                    if running.is_set():
                        pages.append((time.perf_counter() - t0) * 1000)
                    time.sleep(pause)
            finally:
                app.close()

        t = threading.Thread(target=searcher, daemon=True)
        t.start()
        tp = threading.Thread(target=pages_loader if pages_client else done.wait, daemon=True)
        tp.start()
        t0 = time.perf_counter()
        job = client.submit_job([cohort], cohort / "reports.csv")
        running.set()
        job = client.wait_job(job["job_id"], poll_s=0.25)
        wall = time.perf_counter() - t0
        done.set()
        t.join()
        tp.join()
        if job["state"] != "done":
            raise SystemExit(f"job failed: {job.get('error')}")
        summary = job["summary"]
        a = np.asarray(lat)
        return {"videos": summary["videos_encoded"], "elapsed_s": summary["elapsed_s"], "wall_s": round(wall, 2),
                "rate": summary["videos_encoded"] / summary["elapsed_s"], "stage_seconds": summary["stage_seconds"],
                "model_seconds": summary["model_seconds"], "steady_frames_per_s": summary["steady_frames_per_s"],
                "searches": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1) if len(a) else None,
                "p95_ms": round(float(np.percentile(a, 95)), 1) if len(a) else None,
                "max_ms": round(float(a.max()), 1) if len(a) else None,
                "distinct_counts_seen": len(set(counts)), "page_loads": len(pages),
                "page_p95_ms": round(float(np.percentile(pages, 95)), 1) if pages else None,
                "page_errors": page_errors[:5], "n_page_errors": len(page_errors)}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=16, help="patients per cohort")
    ap.add_argument("--seed", type=int, default=2701, help="cohort A seed (B: seed + 1)")
    ap.add_argument("--model", default="echosearch-demo")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between a client's searches")
    ap.add_argument("--repeats", type=int, default=2, help="direct/server pairs, alternating which goes first")
    ap.add_argument("--no-pages", action="store_true", help="no second client loading the app's pages")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()

    from echosearch.config import load_settings
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    work = args.keep or Path(tempfile.mkdtemp(prefix="echosearch-live-"))
    work.mkdir(parents=True, exist_ok=True)
    env = run_env(args)
    os.environ.update({k: v for k, v in env.items() if k.startswith("ECHOSEARCH_")})
    a, b = work / "cohort-a", work / "cohort-b"
    for path, seed in ((a, args.seed), (b, args.seed + 1)):
        if not path.exists():
            generate_cohort(path, patients=args.patients, seed=seed, visits=(2, 3), views=("A4C", "PLAX"))
    seeded = work / "seeded"
    if not seeded.exists():
        index_sources([a], seeded, load_settings(), reports=a / "reports.csv", progress=False)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):  # the machine is shared: alternate the order, report medians
        pair: dict[str, Any] = {}
        for name in (("direct", "server") if rep % 2 == 0 else ("server", "direct")):
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.copytree(seeded, work / name)
            pair[name] = (direct(work / name, b, env) if name == "direct"
                          else through_server(work / name, b, env, args.pause, work / "server.log", not args.no_pages))
        pair["rate_ratio"] = round(pair["server"]["rate"] / pair["direct"]["rate"], 3)
        runs.append(pair)
    p95 = [r["server"]["p95_ms"] for r in runs if r["server"]["p95_ms"] is not None]
    ratio = float(np.median([r["rate_ratio"] for r in runs]))
    result = {"patients": args.patients, "model": args.model, "frames": args.frames, "cpus": os.cpu_count(),
              "videos_ingested": runs[0]["direct"]["videos"], "runs": runs,
              "median_p95_ms": float(np.median(p95)) if p95 else None, "median_rate_ratio": ratio,
              "targets": {"p95_ms<=500": bool(p95) and float(np.median(p95)) <= 500, "rate_ratio>=0.8": ratio >= 0.8}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
