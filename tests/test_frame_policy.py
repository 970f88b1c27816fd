"""The frame policy: one resolver (auto = the model's own), EchoCLIP's channel order, every-frame sampling.

The EchoCLIP checks compare echosearch's model input with EchoCLIP's published inference written out here
(``utils.read_avi`` + ``crop_and_scale``, then ``ToPILImage`` and open_clip's preprocess): OpenCV reads BGR
frames and the model receives them as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from echosearch.catalog import Catalog
from echosearch.config import load_settings
from echosearch.errors import ConfigError, ModelMismatchError
from echosearch.ingest.decode import decode_video
from echosearch.ingest.discover import inspect_file
from echosearch.ingest.frame_policy import resolve_frame_policy
from echosearch.ingest.prepare import FramePolicy, policy_manifest, sample_indices
from echosearch.model.encode import Encoder, encoder_for_index, load_encoder
from echosearch.model.models import REGISTRY, ModelSpec, write_model_folder
from echosearch.run.local import index_sources
from echosearch.run.read import process_file

# a tiny open_clip model with EchoCLIP's image side (224) and frame-policy hint: loads in well under a second
TINY_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 32, "layers": 1,
                                            "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
COLOUR_DICOM = "US-PAL-8-10x-echo_JPEGLS.dcm"  # parasternal long axis with colour Doppler, 10 frames, 430x600


@pytest.fixture(scope="module")
def echoclip_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    torch.manual_seed(0)
    return write_model_folder(open_clip.CLIP(**TINY_CFG), TINY_CFG, tmp_path_factory.mktemp("m") / "tiny-echoclip",
                              hints={"name": "tiny-echoclip", "frame_policy": "echoclip"})


@pytest.fixture(scope="module")
def tiny_encoder(echoclip_tiny: Path) -> Encoder:
    return load_encoder(f"local-dir:{echoclip_tiny}", device="cpu", frames_per_video=4, sampling="all")


def echoclip_crop_and_scale(img: np.ndarray, res: tuple[int, int] = (224, 224), zoom: float = 0.1) -> np.ndarray:
    """EchoCLIP's ``utils.crop_and_scale`` (general output shape), written out independently."""
    in_res = (img.shape[1], img.shape[0])
    r_in, r_out = in_res[0] / in_res[1], res[0] / res[1]
    if r_in > r_out:
        padding = int(round((in_res[0] - r_out * in_res[1]) / 2))
        img = img[:, padding:-padding]
    if r_in < r_out:
        padding = int(round((in_res[1] - in_res[0] / r_out) / 2))
        img = img[padding:-padding]
    if zoom != 0:
        pad_x, pad_y = round(int(img.shape[1] * zoom)), round(int(img.shape[0] * zoom))
        img = img[pad_y:-pad_y, pad_x:-pad_x]
    return cv2.resize(img, res, interpolation=cv2.INTER_CUBIC)


