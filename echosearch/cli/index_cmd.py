"""``echosearch index``, ``train`` and ``model``: build an index with a model, train a model, fetch weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from echosearch.cli.common import JsonOpt, ServerOpt, console, index_option, print_json, remote
from echosearch.errors import SomeInputsFailed


def index(
    sources: Annotated[list[Path], typer.Argument(help="Folders, files or manifest CSVs to index.")],
    index_dir: Annotated[Path, index_option("Index folder (created if missing).")],
    model: str = typer.Option(None, "--model", "-m", help="Model name, local-dir:DIR or ARCH@WEIGHTS."),
    identity_model: str = typer.Option(None, "--identity-model",
                                       help="Identity encoder: a `train-identity` folder or a model name / "
                                            "local-dir:DIR (default: the identity_model setting; none = "
                                            "identity uses the content vectors)."),
    workers: int = typer.Option(None, "--workers", "-w", help="Decode processes (0 = in process)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Frames per model batch."),
    frames: int = typer.Option(None, "--frames", help="Frames sampled per video."),
    all_frames: bool = typer.Option(False, "--all-frames",
                                    help="Encode every frame of each clip (EchoCLIP's embedding example) "
                                         "instead of --frames spread over it."),
    policy: str = typer.Option(None, "--policy",
                               help="Frame policy: auto (the model's own, default), sector or echoclip."),
    reports: Path = typer.Option(None, "--reports", help="CSV/Parquet of report texts."),
    labels: Path = typer.Option(None, "--labels", help="CSV/Parquet of labels (e.g. EF)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    executor: str = typer.Option("local", "--executor",
                                 help="local (worker processes on this machine) or ray (a Ray cluster: one "
                                      "Parquet shard per unit of work, then `merge`; see docs/scale.md)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (--executor ray; default: a "
                                                        "local Ray instance on 127.0.0.1)."),
    unit_files: int = typer.Option(None, "--unit-files", min=1,
                                   help="Files per unit of work (--executor ray; default 32)."),
) -> None:
    """Read, encode and index SOURCES (only files not indexed yet); build the vector indexes.

    When a server holds the index, SOURCES become an ingest job of that server (paths on its disk; the
    server's own settings apply) and this command follows it to the end."""
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources

    client = remote(index_dir, server)
    if client is not None:
        from echosearch.cli.server_cmd import follow_job

        with client:
            follow_job(client, sources, reports, labels, json_out=json_out, index_dir=index_dir)
        return

    settings = load_settings(model=model, identity_model=identity_model, workers=workers, batch_size=batch_size, frames_per_video=frames,
                             device=device, frame_policy=policy, frame_sampling="all" if all_frames else None)
    if executor != "local":
        from echosearch.cli.merge_cmd import index_on_ray

        index_on_ray(executor, sources, index_dir, settings, address=address, unit_files=unit_files,
                     reports=reports, labels=labels, json_out=json_out)
        return
    summary = index_sources(sources, index_dir, settings, reports=reports, labels=labels,
                            progress=not json_out)
    if json_out:
        from dataclasses import asdict

        print_json({**asdict(summary), "failed": summary.failed})
    else:
        console.print(
            f"indexed {summary.videos_encoded} videos ({summary.frames_encoded} frames, "
            f"{summary.frames_encoded / max(summary.model_seconds, 1e-9):.0f} frames/s in the model"
            + (f", {summary.steady_frames_per_s:.0f} through the pipeline" if summary.steady_frames_per_s else "")
            + "), "
            f"{summary.studies_pooled} studies, {summary.reports_embedded} reports in {summary.elapsed_s:.1f} s; "
            f"failed inputs: {summary.failed}"
        )
    if summary.failed:
        raise SomeInputsFailed(f"{summary.failed} input(s) failed: see `echosearch info --index {index_dir}` "
                               "or the ingest_errors table")


def train(
    index_dir: Annotated[Path, index_option("Index with videos and reports.")],
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder (open_clip format)."),
    init: str = typer.Option(None, "--init", help="Model to fine-tune (default: demo architecture from scratch)."),
    epochs: int = typer.Option(24, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many steps (smoke runs)."),
    workers: int = typer.Option(1, "--workers"),
    soft_targets: bool = typer.Option(True, "--soft-targets/--hard-targets",
                                      help="Score every text against every clip from the reports' facts "
                                           "(shared findings are positives), or one positive per row."),
    aux_weight: float = typer.Option(1.0, "--aux-weight", help="Weight of the report-fact heads (0 = off)."),
    anchor_weight: float = typer.Option(1.0, "--anchor-weight",
                                        help="Weight of the per-fact sigmoid loss of each finding's own sentence "
                                             "against every clip of a batch (0 = off)."),
    listwise_weight: float = typer.Option(0.0, "--listwise-weight",
                                          help="Weight of each finding sentence's softmax ranking of a batch's "
                                               "clips (the hardest negatives dominate; 0 = off)."),
    quantity_anchors: int = typer.Option(0, "--quantity-anchors", min=0,
                                         help="Numeric sentences per quantity (EF, LVIDd) per step, at values "
                                              "across the reports' range, joining the anchor terms with targets "
                                              "that decay with the distance to each clip's value (0 = off; "
                                              "needs --anchor-weight or --listwise-weight)."),
    ema: float = typer.Option(0.0, "--ema", min=0.0, max=0.9999,
                              help="Export a moving average of the weights with this decay per step (e.g. "
                                   "0.99; 0 = the last step's weights). Checkpoints keep the raw weights."),
    patient_weight: float = typer.Option(0.0, "--patient-weight", min=0.0,
                                         help="Weight of a same-patient term: clips of one patient's other "
                                              "studies (same view) pulled together against other patients' "
                                              "(0 = off)."),
    extra_texts: int = typer.Option(16, "--extra-texts", help="Single-statement texts added to each batch."),
    clip_frames: int = typer.Option(3, "--clip-frames", min=1,
                                    help="Frames per training clip, mean-pooled like the index's video vectors."),
    clip_epochs: int = typer.Option(5, "--clip-epochs", min=0,
                                    help="Only the last N epochs train multi-frame clips (earlier ones: one "
                                         "frame per clip, about half the step time); 0 = never, >= --epochs "
                                         "= every epoch."),
    view_visibility: bool = typer.Option(True, "--view-visibility/--whole-report",
                                         help="Pair each clip with the report sentences its view can show "
                                              "(no aortic-valve sentence for an A4C clip), or the whole report."),
) -> None:
    """Contrastive training (or fine-tuning) on the index's (video, report) pairs."""
    from echosearch.model.train import TrainConfig
    from echosearch.model.train import train as run_train

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps, init=init,
                      workers=workers, soft_targets=soft_targets, aux_weight=aux_weight, extra_texts=extra_texts,
                      clip_frames=clip_frames, clip_epochs=clip_epochs, view_visibility=view_visibility,
                      anchor_weight=anchor_weight, listwise_weight=listwise_weight,
                      quantity_anchors=quantity_anchors, ema=ema, patient_weight=patient_weight)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def cb(phase: str, i: int, n: int, metrics: dict[str, float]) -> None:
            if phase == "epoch":
                console.print(f"epoch {i}/{n}: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
                return
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=n, info="")
            info = f"loss {metrics['loss']:.3f}" if "loss" in metrics else ""
            bar.update(tasks[phase], completed=i, info=info)

        result = run_train(index_dir, out, cfg, progress=cb)
    from echosearch.cli.common import shown

    console.print(f"saved {shown(result.out_dir)} after {result.steps} steps ({result.n_train} train / "
                  f"{result.n_holdout} held-out videos); load it with --model local-dir:{shown(result.out_dir)}")


def train_identity(
    index_dir: Annotated[Path, index_option("Index whose recorded patient IDs are the labels.")],
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (give it as the identity_model setting)."),
    init: str = typer.Option(None, "--init", help="Image tower (default: the index's own content model)."),
    method: str = typer.Option("map", "--method",
                               help="map: closed-form projection of the tower's activation maps (keeps where the "
                                    "heart sits; no training loop); head: an MLP on the tower's vectors. "
                                    "--train-stages K trains a tower."),
    components: int = typer.Option(256, "--components", min=2, help="map: dimensions kept (the vector's width)."),
    reg: float = typer.Option(0.01, "--reg", min=0.0, help="map: ridge on the within-patient scatter."),
    map_stages: int = typer.Option(1, "--map-stages", min=1,
                                   help="map: take the activation maps before the tower's last K stages."),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Epochs (of 20 steps of 32 patients) per pass."),
    seed: int = typer.Option(0, "--seed"),
    hidden: int = typer.Option(256, "--hidden", min=0, help="Hidden width of the MLP head (0 = linear)."),
    residual: bool = typer.Option(True, "--residual/--projection",
                                  help="x + MLP(x) starting from the tower's own vectors (its width), or a "
                                       "projection to --dim."),
    dim: int = typer.Option(128, "--dim", min=2, help="Identity vector width (--projection)."),
    holdout: float = typer.Option(0.25, "--holdout", min=0.0, max=0.9, help="Share of patients held out."),
    clean: bool = typer.Option(True, "--clean/--no-clean",
                               help="Retrain without the studies the audit suspects after a first pass."),
    steps: int = typer.Option(20, "--steps", min=1, help="Steps per epoch."),
    temperature: float = typer.Option(0.2, "--temperature", min=0.01, max=2.0, help="Contrastive temperature."),
    pool: str = typer.Option("video", "--pool", help="video: map each video's pooled tower vector; frame: map "
                                                     "every frame vector, then pool."),
    data: str = typer.Option(None, "--data", help="What the index holds (e.g. the cohort and its seed), "
                                                  "recorded in the head's metadata."),
    train_stages: int = typer.Option(0, "--train-stages", min=0,
                                     help="Also fine-tune a copy of the tower's last K stages (0: head only)."),
    tail_lr: float = typer.Option(3e-4, "--tail-lr", min=0.0, help="Learning rate of the copied stages."),
    workers: int = typer.Option(1, "--workers"),
    json_out: JsonOpt = False,
) -> None:
    """Train an identity model on the index's own patient IDs (frozen image tower, cross-visit positives)."""
    from echosearch.cli.common import shown
    from echosearch.identity.train import IdentityTrainConfig
    from echosearch.identity.train import train_identity as run

    if pool not in ("video", "frame"):
        raise typer.BadParameter("--pool must be video or frame")
    if method not in ("map", "head"):
        raise typer.BadParameter("--method must be map or head (--train-stages K trains a tower)")
    if train_stages:
        method = "head"  # a tower: a fine-tuned copy of the last stages and a head
    cfg = IdentityTrainConfig(method=method, components=components, reg=reg, map_stages=map_stages, epochs=epochs,
                              seed=seed, init=init, hidden=hidden, out_dim=dim, holdout=holdout, clean=clean, workers=workers, residual=residual, steps_per_epoch=steps,
                              temperature=temperature, pool=pool, train_stages=train_stages, tail_lr=tail_lr)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, disable=json_out) as bar:
        tasks: dict[str, TaskID] = {}

        def cb(phase: str, i: int, n: int, metrics: dict[str, float]) -> None:
            if phase == "epoch":
                if not json_out:
                    auc = metrics.get("heldout_auc")
                    base = metrics.get("content_auc")
                    fit = "fit" if method == "map" else f"epoch {i}/{n}: loss {metrics['loss']:.4f},"
                    console.print(f"pass {metrics['pass']:.0f} {fit} "
                                  f"held-out cross-visit AUC {'-' if auc is None else f'{auc:.3f}'} "
                                  f"(content vectors {'-' if base is None else f'{base:.3f}'})")
                return
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=n, info="")
            bar.update(tasks[phase], completed=i, info=f"loss {metrics['loss']:.3f}" if "loss" in metrics else "")

        if method == "map":
            opts = [f"--method map --components {components} --reg {reg} --map-stages {map_stages}",
                    f"--holdout {holdout} --seed {seed}"]
        else:
            opts = [f"--method head --epochs {epochs} --seed {seed} --hidden {hidden} --steps {steps}",
                    f"--temperature {temperature} --pool {pool} --holdout {holdout}",
                    *((f"--train-stages {train_stages}", f"--tail-lr {tail_lr}") if train_stages else ()),
                    "--residual" if residual else f"--projection --dim {dim}"]
        command = " ".join(["echosearch train-identity", "--index", index_dir.name, "--out", out.name, *opts,
                            "--clean" if clean else "--no-clean"])
        provenance = {"command": command, **({"data": data} if data else {})}
        result = run(index_dir, out, cfg, progress=cb, provenance=provenance)
    if json_out:
        from dataclasses import asdict

        print_json({**asdict(result), "out_dir": str(result.out_dir)})
        return
    console.print(f"saved {shown(result.out_dir)} in {result.seconds:.0f} s ({result.n_train_studies} training "
                  f"studies, {len(result.dropped_study_keys)} dropped as suspected mislabels, "
                  f"{result.n_holdout_studies} held-out studies of {result.n_holdout_patients} patients); "
                  f"use it with --identity-model {shown(result.out_dir)} or ECHOSEARCH_IDENTITY_MODEL")


