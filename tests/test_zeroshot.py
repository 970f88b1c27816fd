"""Zero-shot methods: EchoCLIP's rule against a written-out loop and torch, EchoCLIP-format prompt files,
method resolution, the contrast method unchanged, presence thresholds in change detection and in evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog
from echosearch.change import scan_changes
from echosearch.errors import ConfigError
from echosearch.model.models import ModelSpec
from echosearch.model.zeroshot import (
    PromptBank,
    binary,
    decision_threshold,
    echoclip_binary,
    echoclip_regression,
    load_prompts,
    predict,
    prompts_from_echoclip_file,
    recorded_thresholds,
    regression,
    resolve_method,
)

try:
    from test_identity import DIM, Cohort, build_catalog
except ImportError:  # pragma: no cover - when tests are imported as a package
    from tests.test_identity import DIM, Cohort, build_catalog


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def loop_binary(frames: np.ndarray, prompts: np.ndarray) -> list[float]:
    """EchoCLIP's binary rule written out: per video, mean over frames of the mean over candidates."""
    out = []
    for video in frames.tolist():
        per_frame = [sum(sum(a * b for a, b in zip(f, p, strict=True)) for p in prompts.tolist()) / len(prompts)
                     for f in video]
        out.append(sum(per_frame) / len(per_frame))
    return out


