"""Training: facts read from reports, the soft-target loss, and a few real steps of `echosearch train`."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.model.report_facts import (
    PromptSampler,
    ReportLabels,
    augment_report,
    fact_sentence,
    quantity_grid,
    relevance,
    report_facts,
    sentence_fact,
    split_sentences,
    statements,
    value_target,
    visible_in_view,
    visible_report,
)
from echosearch.model.train import (
    _augment_frame,
    _resample,
    clip_frame_indices,
    fact_anchor_loss,
    fact_listwise_loss,
    fact_pos_weight,
    pool_clips,
    soft_clip_loss,
)

PACER = "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD."
SENTENCES = [PACER, "MITRACLIP IN PLACE.", "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION.",
             "THE LEFT VENTRICLE IS MILDLY DILATED.", "STATUS POST ORTHOTOPIC HEART TRANSPLANT."]


def test_quantities_are_one_fact_however_phrased() -> None:
    assert sentence_fact("LV EJECTION FRACTION IS 50%.") == ("EJECTION FRACTION", 50.0)
    assert sentence_fact("LEFT VENTRICULAR EJECTION FRACTION ESTIMATED AT 35%.") == ("EJECTION FRACTION", 35.0)
    assert sentence_fact("LVIDD 41 MM.") == ("LVIDD # MM.", 41.0)
    assert sentence_fact("APICAL FOUR CHAMBER VIEW.") == ("VIEW:A4C", None)
    assert sentence_fact(PACER) == (PACER, None)


def test_relevance_of_findings_values_and_views() -> None:
    facts = report_facts(f"LV EJECTION FRACTION IS 50%. {PACER} LVIDD 41 MM.", view="PLAX")
    assert relevance(facts, PACER) == 1.0
    assert relevance(facts, "MITRACLIP IN PLACE.") == 0.0  # states what the report does not
    assert relevance(facts, "PARASTERNAL LONG AXIS VIEW. " + PACER) == 1.0
    assert relevance(facts, "APICAL FOUR CHAMBER VIEW.") == 0.0
    near = relevance(facts, "LEFT VENTRICULAR EJECTION FRACTION ESTIMATED AT 52%.")
    far = relevance(facts, "LV EJECTION FRACTION IS 30%.")
    assert relevance(facts, "LV EJECTION FRACTION IS 50%.") == 1.0 and 0.5 < near < 1.0 and far < 0.01


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=5, unique=True), st.integers(5, 80),
       st.sampled_from([None, "A4C", "PLAX"]), st.integers(0, 10_000))
def test_a_clip_is_always_fully_described_by_its_own_augmented_report(sents: list[str], ef: int, view: str | None,
                                                                      seed: int) -> None:
    report = " ".join([f"LV EJECTION FRACTION IS {ef}%.", *sents])
    facts = report_facts(report, view)
    text = augment_report(report, random.Random(seed), view)
    assert relevance(facts, text) == 1.0 == relevance(facts, statements(text))
    other = relevance(report_facts("LV EJECTION FRACTION IS 60%. NO INTRACARDIAC MASS OR DEVICE IS SEEN."), text)
    assert 0.0 <= other <= 1.0 and (other < 1.0 or ef == 60)  # another patient's report never fits unless equal
    assert other == relevance(report_facts("LV EJECTION FRACTION IS 60%. NO INTRACARDIAC MASS OR DEVICE IS SEEN."),
                              statements(text))  # pre-parsed statements score the same


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=5, unique=True), st.integers(5, 80),
       st.sampled_from([None, "A4C", "PLAX"]))
def test_each_fact_sentence_states_exactly_its_fact(sents: list[str], ef: int, view: str | None) -> None:
    """The anchor loss scores a fact's sentence against clips as the fact's label: it must state that fact."""
    facts = report_facts(" ".join([f"LV EJECTION FRACTION IS {ef}%.", *sents]), view)
    keys = [k for k, v in facts.items() if v is None]
    assert len(keys) == len(sents) + (view is not None)
    for key in keys:
        sentence = fact_sentence(key)
        assert sentence is not None and statements(sentence) == [(key, None)]
        assert relevance(facts, sentence) == 1.0
        assert relevance(report_facts("LV EJECTION FRACTION IS 60%."), sentence) == 0.0
    assert fact_sentence("VIEW:PSAX-AV") is None  # a sidecar's own view label has no sentence to anchor


def test_fact_anchor_loss_puts_a_rare_device_sentence_above_other_devices() -> None:
    """Trained with the anchor loss alone, a sentence that starts as "some device" (equally close to clip
    and pacer clips) ranks the 2 clip videos of a batch of 32 above the 6 pacer videos and the rest."""
    g = torch.Generator().manual_seed(0)
    d, clip, lead, tissue = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=1)
    kinds = [0] * 2 + [1] * 6 + [2] * 24  # MitraClip, pacer, no device
    base = {0: d + 0.6 * clip, 1: d + 0.6 * lead, 2: tissue}
    img = torch.nn.functional.normalize(torch.stack([base[k] + 0.3 * torch.randn(32, generator=g) for k in kinds]), dim=1)
    present = torch.tensor([[1.0] if k == 0 else [0.0] for k in kinds])
    text = torch.nn.Parameter(d.clone()[None])
    before = img @ torch.nn.functional.normalize(text, dim=1).detach().T
    assert before[:8].std() < 0.2 and before[2:8].max() > before[:2].min()  # clip and pacer not told apart
    opt = torch.optim.Adam([text], lr=0.05)
    pos_weight = torch.from_numpy(fact_pos_weight(present.numpy()))
    for _ in range(150):
        loss = fact_anchor_loss(img, torch.nn.functional.normalize(text, dim=1), present, torch.tensor(10.0),
                                torch.tensor([-2.7]), pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sims = (img @ torch.nn.functional.normalize(text, dim=1).detach().T)[:, 0]
    assert set(torch.argsort(sims, descending=True)[:2].tolist()) == {0, 1}


def test_fact_listwise_loss_ranks_a_rare_device_sentence_above_other_devices() -> None:
    """The same start as above, trained with the listwise term alone: the clip sentence's top 2 of 32
    become the 2 clip videos."""
    g = torch.Generator().manual_seed(0)
    d, clip, lead, tissue = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=1)
    kinds = [0] * 2 + [1] * 6 + [2] * 24
    base = {0: d + 0.6 * clip, 1: d + 0.6 * lead, 2: tissue}
    img = torch.nn.functional.normalize(torch.stack([base[k] + 0.3 * torch.randn(32, generator=g) for k in kinds]), dim=1)
    present = torch.tensor([[1.0, 0.0] if k == 0 else [0.0, 0.0] for k in kinds])  # a second fact nobody shows
    text = torch.nn.Parameter(torch.stack([d.clone(), tissue.clone()]))
    assert (img @ torch.nn.functional.normalize(text, dim=1).detach().T)[2:8, 0].max() > \
        (img @ torch.nn.functional.normalize(text, dim=1).detach().T)[:2, 0].min()
    opt = torch.optim.Adam([text], lr=0.05)
    for _ in range(100):
        loss = fact_listwise_loss(img, torch.nn.functional.normalize(text, dim=1), present, torch.tensor(20.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert text.grad is not None and torch.all(text.grad[1] == 0)  # a fact with no positive in the batch: no gradient
    sims = (img @ torch.nn.functional.normalize(text, dim=1).detach().T)[:, 0]
    assert set(torch.argsort(sims, descending=True)[:2].tolist()) == {0, 1}


def test_fact_listwise_loss_with_one_positive_each_is_the_text_to_image_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    present = torch.zeros(6, 3)
    present[[4, 0, 2], [0, 1, 2]] = 1.0
    expected = torch.nn.functional.cross_entropy(7.0 * txt @ img.T, torch.tensor([4, 0, 2]))
    assert torch.allclose(fact_listwise_loss(img, txt, present, torch.tensor(7.0)), expected, atol=1e-6)
    assert fact_listwise_loss(img, txt, torch.zeros(6, 3), torch.tensor(7.0)).item() == 0.0


@pytest.mark.parametrize("term", ["anchor", "listwise"])
def test_anchor_terms_leave_clips_that_do_not_state_a_value_out(term: str) -> None:
    """Both anchor terms score value sentences with soft targets; with ``known``, a clip whose report does
    not state the quantity cannot move the loss, however close it comes to the sentence."""
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=1)
    target = torch.tensor([[1.0, 0.2], [0.4, 0.0], [0.0, 1.0], [0.0, 0.0], [0.1, 0.5]])  # soft: value sentences
    known = torch.ones(5, 2)
    known[3] = 0.0  # clip 3's report states neither quantity
    other = img.clone()
    other[3] = txt[0]  # clip 3 made the best match of sentence 0

    def loss(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        if term == "anchor":
            return fact_anchor_loss(x, txt, target, torch.tensor(10.0), torch.tensor(-1.5), known=k)
        return fact_listwise_loss(x, txt, target, torch.tensor(10.0), k)

    masked = [loss(x, known) for x in (img, other)]
    plain = [loss(x) for x in (img, other)]
    assert torch.allclose(masked[0], masked[1]) and not torch.allclose(plain[0], plain[1])
    assert plain[1] > plain[0]  # without ``known`` it is a negative that now outranks the positives
    assert torch.allclose(loss(img, torch.ones(5, 2)), plain[0])


TAVR = "A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION."


def test_a_clip_is_paired_with_the_sentences_its_view_can_show() -> None:
    report = f"LV EJECTION FRACTION IS 40%. {PACER} {TAVR} MITRACLIP IN PLACE."
    assert visible_report(report, "PLAX") == report  # RV outflow and aortic valve are both in PLAX
    assert visible_report(report, "A4C") == f"LV EJECTION FRACTION IS 40%. {PACER} MITRACLIP IN PLACE."
    assert visible_report(report, "A2C") == "LV EJECTION FRACTION IS 40%. MITRACLIP IN PLACE."
    assert visible_report(report, "A5C") == report  # the five-chamber view adds the aortic valve to A4C
    assert visible_report(report, None) == report == visible_report(report, "NOT-A-VIEW")  # unknown: keep all
    assert visible_report(TAVR, "A4C") == TAVR  # nothing visible: the report rather than an empty text
    assert visible_in_view("AORTIC REGURGITATION INTO THE RIGHT VENTRICLE.", "A4C")  # one named structure in view
    assert not visible_in_view("TRICUSPID REGURGITATION.", "A2C")


def test_prompt_sampler_draws_statements_across_observed_ranges() -> None:
    reports = [f"LV EJECTION FRACTION IS {ef}%. {PACER}" for ef in (20, 45, 70)]
    sampler = PromptSampler.from_reports(reports, ["A4C", "PLAX", None])
    assert sampler.sentences == [PACER] and sampler.numeric == [("LV EJECTION FRACTION IS {}%.", 20.0, 70.0)]
    assert set(sampler.views) == {"APICAL FOUR CHAMBER VIEW.", "PARASTERNAL LONG AXIS VIEW."}
    rng = random.Random(0)
    drawn = [sampler.sample(rng) for _ in range(300)]
    efs = [sentence_fact(t)[1] for t in drawn if t.startswith("LV EJECTION")]
    assert efs and min(efs) >= 20 and max(efs) <= 70 and max(efs) - min(efs) > 30  # type: ignore[operator]
    assert PACER in drawn and "PARASTERNAL LONG AXIS VIEW." in drawn


@settings(max_examples=60, deadline=None)
@given(lo=st.integers(5, 60), span=st.integers(0, 40), n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_quantity_grid_spreads_each_quantity_over_its_observed_range(lo: int, span: int, n: int, seed: int) -> None:
    """n sentences per quantity, in its own phrasings, at values that cover its observed range evenly."""
    numeric = [("LV EJECTION FRACTION IS {}%.", float(lo), float(lo + span // 2)),
               ("LEFT VENTRICULAR EJECTION FRACTION ESTIMATED AT {}%.", float(lo + span // 3), float(lo + span)),
               ("AORTIC VALVE AREA {} CM2.", 1.0, 3.0)]
    grid = quantity_grid(numeric, n, random.Random(seed))
    assert [k for k, _, _ in grid] == ["AORTIC VALVE AREA # CM#."] * n + ["EJECTION FRACTION"] * n
    for key, lo_q, hi_q in (("EJECTION FRACTION", lo, lo + span), ("AORTIC VALVE AREA # CM#.", 1, 3)):
        rows = [(s, v) for k, s, v in grid if k == key]
        assert all(sentence_fact(s) == (key, v) for s, v in rows)  # each sentence states its value
        vals = [v for _, v in rows]
        assert all(lo_q <= v <= hi_q for v in vals) and vals == sorted(vals)
        width = (hi_q - lo_q) / n  # one value per n-th of the range (rounded to whole units)
        assert all(abs((v - lo_q) - (j + 0.5) * width) <= width / 2 + 0.5 for j, v in enumerate(vals))


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(0.1, 50.0), span=st.floats(0.0, 30.0), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_quantity_grid_values_are_whole_numbers_within_the_observed_range(lo: float, span: float, n: int,
                                                                          seed: int) -> None:
    grid = quantity_grid([("LVIDD {} MM.", lo, lo + span)], n, random.Random(seed))
    first, last = math.ceil(lo), max(math.floor(lo + span), math.ceil(lo))  # a range without a whole number: its ceiling
    assert all(v == int(v) and first <= v <= last for _, _, v in grid)


def test_value_target_is_the_relevance_of_a_value_sentence() -> None:
    known = np.array([[40.0], [44.0], [60.0], [np.nan]], np.float32)
    values = np.array([40.0, 50.0, 25.0], np.float32)
    target = value_target(known, values)
    for i, k in enumerate(known[:, 0]):
        clip = report_facts(f"LV EJECTION FRACTION IS {k:.0f}%." if k == k else PACER)
        for j, v in enumerate(values):
            assert target[i, j] == pytest.approx(relevance(clip, f"LV EJECTION FRACTION IS {v:.0f}%."), abs=1e-6)
    assert target[0, 0] == 1.0 and target[0, 1] < target[1, 1] < 1.0 and target[3].sum() == 0.0


def test_report_labels_are_standardised_and_masked() -> None:
    facts = [report_facts("LV EJECTION FRACTION IS 30%. " + PACER), report_facts("LV EJECTION FRACTION IS 60%."),
             report_facts("MITRACLIP IN PLACE.")]
    lab = ReportLabels.build(facts)
    assert lab.quantities == ["EJECTION FRACTION"] and PACER in lab.keys
    assert lab.stated[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert lab.values[0, 0] < 0 < lab.values[1, 0] and abs(lab.values[:2, 0].mean()) < 1e-5
    assert lab.present[:, lab.keys.index(PACER)].tolist() == [1.0, 0.0, 0.0]
    assert lab.known[:2, 0].tolist() == [30.0, 60.0] and np.isnan(lab.known[2, 0])  # as reported, NaN unstated


def test_soft_loss_with_identity_targets_is_open_clip_loss() -> None:
    import open_clip

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ours = soft_clip_loss(scale * img @ txt.T, torch.eye(6))
    ref = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, ref, atol=1e-6)
    # two clips with the same report: scoring both as positives removes the penalty for confusing them
    dup = torch.stack([img[0], img[0], img[2]])
    logits = (30.0 * dup @ dup.T).requires_grad_()
    block = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    g_soft = torch.autograd.grad(soft_clip_loss(logits, block), logits)[0]
    g_hard = torch.autograd.grad(soft_clip_loss(logits, torch.eye(3)), logits)[0]
    assert g_soft.abs().max() < 1e-3 < g_hard.abs().max()
    extra = torch.cat([torch.eye(6), torch.zeros(6, 2)], 1)  # texts that describe no clip: negatives only
    assert torch.isfinite(soft_clip_loss(scale * img @ torch.cat([txt, txt[:2]]).T, extra))


def test_fact_pos_weight_balances_rare_facts() -> None:
    present = np.zeros((100, 3), np.float32)
    present[:50, 0], present[:5, 1] = 1, 1  # common (50 %), rare (5 %), never seen
    w = fact_pos_weight(present, cap=8.0)
    assert w.tolist() == [1.0, 8.0, 8.0]  # 50/50 -> 1; 95/5 = 19 -> capped; an unseen fact does not divide by 0
    assert fact_pos_weight(present, cap=100.0)[1] == pytest.approx(19.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 16), st.integers(0, 1000))
def test_clip_frames_cover_the_cycle_evenly(n: int, k: int, offset: int) -> None:
    idx = clip_frame_indices(n, k, offset % n)
    assert len(idx) == min(n, k) == len(set(idx.tolist())) and idx.min() >= 0 and idx.max() < n
    assert idx[0] == offset % n  # the random phase comes first (the per-frame loss reads column 0)
    idx = np.sort(idx)
    gaps = np.diff(np.r_[idx, idx[0] + n])  # circular: the clip holds about one cardiac cycle
    assert gaps.sum() == n and gaps.max() - gaps.min() <= 1


def test_pooled_clips_are_the_index_video_vectors() -> None:
    from echosearch.model.encode import l2_normalise

    rng = np.random.default_rng(3)
    videos = [rng.standard_normal((3, 16)).astype(np.float32) for _ in range(4)]  # distinct frames per video
    frames = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(videos)), dim=-1)
    pooled = pool_clips(frames, 3).numpy()
    expected = np.stack([l2_normalise(frames.numpy()[3 * i:3 * i + 3].mean(axis=0)) for i in range(4)])
    assert np.allclose(pooled, expected, atol=1e-6)


def test_one_clip_gets_one_acquisition_jitter() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    clip = np.stack([base, base, np.roll(base, 5, axis=0)])
    out = _augment_frame(clip, np.random.default_rng(1))
    assert not np.array_equal(out[0], base) and np.array_equal(out[0], out[1])  # same gain and shift
    assert np.array_equal(out[2], np.roll(out[0], 5, axis=0))  # the shift is shared too: rolls commute


def test_acquisition_jitter_is_shared_by_a_clip_and_keeps_the_image_range() -> None:
    yy, xx = np.mgrid[:64, :64]
    disc = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 12**2, 220, 20).astype(np.uint8)
    clip = np.repeat(np.stack([disc, disc])[..., None], 3, axis=-1)
    for seed in range(5):
        out = _augment_frame(clip, np.random.default_rng(seed), zoom=0.2, lowres_p=1.0, gamma=0.3)
        assert out.dtype == np.uint8 and out.shape == clip.shape
        assert np.array_equal(out[0], out[1])  # one acquisition: the same zoom, resolution and gamma
        assert not np.array_equal(out[0], clip[0])
        # each option is applied on top of the same gain/shift draw (the rng's first draws)
        base = _augment_frame(clip, np.random.default_rng(seed))
        graded = _augment_frame(clip, np.random.default_rng(seed), gamma=0.3)
        assert not np.array_equal(graded, base)
        order = np.argsort(base[0].ravel(), kind="stable")  # a grey map keeps the order of grey levels
        assert np.all(np.diff(graded[0].ravel()[order].astype(int)) >= 0)
        blurred = _augment_frame(clip, np.random.default_rng(seed), lowres_p=1.0)
        edge = lambda f: np.abs(np.diff(f[0, :, :, 0].astype(int), axis=1)).max()  # noqa: E731
        assert edge(blurred) < edge(base)  # the disc's sharp rim is softened by the low-resolution pass
        zoomed = _augment_frame(clip, np.random.default_rng(seed), zoom=0.2)
        assert not np.array_equal(zoomed, base) and np.array_equal(zoomed[0], zoomed[1])


@given(scale=st.floats(0.8, 1.25))
@settings(max_examples=15, deadline=None)
def test_zoom_scales_a_disc_about_the_centre(scale: float) -> None:
    yy, xx = np.mgrid[:96, :96]
    disc = np.where((yy - 47.5) ** 2 + (xx - 47.5) ** 2 < 16**2, 255.0, 0.0)[None, :, :, None].astype(np.float32)
    out = _resample(disc, scale, 1.0)[0, :, :, 0]
    area = (out > 127).sum()
    assert abs(area / (disc > 127).sum() - scale**2) < 0.08  # the area follows the zoom
    cy, cx = np.argwhere(out > 127).mean(0)
    assert abs(cy - 47.5) < 1 and abs(cx - 47.5) < 1  # about the centre


def test_low_resolution_pass_blurs_fine_detail_but_keeps_brightness() -> None:
    fine = np.indices((64, 64)).sum(0) % 2 * 255.0  # a one-pixel checkerboard: detail only a full-res source keeps
    frame = fine[None, :, :, None].astype(np.float32)
    out = _resample(frame, 1.0, 0.5)
    assert out.std() < 0.2 * frame.std()
    assert abs(out.mean() - frame.mean()) < 5
    assert np.allclose(_resample(frame, 1.0, 1.0), frame)  # neither zoom nor resolution: unchanged


@pytest.fixture(scope="module")
def train_index(small_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small cohort scanned (with its reports) into an index; training decodes its own frames."""
    from echosearch.catalog import Catalog
    from echosearch.config import load_settings
    from echosearch.ingest.prepare import FramePolicy
    from echosearch.run.local import scan

    idx = tmp_path_factory.mktemp("train") / "idx"
    with Catalog.open(idx, create=True) as cat:
        summary = scan([small_cohort], cat, load_settings(workers=0, secret="test-secret-0123456789abcdef"),
                       policy=FramePolicy("sector", 4, 112), progress=False)
    assert summary.reports_attached > 0
    return idx


