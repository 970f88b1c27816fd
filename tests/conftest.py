"""Shared fixtures: paths to the real DICOM corpus and a demo-mode environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DICOM = ROOT.parent / "shared" / "testdata" / "real-dicom"

os.environ.setdefault("ECHOSEARCH_SECRET", "test-secret-0123456789abcdef")


@pytest.fixture
def real_dicom_dir() -> Path:
    if not REAL_DICOM.is_dir():
        pytest.skip(f"real DICOM corpus not found at {REAL_DICOM}")
    return REAL_DICOM