def echoclip_read_avi(path: Path) -> np.ndarray:
    """EchoCLIP's ``utils.read_avi(path, (224, 224))``: OpenCV's BGR frames, each cropped and scaled."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(echoclip_crop_and_scale(frame))
    cap.release()
    return np.array(frames)


def echo_like_rgb(t: int = 7, h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """RGB frames (T,H,W,3): a speckled fan, a red/blue colour-Doppler jet that moves, yellow burned-in text."""
    rng = np.random.default_rng(seed)
    fan = np.zeros((h, w), np.uint8)
    cv2.ellipse(fan, (w // 2, 4), (h - 10, h - 10), 90, -38, 38, 1, -1)
    out = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        grey = (rng.gamma(2.0, 30.0, (h, w)).clip(0, 255) * fan).astype(np.uint8)
        frame = np.repeat(grey[..., None], 3, -1)
        cv2.ellipse(frame, (w // 2 + 2 * i, 60), (14, 9), 20, 0, 360, (220, 40, 30), -1)  # flow towards: red
        cv2.ellipse(frame, (w // 2 - 18, 70 - i), (8, 6), 0, 0, 360, (30, 60, 230), -1)  # away: blue
        cv2.putText(frame, "HR 72", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 230, 0), 1)
        out[i] = frame
    return out


def write_avi(path: Path, rgb: np.ndarray, fourcc: str) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, (rgb.shape[2], rgb.shape[1]))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV cannot write {fourcc} AVI")
    for frame in rgb:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))  # VideoWriter takes BGR
    writer.release()
    return path


def real_file(real_dicom_dir: Path, name: str) -> Path:
    path = real_dicom_dir / name
    if not path.is_file():
        pytest.skip(f"{name} not in the real-DICOM corpus")
    return path


# ---- the resolver --------------------------------------------------------------------------------------
def test_auto_is_the_models_own_policy_with_its_size(echoclip_tiny: Path) -> None:
    demo = resolve_frame_policy(REGISTRY["echosearch-demo"], n_frames=8)
    assert (demo.name, demo.size, demo.n_frames, demo.chosen) == ("sector", 112, 8, "auto")
    assert demo == resolve_frame_policy("echosearch-demo", n_frames=8)  # by name: the same spec
    clip = resolve_frame_policy(REGISTRY["echo-clip"])  # weights need not be downloaded
    assert (clip.name, clip.size, clip.n_frames, clip.chosen) == ("echoclip", 224, 16, "auto")
    assert resolve_frame_policy(REGISTRY["echo-clip-r"]).name == "echoclip"
    folder = resolve_frame_policy(f"local-dir:{echoclip_tiny}")  # a folder's hint and its config's image side
    assert (folder.name, folder.size) == ("echoclip", 224)
    assert resolve_frame_policy(REGISTRY["echo-clip"], size=96).size == 96  # an encoder's image side wins
    odd = ModelSpec(name="odd", description="", frame_policy="letterbox", arch="none")
    with pytest.raises(ConfigError, match="letterbox"):
        resolve_frame_policy(odd)
    with pytest.raises(ConfigError, match="auto"):
        resolve_frame_policy(None)
    with pytest.raises(ConfigError, match="bogus"):
        resolve_frame_policy(REGISTRY["echo-clip"], setting="bogus")
    with pytest.raises(ConfigError, match="sampling"):
        resolve_frame_policy(REGISTRY["echo-clip"], sampling="every")


def test_explicit_setting_wins_and_is_recorded_beside_the_identity(echoclip_tiny: Path) -> None:
    explicit = resolve_frame_policy(REGISTRY["echo-clip"], setting="sector")
    assert (explicit.name, explicit.size, explicit.chosen) == ("sector", 224, "explicit")  # size: the model's
    assert resolve_frame_policy("echosearch-demo", setting="echoclip").size == 112
    auto_same = resolve_frame_policy(REGISTRY["echosearch-demo"], size=224)
    # how a policy was chosen does not make two identically prepared indexes incompatible
    assert auto_same == explicit and policy_manifest(auto_same) == policy_manifest(explicit)
    assert "chosen" not in policy_manifest(explicit)
    enc = load_encoder(f"local-dir:{echoclip_tiny}", device="cpu", policy="sector")
    assert enc.policy.name == "sector" and enc.identity["frame_policy_chosen"] == "explicit"
    assert load_encoder(f"local-dir:{echoclip_tiny}", device="cpu").identity["frame_policy_chosen"] == "auto"


def test_policy_identity_has_per_policy_version_and_channel_order() -> None:
    sector, clip = policy_manifest(FramePolicy("sector", 16, 112)), policy_manifest(FramePolicy("echoclip", 16, 224))
    assert (sector["version"], sector["channel_order"], sector["masking"]) == (2, "rgb", True)
    assert (clip["version"], clip["channel_order"], clip["masking"]) == (3, "bgr", False)
    assert policy_manifest(FramePolicy(sampling="all"))["sampling"] == "all"
    with pytest.raises(ValueError, match="sampling"):
        FramePolicy(sampling="every")  # type: ignore[arg-type]


# ---- every frame ---------------------------------------------------------------------------------------
def test_all_sampling_yields_every_frame(real_dicom_dir: Path, tmp_path: Path) -> None:
    every = FramePolicy(n_frames=4, sampling="all")
    assert sample_indices(137, every).tolist() == list(range(137)) and sample_indices(1, every).tolist() == [0]
    dicom = process_file(inspect_file(real_file(real_dicom_dir, COLOUR_DICOM)), every)
    assert dicom.frame_indices.tolist() == list(range(10)) and dicom.frames.shape == (10, 112, 112, 3)
    avi = process_file(inspect_file(write_avi(tmp_path / "clip.avi", echo_like_rgb(t=23), "MJPG")), every)
    assert avi.frame_indices.tolist() == list(range(23)) and len(avi.frames) == 23
    assert len(process_file(inspect_file(tmp_path / "clip.avi"), FramePolicy(n_frames=4)).frames) == 4


# ---- EchoCLIP's channel order ------------------------------------------------------------------------------
def test_echoclip_input_is_bgr_of_the_decoded_rgb_on_a_real_colour_dicom(real_dicom_dir: Path,
                                                                      tiny_encoder: Encoder) -> None:
    import open_clip
    import torchvision.transforms as T

    path = real_file(real_dicom_dir, COLOUR_DICOM)
    prepared = process_file(inspect_file(path), tiny_encoder.policy)
    rgb = decode_video(path, "dicom").frames
    expected_rgb = np.stack([echoclip_crop_and_scale(f) for f in rgb])
    np.testing.assert_array_equal(prepared.frames, expected_rgb[..., ::-1])  # crop/resize, then reverse...
    np.testing.assert_array_equal(  # ... is reverse, then crop/resize (EchoCLIP crops OpenCV's BGR frames)
        prepared.frames, np.stack([echoclip_crop_and_scale(np.ascontiguousarray(f[..., ::-1])) for f in rgb]))
    diff = np.abs(prepared.frames.astype(int) - expected_rgb.astype(int))
    assert diff.max() > 100 and diff.mean() > 1  # colour Doppler: red and blue really swap
    # the model's tensor is what EchoCLIP's ToPILImage + open_clip preprocess make of those BGR frames
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_encoder.source.folder}")
    theirs = torch.stack([preprocess(T.ToPILImage()(f)) for f in expected_rgb[..., ::-1].copy()])
    torch.testing.assert_close(tiny_encoder.frames_to_tensor(prepared.frames), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fourcc", ["FFV1", "MJPG"])  # lossless, and EchoNet-style 4:2:0 motion JPEG
def test_echoclip_input_equals_echoclips_published_avi_reading(tmp_path: Path, tiny_encoder: Encoder,
                                                              fourcc: str) -> None:
    path = write_avi(tmp_path / "clip.avi", echo_like_rgb(), fourcc)
    theirs = echoclip_read_avi(path)  # OpenCV (FFmpeg) decode: BGR
    ours = process_file(inspect_file(path), tiny_encoder.policy)  # PyAV decode: RGB, then the echoclip policy
    assert ours.frames.shape == theirs.shape == (7, 224, 224, 3)
    np.testing.assert_array_equal(ours.frames, theirs)  # decode + crop + resize + channel order, pixel for pixel


# ---- deciding the policy once, and the index identity ---------------------------------------------------------
def _sources(real_dicom_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(real_file(real_dicom_dir, COLOUR_DICOM), folder / "doppler.dcm")
    write_avi(folder / "a4c.avi", echo_like_rgb(t=9), "MJPG")
    return folder


def test_index_with_default_settings_uses_the_models_policy(real_dicom_dir: Path, echoclip_tiny: Path,
                                                            tmp_path: Path) -> None:
    from echosearch.cli import main

    src = _sources(real_dicom_dir, tmp_path / "src")
    settings = load_settings(model=f"local-dir:{echoclip_tiny}", workers=0, frames_per_video=3)
    assert settings.frame_policy == "auto" and settings.frame_sampling == "uniform"
    summary = index_sources([src], tmp_path / "auto", settings, progress=False)
    assert summary.videos_encoded == 2 and summary.frames_encoded == 6
    with Catalog.open(tmp_path / "auto", read_only=True) as cat:
        model = cat.get_manifest("model")
    assert model["preprocessing"]["name"] == "echoclip" and model["preprocessing"]["channel_order"] == "bgr"
    assert model["preprocessing"]["version"] == 3 and model["frame_policy_chosen"] == "auto"

    explicit = load_settings(model=f"local-dir:{echoclip_tiny}", workers=0, frames_per_video=3, frame_policy="sector")
    index_sources([src], tmp_path / "explicit", explicit, progress=False)
    with Catalog.open(tmp_path / "explicit", read_only=True) as cat:
        model = cat.get_manifest("model")
    assert model["preprocessing"]["name"] == "sector" and model["frame_policy_chosen"] == "explicit"

    # the index CLI: --all-frames encodes every frame (10 + 9) and records it
    args = ["index", str(src), "--index", str(tmp_path / "all"), "--model", f"local-dir:{echoclip_tiny}",
            "--workers", "0", "--all-frames", "--json"]
    assert main(args) == 0
    with Catalog.open(tmp_path / "all", read_only=True) as cat:
        assert cat.get_manifest("model")["preprocessing"]["sampling"] == "all"
        assert cat.con.sql("SELECT sum(n_frames_used) FROM video_embeddings").fetchall()[0][0] == 19


def test_an_index_from_the_rgb_echoclip_policy_is_refused_with_a_reencode_message(
        real_dicom_dir: Path, echoclip_tiny: Path, tmp_path: Path) -> None:
    src = _sources(real_dicom_dir, tmp_path / "src")
    settings = load_settings(model=f"local-dir:{echoclip_tiny}", workers=0, frames_per_video=3)
    index_sources([src], tmp_path / "idx", settings, progress=False)
    with Catalog.open(tmp_path / "idx") as cat:  # rewrite the identity as echosearch wrote it before BGR
        model = cat.get_manifest("model")
        del model["preprocessing"]["channel_order"]
        model["preprocessing"]["version"] = 2
        cat.set_manifest("model", model)
    message = r"echoclip preprocessing v2 \(RGB\); this echosearch uses v3 \(BGR, as EchoCLIP's published .*re-encode"
    with pytest.raises(ModelMismatchError, match=message):
        index_sources([src], tmp_path / "idx", settings, progress=False)
    with Catalog.open(tmp_path / "idx", read_only=True) as cat, pytest.raises(ModelMismatchError, match=message):
        encoder_for_index(cat, device="cpu")

    # a sector index written before channel orders were recorded stays valid
    sector = load_settings(model=f"local-dir:{echoclip_tiny}", workers=0, frames_per_video=3, frame_policy="sector")
    index_sources([src / "a4c.avi"], tmp_path / "sector", sector, progress=False)
    with Catalog.open(tmp_path / "sector") as cat:
        model = cat.get_manifest("model")
        assert model["preprocessing"].pop("channel_order") == "rgb" and model["preprocessing"]["version"] == 2
        cat.set_manifest("model", model)
    again = index_sources([src], tmp_path / "sector", sector, progress=False)
    assert again.videos_encoded == 1
    with Catalog.open(tmp_path / "sector", read_only=True) as cat:
        assert encoder_for_index(cat, device="cpu").policy.name == "sector"  # the stored name, not the model's


def test_preview_cli_defaults_to_the_models_policy(real_dicom_dir: Path, echoclip_tiny: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.cli import main

    path = real_file(real_dicom_dir, COLOUR_DICOM)
    assert main(["preview", str(path), "--out", str(tmp_path / "demo.png")]) == 0  # the demo model: sector
    assert "policy sector" in " ".join(capsys.readouterr().out.split())
    assert main(["preview", str(path), "--out", str(tmp_path / "clip.png"), "--model",
                 f"local-dir:{echoclip_tiny}"]) == 0
    assert "policy echoclip" in " ".join(capsys.readouterr().out.split())
    assert main(["preview", str(path), "--out", str(tmp_path / "x.png"), "--model", f"local-dir:{echoclip_tiny}",
                 "--policy", "sector"]) == 0
    assert "policy sector" in " ".join(capsys.readouterr().out.split())
    sheet = cv2.imread(str(tmp_path / "clip.png"))
    assert sheet is not None and sheet.shape[1] > sheet.shape[0]


def test_previews_of_an_echoclip_index_show_true_colour(tmp_path: Path) -> None:
    from echosearch.ingest.previews import PREVIEW_SIZE, preview_frames, preview_policy

    rgb = echo_like_rgb()
    path = write_avi(tmp_path / "clip.avi", rgb, "FFV1")  # lossless: decoded frames are ``rgb`` exactly
    policy = preview_policy({"name": "echoclip", "channel_order": "bgr", "version": 3})
    assert (policy.name, policy.channel_order, policy.size) == ("echoclip", "bgr", PREVIEW_SIZE)
    frames, _ = preview_frames(path, policy)  # what people see: the model's crop, not its channel order
    expected = np.stack([echoclip_crop_and_scale(f, (PREVIEW_SIZE, PREVIEW_SIZE)) for f in rgb])
    np.testing.assert_array_equal(frames, expected)
    assert preview_policy(None).name == "sector"  # no index policy: the demo model's own