def loop_regression(frames: np.ndarray, prompts: np.ndarray, values: np.ndarray) -> list[float]:
    """EchoCLIP's regression rule written out with plain loops and sorted lists."""
    out = []
    c = len(prompts)
    for video in frames.tolist():
        ranked_rows = []
        for f in video:
            sims = [sum(a * b for a, b in zip(f, p, strict=True)) for p in prompts.tolist()]
            order = sorted(range(c), key=lambda i: -sims[i])
            ranked_rows.append([float(values[i]) for i in order])
        averaged = [sum(row[r] for row in ranked_rows) / len(ranked_rows) for r in range(c)]
        k = int(c * 0.2)
        top = sorted(averaged[:k])
        out.append(top[(k - 1) // 2])
    return out


def _data(seed: int, videos: int, frames: int, c: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fv = unit(rng.normal(size=(videos, frames, dim)))
    pv = unit(rng.normal(size=(c, dim)))
    values = rng.integers(0, 101, size=c).astype(np.float64)
    return fv, pv, values


@pytest.mark.parametrize("c", [13, 14, 15, 19, 202])
def test_echoclip_regression_matches_the_loop(c: int) -> None:
    fv, pv, values = _data(c, videos=6, frames=5, c=c, dim=12)
    got = echoclip_regression(fv, pv, values)
    assert got.shape == (6,)
    assert got == pytest.approx(loop_regression(fv, pv, values), abs=1e-6)
    k = int(c * 0.2)
    if c in (13, 14):  # k truncates where round would give 3
        assert k == 2 and round(0.2 * c) == 3
    if k % 2 == 0:  # the lower median, not numpy's mean of the two middle values, for some video
        order = np.argsort(-(fv @ pv.T), axis=2)
        ranked = values[order].mean(axis=1)[:, :k]
        assert np.any(np.abs(np.median(ranked, axis=1) - got) > 1e-6)


def test_echoclip_regression_template_by_value_candidates() -> None:
    """2 templates x 101 values, as EchoCLIP builds its EF candidates (values repeat across templates)."""
    rng = np.random.default_rng(5)
    values = np.tile(np.arange(101, dtype=np.float64), 2)
    pv = unit(rng.normal(size=(202, 16)))
    fv = unit(rng.normal(size=(3, 7, 16)))
    assert echoclip_regression(fv, pv, values) == pytest.approx(loop_regression(fv, pv, values), abs=1e-6)


def test_echoclip_binary_matches_the_loop() -> None:
    fv, pv, _ = _data(1, videos=4, frames=6, c=3, dim=10)
    got = echoclip_binary(fv, pv)
    assert got.shape == (4,)
    assert got == pytest.approx(loop_binary(fv, pv), abs=1e-6)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(5, 40), st.integers(2, 12), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_echoclip_rules_match_the_loop_over_shapes(videos: int, frames: int, c: int, dim: int, seed: int) -> None:
    fv, pv, values = _data(seed, videos, frames, c, dim)
    assert echoclip_regression(fv, pv, values) == pytest.approx(loop_regression(fv, pv, values), abs=1e-6)
    assert echoclip_binary(fv, pv) == pytest.approx(loop_binary(fv, pv), abs=1e-6)


@pytest.mark.parametrize("c", [13, 14, 202])
def test_echoclip_rules_match_torch(c: int) -> None:
    torch = pytest.importorskip("torch")
    fv, pv, values = _data(100 + c, videos=5, frames=8, c=c, dim=16)
    sims = torch.from_numpy(fv) @ torch.from_numpy(pv).T  # (V, F, C)
    ranked = torch.from_numpy(values)[torch.argsort(sims, dim=-1, descending=True)]
    k = int(c * 0.2)
    expected = ranked.float().mean(dim=1)[:, :k].median(dim=-1)[0]
    assert echoclip_regression(fv, pv, values) == pytest.approx(expected.double().numpy(), rel=1e-6)
    assert echoclip_binary(fv, pv) == pytest.approx(sims.mean(dim=-1).mean(dim=-1).numpy(), abs=1e-9)


def test_echoclip_regression_refuses_too_few_candidates() -> None:
    fv, pv, values = _data(2, videos=1, frames=2, c=4, dim=6)
    with pytest.raises(ValueError, match=r"int\(4 \* 0.2\) = 0"):
        echoclip_regression(fv, pv, values)
    with pytest.raises(ValueError, match="values"):
        echoclip_regression(fv, pv, values[:3])


# ---- prompt banks --------------------------------------------------------------------------------------
class TextEncoder:
    """Deterministic text vectors (a hash seeds each text's vector); records every text it was asked for."""

    def __init__(self, dim: int = DIM) -> None:
        self.embed_dim, self.seen = dim, []

    def vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return unit(np.random.default_rng(seed).normal(size=self.embed_dim)).astype(np.float32)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.embed_dim), np.float32)


ECHOCLIP_FILE = {
    "ejection_fraction": {"mode": "regression", "range": [0, 100],
                          "label_sources": ["THE LEFT VENTRICULAR EJECTION FRACTION IS <#>%.", "LVEF IS <#>%."]},
    "pacemaker": {"mode": "binary", "label_sources": ["PACER LEAD IN THE RIGHT VENTRICLE."]},
    "impella": {"mode": "binary", "label_sources": ["IMPELLA IN PLACE."], "threshold": 0.31, "testers": ["x"]},
    "lv_size": {"mode": "categorical", "label_sources": ["THE LEFT VENTRICLE IS <#>."], "values": ["normal", "dilated"],
                "value_mapping": {"normal": "NORMAL IN SIZE", "dilated": ["MODERATELY DILATED", "SEVERELY DILATED"]}},
    "rv_grade": {"mode": "categorical", "label_sources": ["RV FUNCTION IS <#>."], "values": [1, 2],
                 "value_mapping": {"NORMAL": 1, "REDUCED": 2}},
}


@pytest.fixture
def echoclip_file(tmp_path: Path) -> Path:
    path = tmp_path / "zero_shot_prompts.json"
    path.write_text(json.dumps(ECHOCLIP_FILE))
    return path


def test_echoclip_prompt_file_builds_echoclip_candidates(echoclip_file: Path) -> None:
    prompts = load_prompts(str(echoclip_file))
    assert prompts == prompts_from_echoclip_file(echoclip_file)
    assert set(prompts["regression"]) == {"ef"} and set(prompts["binary"]) == {"pacer_lead", "impella"}
    enc = TextEncoder()
    bank = PromptBank.build(enc, prompts, method="echoclip")  # type: ignore[arg-type]
    values, vecs, _ = bank.regression["ef"]
    assert vecs.shape == (202, DIM) and values.tolist() == list(range(101)) * 2
    assert "LVEF IS 37%." in enc.seen and "THE LEFT VENTRICULAR EJECTION FRACTION IS 100%." in enc.seen
    assert np.allclose(vecs[101 + 37], enc.vector("LVEF IS 37%."))  # each template x value is its own candidate
    assert bank.binary["pacer_lead"][0].shape == (1, DIM) and bank.binary["pacer_lead"][1].shape == (0, DIM)
    assert bank.thresholds == {"pacer_lead": 0.298, "impella": 0.31}
    assert bank.manifest() == {"method": "echoclip", "thresholds": {"pacer_lead": 0.298, "impella": 0.31},
                               "prompts": "zero_shot_prompts.json",
                               "classes": {"lv_size": ["normal", "dilated"], "rv_grade": ["1", "2"]}}
    kept = prompts_from_echoclip_file(echoclip_file, aliases=None)
    assert set(kept["regression"]) == {"ejection_fraction"} and "pacemaker" in kept["binary"]


def test_echoclip_prompt_file_predictions_and_categorical_argmax(echoclip_file: Path) -> None:
    enc = TextEncoder()
    bank = PromptBank.build(enc, load_prompts(str(echoclip_file)), method="echoclip")  # type: ignore[arg-type]
    assert bank.categorical["lv_size"][1][1].shape == (2, DIM)  # two words for "dilated"
    assert {"RV FUNCTION IS NORMAL.", "RV FUNCTION IS REDUCED."} <= set(enc.seen)  # words -> class mapping
    frames = np.stack([enc.vector("THE LEFT VENTRICLE IS SEVERELY DILATED."), enc.vector("RV FUNCTION IS REDUCED."),
                       enc.vector("LVEF IS 40%.")])
    out = predict(bank, frames)
    assert out["lv_size"] == 1.0 and out["rv_grade"] == 2.0  # class position (text classes), class value (numeric)
    values, vecs, _ = bank.regression["ef"]
    assert out["ef"] == pytest.approx(float(echoclip_regression(frames[None], vecs, values)[0]))
    assert out["pacer_lead"] == pytest.approx(float((frames @ bank.binary["pacer_lead"][0].T).mean()))


def test_contrast_refuses_binary_tasks_without_negatives(echoclip_file: Path) -> None:
    with pytest.raises(ConfigError, match="negative prompts"):
        PromptBank.build(TextEncoder(), load_prompts(str(echoclip_file)), method="contrast")  # type: ignore[arg-type]


def test_unrecognised_prompt_file(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"ef": {"templates": ["x"]}}))
    with pytest.raises(ConfigError):
        load_prompts(str(tmp_path / "p.json"))