def test_train_command_runs_steps_and_writes_a_loadable_model(train_index: Path, tmp_path: Path) -> None:
    from echosearch.cli import main
    from echosearch.model.encode import load_encoder

    out = tmp_path / "model"
    rc = main(["train", "--index", str(train_index), "--out", str(out), "--epochs", "2", "--batch-size", "4",
               "--max-steps", "3", "--workers", "0", "--clip-frames", "3"])
    assert rc == 0
    cfg = json.loads((out / "open_clip_config.json").read_text())
    history = cfg["echosearch"]["history"]
    assert history and {"loss", "v2t_r1", "v2t_mean_rank"} <= set(history[-1])
    assert np.isfinite(history[-1]["loss"])
    enc = load_encoder(f"local-dir:{out}", device="cpu")
    vec = enc.encode_text(["MITRACLIP IN PLACE."])
    assert vec.shape == (1, 256) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
    assert (out / "checkpoints" / "last.pt").is_file()


def test_train_command_passes_the_anchor_options_to_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import echosearch.model.train as train_mod
    from echosearch.cli import main

    seen: list[train_mod.TrainConfig] = []

    def fake_train(index_dir: Path, out_dir: Path, config: train_mod.TrainConfig, progress: object = None) -> object:
        seen.append(config)
        return train_mod.TrainResult(out_dir=out_dir, epochs_run=0, steps=0)

    monkeypatch.setattr(train_mod, "train", fake_train)
    base = ["train", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "m")]
    assert main(base) == 0 and main([*base, "--anchor-weight", "2", "--listwise-weight", "0.5",
                                     "--quantity-anchors", "6", "--ema", "0.99", "--patient-weight", "0.5"]) == 0
    defaults = train_mod.TrainConfig()  # the CLI's defaults are the recipe's
    pick = lambda c: (c.anchor_weight, c.listwise_weight, c.quantity_anchors, c.ema, c.patient_weight)  # noqa: E731
    assert pick(seen[0]) == pick(defaults) and pick(seen[1]) == (2.0, 0.5, 6, 0.99, 0.5)


