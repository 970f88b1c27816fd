"""Shared fixtures: paths to the real DICOM corpus and a demo-mode environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _find_real_dicom() -> Path:
    """The real-DICOM corpus: ``ECHOSEARCH_REAL_DICOM``, else ``shared/testdata/real-dicom`` beside the checkout
    (or beside any folder above it); tests that need it are skipped when neither exists."""
    env = os.environ.get("ECHOSEARCH_REAL_DICOM")
    if env:
        return Path(env)
    for base in ROOT.parents:
        cand = base / "shared" / "testdata" / "real-dicom"
        if cand.is_dir():
            return cand
    return ROOT / "shared" / "testdata" / "real-dicom"


REAL_DICOM = _find_real_dicom()

os.environ.setdefault("ECHOSEARCH_SECRET", "test-secret-0123456789abcdef")


@pytest.fixture
def real_dicom_dir() -> Path:
    if not REAL_DICOM.is_dir():
        pytest.skip(f"real DICOM corpus not found at {REAL_DICOM}")
    return REAL_DICOM


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo architecture with random weights, in open_clip's folder format (fast, offline)."""
    import open_clip
    import torch

    from echosearch.model.models import write_model_folder
    from echosearch.model.train import DEMO_MODEL_CFG

    torch.manual_seed(0)
    model = open_clip.CLIP(**DEMO_MODEL_CFG)
    return write_model_folder(model, DEMO_MODEL_CFG, tmp_path_factory.mktemp("models") / "random-demo-arch",
                              hints={"name": "random-demo-arch", "frame_policy": "sector"})


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-patient synthetic cohort (DICOM, with a mislabel and events), generated once per session."""
    from echosearch.synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "cohort"
    generate_cohort(out, patients=6, seed=11, visits=(2, 3), views=("A4C", "PLAX"), mislabel_rate=0.2)
    return out


def demo_model_available() -> bool:
    from echosearch.model.models import DEMO_MODEL_DIR

    return (DEMO_MODEL_DIR / "open_clip_model.safetensors").is_file()


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Streamlit's AppTest leaves the app script as ``sys.modules["__main__"]``; every process spawned later in
    this session (decode workers) would then run that script on start-up and die. Put the real one back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main
