"""A real Orthanc for tests: Debian's ``orthanc`` (+ ``orthanc-dicomweb``) started with a temporary configuration.

HTTP on a free port with remote access refused (Orthanc 1.10 has no bind-address option: it listens on every
interface but answers only loopback clients), its own DICOM server off (tests use Orthanc as a storage SCU and
a DICOMweb server only), storage in a temporary folder, receivers registered as modalities. Stopped by process
id. ``make orthanc`` installs the packages; without the binary the tests that need it are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                     "/usr/lib/orthanc/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.path.exists(p)), None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's library (``dpkg -L orthanc-dicomweb``), or None."""
    found = next((p for p in PLUGIN_CANDIDATES if os.path.exists(p)), None)
    if found:
        return found
    try:
        out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    return next((line for line in out.splitlines() if "DicomWeb" in line and ".so" in line), None)


def require_orthanc() -> tuple[str, str]:
    """(binary, plugin), or skip the test with the reason and the fix."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None:
        pytest.skip("Orthanc is not installed (run `make orthanc`: Debian's orthanc and orthanc-dicomweb)")
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (run `make orthanc`)")
    return binary, plugin


class Orthanc:
    """One Orthanc process on loopback with a temporary configuration and storage."""

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]] | None = None) -> None:
        self.binary, self.plugin = require_orthanc()
        self.workdir = workdir
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.modalities = dict(modalities or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        return {
            "Name": "echosearch-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": False, "DicomAet": "ORTHANC", "DicomPort": free_port(),
            "DicomScuTimeout": 30, "SaveJobs": False, "StorageCompression": False, "HttpTimeout": 60,
            "MaximumStorageCacheSize": 0,  # read files from disk each time (a test removes one)
            "Plugins": [self.plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in self.modalities.items()},
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = (self.workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([self.binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   f"{(self.workdir / 'orthanc.log').read_text(errors='replace')[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        """Terminate by process id (the whole session it leads), kill if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- REST ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120.0) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json" if body[:1] in (b"{", b"[", b'"') else
                           "application/dicom")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path, timeout=5)

    def upload(self, path: Path) -> str:
        """REST upload of one DICOM file; returns Orthanc's instance id."""
        return str(self.request("POST", "/instances", path.read_bytes())["ID"])

    def set_modality(self, name: str, aet: str, port: int) -> None:
        """Register (or re-point) a DICOM modality at run time."""
        self.modalities[name] = (aet, port)
        self.request("PUT", f"/modalities/{name}",
                     json.dumps({"AET": aet, "Host": "127.0.0.1", "Port": port}).encode())

    def store_to(self, modality: str, resources: list[str], timeout: float = 120.0) -> Any:
        """C-STORE ``resources`` (instance/study ids) to a modality, synchronously; raises on failure."""
        body = json.dumps({"Resources": resources, "Synchronous": True, "Timeout": 60}).encode()
        return self.request("POST", f"/modalities/{modality}/store", body, timeout=timeout)