def test_contrast_method_unchanged() -> None:
    """The default bank is today's: templates averaged per value, positive and negative sets, same numbers."""
    enc = TextEncoder()
    p = load_prompts()
    bank = PromptBank.build(enc)  # type: ignore[arg-type]
    assert bank.method == "contrast" and bank.source == "echosearch"
    assert bank.thresholds == dict.fromkeys(p["binary"], 0.0)
    spec = p["regression"]["ef"]
    lo, hi = spec["values"]
    values = np.arange(lo, hi + 1, dtype=np.float32)
    mean = np.mean([enc.encode_text([t.format(int(v)) for v in values]) for t in spec["templates"]], axis=0)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    assert np.array_equal(bank.regression["ef"][1], mean.astype(np.float32))
    frames = unit(np.random.default_rng(4).normal(size=(6, DIM))).astype(np.float32)
    out = predict(bank, frames)
    assert out["ef"] == regression(frames, values, mean.astype(np.float32), spec["top_fraction"])
    for task, b in p["binary"].items():
        assert out[task] == binary(frames, enc.encode_text(b["positive"]), enc.encode_text(b["negative"]))
    assert list(out) == ["ef", *p["binary"]]


def test_echoclip_bank_on_echosearch_prompts() -> None:
    enc = TextEncoder()
    bank = PromptBank.build(enc, method="echoclip")  # type: ignore[arg-type]
    spec = load_prompts()["regression"]["ef"]
    n = spec["values"][1] - spec["values"][0] + 1
    assert bank.regression["ef"][1].shape == (len(spec["templates"]) * n, DIM)
    assert bank.thresholds == {"pacer_lead": 0.298, "tavr": None, "mitraclip": None, "lv_dilated": None}


def test_resolve_method() -> None:
    assert resolve_method("auto", "echo-clip") == "echoclip"
    assert resolve_method("auto", "echo-clip-r") == "echoclip"
    assert resolve_method("auto", "echosearch-demo") == "contrast"
    assert resolve_method("auto", ModelSpec(name="mine", description="", frame_policy="echoclip")) == "echoclip"
    assert resolve_method("auto", ModelSpec(name="mine", description="")) == "contrast"
    assert resolve_method("contrast", "echo-clip") == "contrast"
    assert resolve_method("echoclip", "echosearch-demo") == "echoclip"
    with pytest.raises(ConfigError):
        resolve_method("median", "echo-clip")


def test_decision_thresholds() -> None:
    assert decision_threshold("pacer_lead", "contrast", 0.5) == 0.0
    assert decision_threshold("pacer_lead", "echoclip") == 0.298
    assert decision_threshold("pacemaker", "echoclip") == 0.298
    assert decision_threshold("tavr", "echoclip") is None
    assert decision_threshold("tavr", "echoclip", 0.27) == 0.27
    assert recorded_thresholds(None) == {"pacer_lead": 0.0, "tavr": 0.0, "mitraclip": 0.0, "lv_dilated": 0.0}
    rec = recorded_thresholds({"method": "echoclip", "thresholds": {"pacer_lead": 0.298}})
    assert rec["pacer_lead"] == 0.298 and rec["tavr"] is None


