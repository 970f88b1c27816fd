"""Model loading from every source (random weights, EchoCLIP's architecture), encoder contract, zero-shot maths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.errors import ModelLoadError
from echosearch.model.encode import encode_text_bucketed, load_encoder
from echosearch.model.models import resolve_model, write_model_folder
from echosearch.model.train import DEMO_MODEL_CFG
from echosearch.model.zeroshot import regression, study_predictions


def _random_folder(folder: Path, cfg: dict, seed: int = 0, hints: dict | None = None) -> Path:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    return write_model_folder(model, cfg, folder, hints=hints)


@pytest.fixture(scope="module")
def echoclip_arch_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    cfg = open_clip.get_model_config("convnext_base")
    assert cfg["embed_dim"] == 512 and cfg["vision_cfg"]["image_size"] == 224
    return _random_folder(tmp_path_factory.mktemp("echoclip") / "model", cfg, hints={"frame_policy": "echoclip"})


REPORT_SENTENCES = ["ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.",
                    "MITRACLIP IN PLACE.", "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION.",
                    "THE LEFT VENTRICLE IS MILDLY DILATED.", "LV EJECTION FRACTION IS 35%."]


def _frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)


def test_echoclip_architecture_loads_from_every_source(echoclip_arch_folder: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _frames(2, 224)
    ref = load_encoder(f"local-dir:{echoclip_arch_folder}", device="cpu", frames_per_video=2)
    assert ref.embed_dim == 512 and ref.image_size == 224 and ref.policy.name == "echoclip"
    v_ref = ref.encode_frames(frames)
    assert v_ref.shape == (2, 512) and np.allclose(np.linalg.norm(v_ref, axis=1), 1, atol=1e-5)
    t_ref = ref.encode_text(["LV EJECTION FRACTION IS 35%."])
    with torch.inference_mode():  # the encoder trims padding; open_clip's full 77-token pass agrees
        full = ref.model.encode_text(ref.tokenize(["LV EJECTION FRACTION IS 35%."]), normalize=True).numpy()
    assert np.allclose(t_ref, full, atol=1e-5)

    # Hugging Face cache layout (offline): models--owner--name/snapshots/<rev>/ + refs/main
    cache = tmp_path / "hub"
    snap = cache / "models--mkaichristensen--echo-clip" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in echoclip_arch_folder.iterdir():
        (snap / f.name).symlink_to(f)
    (cache / "models--mkaichristensen--echo-clip" / "refs").mkdir()
    (cache / "models--mkaichristensen--echo-clip" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = load_encoder("echo-clip", device="cpu", frames_per_video=2)
    assert np.array_equal(hub.encode_frames(frames), v_ref)
    assert np.array_equal(hub.encode_text(["LV EJECTION FRACTION IS 35%."]), t_ref)
    assert hub.identity["weights_sha256"] == ref.identity["weights_sha256"]

    # a bare weights file with its architecture
    wf = load_encoder(f"convnext_base@{echoclip_arch_folder / 'open_clip_model.safetensors'}", device="cpu")
    assert np.allclose(wf.encode_frames(frames), v_ref, atol=1e-5)


def test_missing_hub_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="echosearch model fetch echo-clip-r"):
        resolve_model("echo-clip-r")
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_model("nope")
    with pytest.raises(ModelLoadError, match="not an open_clip model folder"):
        resolve_model(f"local-dir:{tmp_path}")


def test_reload_is_bit_identical_and_batching_does_not_change_vectors(tmp_path: Path) -> None:
    folder = _random_folder(tmp_path / "demo-arch", DEMO_MODEL_CFG, seed=3)
    a = load_encoder(f"local-dir:{folder}", device="cpu")
    b = load_encoder(f"local-dir:{folder}", device="cpu")
    frames = _frames(5, a.image_size, seed=1)
    va = a.encode_frames(frames, batch_size=5)
    assert np.array_equal(va, b.encode_frames(frames, batch_size=5))
    assert np.allclose(va, a.encode_frames(frames, batch_size=2), atol=1e-5)
    assert not a.model.training


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=3, max_size=3), st.integers(1, 5))
@settings(max_examples=30, deadline=None)
def test_regression_recovers_the_value_whose_prompt_matches(mix: list[float], n_frames: int) -> None:
    # prompts for values 0..100 on a 1-D circle; a frame pointing at value v must predict ~v
    values = np.arange(0, 101, dtype=np.float32)
    angles = values / 100 * np.pi / 2
    prompts = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    target = 20 + 60 * mix[0]
    ang = target / 100 * np.pi / 2
    frames = np.tile(np.array([[np.cos(ang), np.sin(ang)]], np.float32), (n_frames, 1))
    assert abs(regression(frames, values, prompts, 0.2) - target) <= 1.0


def test_study_predictions_take_max_for_findings_and_mean_for_ef() -> None:
    out = study_predictions([{"ef": 30.0, "pacer_lead": -0.1}, {"ef": 40.0, "pacer_lead": 0.2}])
    assert out == {"ef": 35.0, "pacer_lead": 0.2}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.sampled_from(REPORT_SENTENCES), min_size=0, max_size=6), min_size=1, max_size=9),
       st.integers(1, 4), st.sampled_from(["argmax", "last"]))
def test_bucketed_text_encoding_equals_open_clip_and_keeps_gradients(docs: list[list[str]], buckets: int,
                                                                     pool: str) -> None:
    """Trimming padding per length bucket is exact (causal text tower, pooled at end-of-text), in any order;
    a pooling that trimming would change ('last') falls back to open_clip's own path."""
    import open_clip

    torch.manual_seed(0)
    text_cfg = {**DEMO_MODEL_CFG["text_cfg"], "layers": 2, "pool_type": pool}
    model = open_clip.CLIP(**{**DEMO_MODEL_CFG, "text_cfg": text_cfg})
    model.eval()
    tokens = open_clip.SimpleTokenizer(context_length=64)([" ".join(d) for d in docs])
    tokens[0, 3:5] = torch.where(tokens[0, 3:5] == 49407, tokens[0, 3:5], 0)  # token 0 is a real BPE piece
    ours = encode_text_bucketed(model, tokens, buckets=buckets)
    ref = model.encode_text(tokens, normalize=True)
    assert torch.allclose(ours, ref, atol=1e-5)
    ours.sum().backward()
    assert model.token_embedding.weight.grad is not None and model.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