def test_only_the_last_epochs_train_pooled_clips(train_index: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    from echosearch.model.train import TrainConfig, train

    seen: list[tuple[int, int]] = []  # (epoch, images in a training forward)
    epoch = [1]
    original = open_clip.CLIP.encode_image

    def spy(self: open_clip.CLIP, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.training:
            seen.append((epoch[0], int(image.shape[0])))
        return original(self, image, normalize=normalize)

    def progress(phase: str, i: int, n: int, metrics: dict[str, float]) -> None:
        if phase == "epoch":
            epoch[0] = i + 1

    monkeypatch.setattr(open_clip.CLIP, "encode_image", spy)
    cfg = TrainConfig(epochs=3, batch_size=4, workers=0, clip_frames=3, clip_epochs=1, aux_weight=0.0)
    result = train(train_index, tmp_path / "m", cfg, progress=progress)
    assert result.epochs_run == 3 and seen
    assert {n for e, n in seen if e < 3} == {4} and {n for e, n in seen if e == 3} == {12}  # 4 clips x 3 frames


@pytest.mark.parametrize("visibility", [True, False])
def test_training_texts_hold_only_what_the_clip_view_shows(train_index: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, visibility: bool) -> None:
    import echosearch.model.train as train_mod
    from echosearch.catalog import Catalog

    with Catalog.open(train_index, read_only=True) as cat:
        pairs = cat.con.sql("SELECT r.text, v.view FROM videos v JOIN reports r USING (study_key)").fetchall()
    hidden = {(t, v) for t, v in pairs if visible_report(t, v) != t}
    assert hidden, "the small cohort should hold a finding some of its views cannot show"
    seen: list[tuple[str, str | None]] = []
    original = train_mod.augment_report

    def spy(report: str, rng: random.Random, view: str | None = None, view_rate: float = 0.5) -> str:
        seen.append((report, view))
        return original(report, rng, view, view_rate)

    monkeypatch.setattr(train_mod, "augment_report", spy)
    cfg = train_mod.TrainConfig(epochs=1, batch_size=4, workers=0, clip_epochs=0, view_visibility=visibility)
    train_mod.train(train_index, tmp_path / "m", cfg)
    assert seen
    invisible = [(t, v) for t, v in seen if any(not visible_in_view(s, v) for s in split_sentences(t))]
    assert (not invisible) if visibility else bool(invisible)
    # every clip got its own study's report, cut to its view (or whole): nothing else was dropped or added
    expected = {(visible_report(t, v), v) if visibility else (t, v) for t, v in pairs}
    assert set(seen) <= expected


def test_every_step_scores_each_fact_sentence_against_the_batch(train_index: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With anchors on, each training step's text pass ends with every fact's sentence (views included)."""
    import open_clip

    import echosearch.model.train as train_mod
    from echosearch.catalog import Catalog

    with Catalog.open(train_index, read_only=True) as cat:
        pairs = cat.con.sql("SELECT r.text, v.view FROM videos v JOIN reports r USING (study_key)").fetchall()
    facts = {k for t, v in pairs for k, val in report_facts(visible_report(t, v), v).items() if val is None}
    passes: list[list[str]] = []
    original = train_mod.encode_text_bucketed
    tok = open_clip.SimpleTokenizer(context_length=64)

    def spy(model: torch.nn.Module, tokens: torch.Tensor, buckets: int = 3) -> torch.Tensor:
        if model.training:
            passes.append([tok.decode([int(i) for i in row if int(i) not in (0, tok.sot_token_id, tok.eot_token_id)])
                           for row in tokens])
        return original(model, tokens, buckets)

    anchor_calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (present, pos_weight) per call
    real_loss = train_mod.fact_anchor_loss

    def loss_spy(img: torch.Tensor, fact_txt: torch.Tensor, present: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
        assert pos_weight is not None and fact_txt.shape[0] == present.shape[1] == bias.shape[0] == pos_weight.shape[0]
        anchor_calls.append((present, pos_weight))
        return real_loss(img, fact_txt, present, scale, bias, pos_weight)

    groups: list[int] = []
    real_adamw = torch.optim.AdamW

    def adamw_spy(params: list[dict[str, object]], **kw: object) -> torch.optim.Optimizer:
        groups.append(len(params))
        return real_adamw(params, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "encode_text_bucketed", spy)
    monkeypatch.setattr(train_mod, "fact_anchor_loss", loss_spy)
    monkeypatch.setattr(torch.optim, "AdamW", adamw_spy)
    listwise_calls: list[torch.Tensor] = []
    real_listwise = train_mod.fact_listwise_loss

    def listwise_spy(img: torch.Tensor, fact_txt: torch.Tensor, present: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        listwise_calls.append(present)
        return real_listwise(img, fact_txt, present, scale)

    monkeypatch.setattr(train_mod, "fact_listwise_loss", listwise_spy)
    for weight, listwise in ((1.0, 0.0), (0.0, 0.0), (0.0, 1.0)):
        passes.clear()
        anchor_calls.clear()
        listwise_calls.clear()
        train_mod.train(train_index, tmp_path / f"m{weight}-{listwise}", train_mod.TrainConfig(
            epochs=1, batch_size=4, workers=0, max_steps=2, clip_epochs=0, extra_texts=2, anchor_weight=weight,
            listwise_weight=listwise, quantity_anchors=0))
        facts_in_pass = weight or listwise  # the fact sentences ride along whenever either term is on
        assert len(passes) == 2 and all(len(p) == 4 + 2 + (len(facts) if facts_in_pass else 0) for p in passes)
        # anchors: one loss term per step over every fact, and their scale/biases in an undecayed group
        assert len(anchor_calls) == (2 if weight else 0) and groups.pop() == (2 if facts_in_pass else 1)
        assert len(listwise_calls) == (2 if listwise else 0)
        assert all(p.shape == (4, len(facts)) for p in listwise_calls)
        for present, _ in anchor_calls:
            assert present.shape == (4, len(facts)) and set(present.unique().tolist()) <= {0.0, 1.0}
            assert present.sum() >= 4  # every clip has its view at least
        if facts_in_pass:  # the BPE decoder spaces out punctuation: compare without spaces
            squash = lambda s: s.replace(" ", "").upper()  # noqa: E731
            assert {frozenset(map(squash, p[6:])) for p in passes} == {frozenset(squash(fact_sentence(k)) for k in facts)}


def test_quantity_anchors_score_value_sentences_against_each_clips_reported_value(
        train_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With quantity anchors, each step's text pass ends with n sentences per quantity at values across the
    training reports' range, and both anchor terms score them with the clip's value_target (soft, by distance)."""
    import open_clip

    import echosearch.model.train as train_mod
    from echosearch.catalog import Catalog

    with Catalog.open(train_index, read_only=True) as cat:
        reports = [t for (t,) in cat.con.sql("SELECT r.text FROM videos v JOIN reports r USING (study_key)").fetchall()]
    reported: dict[str, set[float]] = {}  # quantity -> values the training reports state (EF, LVIDd)
    for t in reports:
        for k, v in report_facts(t).items():
            if v is not None:
                reported.setdefault(k, set()).add(v)
    assert sorted(reported) == ["EJECTION FRACTION", "LVIDD # MM."] and all(len(v) > 3 for v in reported.values())
    tok = open_clip.SimpleTokenizer(context_length=64)
    passes: list[list[str]] = []
    original = train_mod.encode_text_bucketed

    def spy(model: torch.nn.Module, tokens: torch.Tensor, buckets: int = 3) -> torch.Tensor:
        if model.training:
            passes.append([tok.decode([int(i) for i in row if int(i) not in (0, tok.sot_token_id, tok.eot_token_id)])
                           for row in tokens])
        return original(model, tokens, buckets)

    targets: list[torch.Tensor] = []
    real_listwise = train_mod.fact_listwise_loss

    def listwise_spy(img: torch.Tensor, fact_txt: torch.Tensor, present: torch.Tensor, scale: torch.Tensor,
                     known: torch.Tensor | None = None) -> torch.Tensor:
        targets.append(present)
        return real_listwise(img, fact_txt, present, scale, known)

    clip_reports: list[str] = []  # each batch clip's report, in batch order (augment_report is called per clip)
    real_augment = train_mod.augment_report

    def augment_spy(report: str, rng: random.Random, view: str | None = None, view_rate: float = 0.5) -> str:
        clip_reports.append(report)
        return real_augment(report, rng, view, view_rate)

    bce_weights: list[torch.Tensor] = []
    real_bce = torch.nn.functional.binary_cross_entropy_with_logits

    def bce_spy(logits: torch.Tensor, target: torch.Tensor, **kw: object) -> torch.Tensor:
        if kw.get("weight") is not None:  # only the quantity term passes a mask
            bce_weights.append(kw["weight"])  # type: ignore[arg-type]
        return real_bce(logits, target, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "encode_text_bucketed", spy)
    monkeypatch.setattr(train_mod, "fact_listwise_loss", listwise_spy)
    monkeypatch.setattr(train_mod.F, "binary_cross_entropy_with_logits", bce_spy)
    monkeypatch.setattr(train_mod, "augment_report", augment_spy)
    train_mod.train(train_index, tmp_path / "m", train_mod.TrainConfig(
        epochs=1, batch_size=4, workers=0, max_steps=2, clip_epochs=0, extra_texts=2, listwise_weight=1.0,
        quantity_anchors=3))
    assert len(passes) == 2 and len(targets) == 4 and len(bce_weights) == 2  # facts + quantities, per step
    assert len(clip_reports) == 8
    squash = lambda s: re.sub(r"(?<=\d) (?=\d)|(?<=\S) (?=[%.])", "", s).upper()  # noqa: E731  BPE spacing
    for step, texts in enumerate(passes):
        parsed = [sentence_fact(squash(t)) for t in texts[-6:]]
        assert [k for k, _ in parsed] == ["EJECTION FRACTION"] * 3 + ["LVIDD # MM."] * 3, parsed
        assert all(min(reported[k]) <= v <= max(reported[k]) for k, v in parsed)  # type: ignore[operator]
        q_target = targets[2 * step + 1].numpy()
        assert q_target.shape == (4, 6) and 0.0 < q_target.max() <= 1.0
        # each clip's row is what its own report's EF and LVIDd give for these values
        batch_reports = clip_reports[4 * step:4 * step + 4]
        for cols, key in ((slice(0, 3), "EJECTION FRACTION"), (slice(3, 6), "LVIDD # MM.")):
            values = np.array([v for _, v in parsed[cols]], np.float32)
            own = np.array([[report_facts(r)[key]] for r in batch_reports], np.float32)
            assert np.allclose(q_target[:, cols], value_target(own, values), atol=1e-6), (q_target, own, values)
    assert all(w.shape == (4, 6) and bool(torch.all(w == 1)) for w in bce_weights)  # every clip here states both


def test_ema_exports_the_moving_average_of_each_steps_weights(train_index: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``ema``, the exported weights are the warmed-up moving average of the weights after each step
    (recomputed here from snapshots), while the checkpoint keeps the last step's raw weights."""
    import echosearch.model.train as train_mod

    snapshots: list[list[torch.Tensor]] = []  # the model's parameters (group 0) before training, then per step
    real_adamw = torch.optim.AdamW

    class Recording(real_adamw):  # type: ignore[misc,valid-type]
        def _snap(self) -> None:
            snapshots.append([p.detach().clone() for p in self.param_groups[0]["params"]])

        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, **kw)
            self._snap()

        def step(self, closure: object = None) -> object:
            out = super().step(closure)  # type: ignore[arg-type]
            self._snap()
            return out

    exported: dict[str, torch.Tensor] = {}
    real_write = train_mod.write_model_folder

    def write_spy(model: torch.nn.Module, *a: object, **kw: object) -> object:
        exported.update({n: p.detach().clone().float() for n, p in model.named_parameters()})
        return real_write(model, *a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(train_mod, "write_model_folder", write_spy)
    out = tmp_path / "m"
    train_mod.train(train_index, out, train_mod.TrainConfig(epochs=1, batch_size=4, workers=0, max_steps=4,
                                                            clip_epochs=0, extra_texts=2, ema=0.7, aux_weight=0.0,
                                                            lr=0.05))  # steps large enough to tell apart
    assert len(snapshots) == 5 and len(snapshots[0]) == len(exported)  # group 0 is exactly the model's parameters
    expected = snapshots[0]
    for step, snap in enumerate(snapshots[1:]):
        decay = min(0.7, (1 + step) / (10 + step))
        expected = [e * decay + v * (1 - decay) for e, v in zip(expected, snap, strict=True)]
    raw = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    moved = 0
    for (name, got), want, last in zip(exported.items(), expected, snapshots[-1], strict=True):
        if name == "logit_scale":  # clamped after each step, outside the optimiser
            continue
        assert torch.allclose(got, want, atol=1e-6), name
        assert torch.allclose(raw[name].float(), last, atol=1e-6), name  # the checkpoint: the raw last step
        moved += int(not torch.allclose(got, last, atol=1e-4))
    assert moved > len(exported) // 2  # the export is not the last step's weights


def test_patient_partners_are_other_studies_of_the_same_patient_view_and_heart() -> None:
    from echosearch.model.train import patient_partners

    patients = [1, 1, 1, 1, 2, 2, 1]
    studies = [10, 11, 11, 12, 20, 21, 13]
    views = ["A4C", "A4C", "PLAX", "A4C", "A4C", "A4C", "A4C"]
    texts = ["NORMAL.", "NORMAL.", "NORMAL.", "STATUS POST HEART TRANSPLANT.", "X.", "Y.", "NORMAL."]
    got = patient_partners(patients, studies, views, texts, pool=[0, 1, 2, 3, 4, 5])  # clip 6 held out
    assert got == {0: [1], 1: [0], 4: [5], 5: [4]}  # PLAX alone, the transplanted heart alone, 6 not in the pool


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_pairs=st.integers(0, 6))
def test_batches_with_partners_hold_each_clip_once_and_pair_same_patients(seed: int, n_pairs: int) -> None:
    import random

    from echosearch.model.train import patient_partners, with_partners

    rng = random.Random(seed)
    n = 60
    patients = [i // 6 for i in range(n)]  # 10 patients x 3 studies x 2 views
    studies = [i // 2 for i in range(n)]
    views = ["A4C" if i % 2 else "PLAX" for i in range(n)]
    partners = patient_partners(patients, studies, views, ["NORMAL."] * n, list(range(n)))
    batch = rng.sample(range(n), 12)
    out, pairs = with_partners(batch, partners, n_pairs, rng)
    assert len(out) == len(batch) == len(set(out)) and len(pairs) <= n_pairs
    assert out[: len(batch) - n_pairs] == batch[: len(batch) - n_pairs]
    for a, b in pairs:
        i, j = out[a], out[b]
        assert patients[i] == patients[j] and views[i] == views[j] and studies[i] != studies[j]


def test_patient_loss_prefers_the_partner_over_other_patients() -> None:
    from echosearch.model.train import patient_loss

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    pid = torch.tensor([0, 0, 1, 2, 3, 0])  # clips 0 and 1 paired; clip 5 is the same patient, left out
    near = base.clone()
    near[1] = torch.nn.functional.normalize(base[0] + 0.05 * torch.randn(16, generator=g), dim=0)
    far = base.clone()
    far[1] = -base[0]
    assert patient_loss(near, [(0, 1)], pid) < patient_loss(far, [(0, 1)], pid)
    self_twin = near.clone()
    self_twin[5] = self_twin[0]  # a third same-patient clip is neither positive nor negative
    assert torch.isclose(patient_loss(self_twin, [(0, 1)], pid), patient_loss(near, [(0, 1)], pid))
    assert patient_loss(near, [], pid) == 0


def test_patient_term_runs_in_training(train_index: Path, tmp_path: Path) -> None:
    from echosearch.model.train import TrainConfig, train

    cfg = TrainConfig(epochs=1, batch_size=8, workers=0, clip_epochs=0, patient_weight=1.0, patient_pairs=2,
                      max_steps=2)
    result = train(train_index, tmp_path / "m", cfg)
    assert result.steps == 2 and np.isfinite(result.history[-1]["loss"])


def test_stable_partners_state_the_same_findings() -> None:
    from echosearch.model.report_facts import report_facts
    from echosearch.model.train import patient_partners, stable_between

    base = "LV EJECTION FRACTION IS 55%. NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION."
    texts = [base, base.replace("55", "58"), base.replace("55", "35"),
             base + " ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.", base]
    facts = [report_facts(t, "A4C") for t in texts]
    assert stable_between(facts[0], facts[1]) and not stable_between(facts[0], facts[2])  # EF 55/58 vs 55/35
    assert not stable_between(facts[0], facts[3])  # a new lead is a change
    studies = [1, 2, 3, 4, 1]
    got = patient_partners([7] * 5, studies, ["A4C"] * 5, texts, list(range(5)), facts)
    assert got == {0: [1], 1: [0, 4], 4: [1]}  # 2 and 3 changed; 0 and 4 share a study
    assert set(patient_partners([7] * 5, studies, ["A4C"] * 5, texts, list(range(5)))[2]) == {0, 1, 3, 4}