# ---- change detection and evaluation ---------------------------------------------------------------------
def _echoclip_scale_catalog(root: Path) -> tuple[Path, list[Any]]:
    """Findings on EchoCLIP's scale (about 0.25 absent); patient P1's pacer score rises past 0.298."""
    gen = Cohort(seed=5)
    studies = gen.patients(12, visits=(3, 4))
    rng = np.random.default_rng(2)
    for s in studies:
        s.preds.update({t: 0.25 + float(rng.normal(0, 0.002)) for t in ("pacer_lead", "tavr", "mitraclip",
                                                                         "lv_dilated")})
    pacer = [s for s in studies if s.true == "P1"]
    for s in pacer[2:]:
        s.preds["pacer_lead"] = 0.33
    return build_catalog(root, studies, videos_per_study=1), studies


def test_change_uses_the_recorded_presence_threshold(tmp_path: Path) -> None:
    index, _ = _echoclip_scale_catalog(tmp_path)
    with Catalog.open(index) as cat:
        old = scan_changes(cat, store=False)  # no record: contrast, 0 -> every study already "present"
        cat.set_manifest("zeroshot", {"method": "echoclip", "thresholds": {"pacer_lead": 0.298}, "prompts": "x"})
        new = scan_changes(cat, store=False)
    row = {df_name: df.filter(pl.col("patient_pseudonym") == "P1").sort("visit").row(2, named=True)
           for df_name, df in (("old", old), ("new", new))}
    assert "new pacer/ICD lead" not in row["old"]["explanation"]
    assert "new pacer/ICD lead" in row["new"]["explanation"] and "new pacer/ICD lead" in row["new"]["reasons"]


def test_compare_methods_on_video_and_frame_vectors(tmp_path: Path) -> None:
    from echosearch.evaluation.core import compare_methods, join_truth

    index, studies = _echoclip_scale_catalog(tmp_path)
    truth = pl.DataFrame([{"path": f"{s.true}/{s.uid}/A4C.dcm", "true_patient_id": s.true, "ef": s.preds["ef"],
                           "pacer_lead": s.preds["pacer_lead"] > 0.3} for s in studies])
    with Catalog.open(index) as cat:
        vt = join_truth(cat, truth)
        df = compare_methods(cat, TextEncoder(), vt)  # type: ignore[arg-type]
        assert df.columns == ["task", "method", "metric", "value", "n", "vectors"]
        assert set(df["vectors"]) == {"video vectors (one frame each)"}
        assert set(df["method"]) == {"echoclip", "contrast"} and set(df["task"]) == {"ef", "pacer_lead"}
        assert set(df["n"]) == {len(studies)}
        ef = df.filter(pl.col("task") == "ef")
        assert ef["metric"].to_list() == ["mae", "mae"] and all(v >= 0 for v in ef["value"])
        ids, vecs = cat.embeddings("video")
        frames = [np.stack([v, v]) for v in vecs]  # two identical frames: same numbers as one frame
        cat.store_video_embeddings(ids.tolist(), vecs, [2] * len(ids), frames)
        assert np.array_equal(cat.frame_embeddings([int(ids[0])])[int(ids[0])], frames[0])
        again = compare_methods(cat, TextEncoder(), vt)  # type: ignore[arg-type]
    assert set(again["vectors"]) == {"frame vectors"}
    assert again.drop("vectors").equals(df.drop("vectors"))


def test_study_pooling_follows_the_recorded_task_kinds() -> None:
    """A binary task from an EchoCLIP prompt file (no echosearch alias) pools by max, a categorical by mode."""
    from echosearch.model.zeroshot import BINARY_TASKS, pooling_tasks, study_predictions

    entry = {"method": "echoclip", "thresholds": {"pacer_lead": 0.298, "impella": None}, "classes": {"la_size": ["1", "2", "3"]}}
    binary, categorical = pooling_tasks(entry)
    videos = [{"ef": 40.0, "impella": 0.20, "la_size": 2.0}, {"ef": 50.0, "impella": 0.31, "la_size": 3.0},
              {"ef": 60.0, "impella": 0.25, "la_size": 2.0}]
    out = study_predictions(videos, binary, categorical)
    assert out == {"ef": 50.0, "impella": 0.31, "la_size": 2.0}
    assert study_predictions(videos)["impella"] == pytest.approx(0.76 / 3)  # unknown kinds: the mean
    assert pooling_tasks(None) == (set(BINARY_TASKS), set())