model_app = typer.Typer(help="Model registry: list and fetch weights.", no_args_is_help=True)


@model_app.command("list")
def model_list(json_out: bool = typer.Option(False, "--json")) -> None:
    """List registry models and whether each is available offline."""
    from echosearch.errors import ModelLoadError
    from echosearch.model.models import REGISTRY, resolve_model

    rows = []
    for name, spec in REGISTRY.items():
        try:
            src = resolve_model(name)
            where = str(src.weights)
        except ModelLoadError:
            where = None
        rows.append({"name": name, "available": where is not None, "weights": where,
                     "description": spec.description})
    if json_out:
        print_json(rows)
        return
    for r in rows:
        console.print(f"[bold]{r['name']}[/] {'available' if r['available'] else 'not downloaded'}: {r['description']}")


@model_app.command("tokens")
def model_tokens(
    text: str = typer.Argument(..., help="Report text or prompt to tokenize."),
    model: str = typer.Option("echosearch-demo", "--model", "-m", help="Model name or local-dir:DIR."),
    tokenizer_dir: Path = typer.Option(None, "--tokenizer", help="Folder with EchoCLIP-R's tokenizer files."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: ids, tokens, decoded text."),
) -> None:
    """Show the token ids a model's text tower receives for TEXT (the whole context row), and decode them."""
    from echosearch.model.encode import load_tokenizer

    tok = load_tokenizer(model, tokenizer_dir)
    ids = [int(i) for i in tok([text])[0].tolist()]
    used = ids[: max((i for i, x in enumerate(ids) if x != 0), default=-1) + 1]
    if hasattr(tok, "tokens"):  # EchoCLIP-R's template tokenizer
        tokens, decoded = tok.tokens(used), tok.decode(used)
    else:  # open_clip's BPE
        inner = getattr(tok, "tokenizer", tok)
        names = {v: k for k, v in getattr(inner, "encoder", {}).items()}
        tokens = [names.get(i, str(i)) for i in used]
        decoded = inner.decode(used) if hasattr(inner, "decode") else ""
    if json_out:
        print_json({"model": model, "ids": ids, "tokens": tokens, "text": decoded})
        return
    from rich.markup import escape

    console.print(f"{len(used)} of {len(ids)} positions used ({model})")
    for i, t in zip(used, tokens, strict=True):
        console.print(f"{i:>6}  {escape(t)}")
    console.print(f"decoded: {escape(decoded)}")


@model_app.command("fetch")
def model_fetch(name: str = typer.Argument(..., help="echo-clip or echo-clip-r")) -> None:
    """Download published weights into the Hugging Face cache (needs network)."""
    from echosearch.cli.common import shown
    from echosearch.model.models import fetch_model

    path = fetch_model(name)
    console.print(f"{shown(name)} is in {shown(path)}")
