"""The app's index through the ``echosearch server`` that owns the catalog (``/v1`` routes over HTTP).

Tables come back as Arrow IPC (:mod:`echosearch.serve.frames`), so a page gets the same frames, with the same
types, as from :class:`~echosearch.appcore.data.LocalAppIndex`. Every request names the person it is made for
in :data:`ACTOR_HEADER`: the server then leaves the access log of reads to the app (which logs what its
users look at, once per view) and records decisions under that person.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.appcore.data import AppIndex
from echosearch.appcore.search import SearchRequest, outcome_from_doc
from echosearch.search.view import SearchOutcome
from echosearch.serve.client import ServerClient
from echosearch.serve.frames import ARROW, read_frame

ACTOR_HEADER = "X-Echosearch-Actor"
APP_ACTOR = "app"  # the name reads are made under (they are logged by the app itself)


def _date(value: Any) -> date | None:
    return date.fromisoformat(value) if isinstance(value, str) else value


def _datetime(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


class RemoteAppIndex(AppIndex):
    """Calls the server at ``url`` (credentials from the environment, like the CLI: ``ECHOSEARCH_API_TOKEN``,
    else ``ECHOSEARCH_APP_USER`` / ``ECHOSEARCH_APP_PASSWORD``)."""

    remote = True

    def __init__(self, url: str, index_dir: Path | str, timeout: float = 600.0) -> None:
        self.index_dir = Path(index_dir)
        self.client = ServerClient(url, timeout=timeout)
        self.client.http.headers[ACTOR_HEADER] = APP_ACTOR
        self.url = self.client.url

    def close(self) -> None:
        self.client.close()

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.call(method, path, **kw)

    def _frame(self, path: str, params: Any = None) -> pl.DataFrame:
        data = self.client.call("GET", path, params=params, headers={"Accept": ARROW}, raw=True)
        return read_frame(data)

    # ---- audit trail ------------------------------------------------------------------------------------
    def log(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        self._json("POST", "/v1/access-log", json={"actor": actor, "action": action, "detail": detail},
                   headers={ACTOR_HEADER: actor})

    def access_log(self, limit: int = 200) -> pl.DataFrame:
        return self._frame("/v1/access-log", {"limit": limit})

    def access_events(self, actions: Sequence[str], since: datetime) -> list[tuple[Any, ...]]:
        df = self._frame("/v1/access-log", {"action": list(actions), "since": since.isoformat(), "limit": 1_000_000})
        return [(r["occurred_at"], r["action"], r["actor"], r["detail"]) for r in reversed(df.to_dicts())]

    # ---- facts ------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return dict(self.status()["manifest"])

    def _form_values(self) -> dict[str, Any]:
        doc = dict(self._json("GET", "/v1/filter-options"))
        return {**doc, "date_min": _date(doc.get("date_min")), "date_max": _date(doc.get("date_max"))}

    def patients(self) -> pl.DataFrame:
        return self._frame("/v1/patients")

    def study_videos(self, study_keys: list[int]) -> pl.DataFrame:
        return self._frame("/v1/studies/videos", {"study_key": [int(k) for k in study_keys]})

    def study_info(self, study_keys: list[int]) -> pl.DataFrame:
        return self._frame("/v1/studies", {"study_key": [int(k) for k in study_keys]})

    def reports(self, study_keys: list[int]) -> pl.DataFrame:
        return self._frame("/v1/studies/reports", {"study_key": [int(k) for k in study_keys]})

    def latest_run(self, kind: str) -> int | None:
        run = self._json("GET", f"/v1/runs/{kind}/latest").get("run_id")
        return None if run is None else int(run)

    def patient_timeline(self, patient_key: int) -> pl.DataFrame:
        return self._frame(f"/v1/patients/{int(patient_key)}/timeline")

    # ---- identity audit ---------------------------------------------------------------------------------
    def run_audit(self) -> int | None:
        run = self._json("POST", "/v1/audit", json={}).get("run_id")
        return None if run is None else int(run)

    def audit_results(self, suspects_only: bool = True) -> pl.DataFrame:
        return self._frame("/v1/audit", {"suspects_only": suspects_only})

    def audit_run(self) -> dict[str, Any] | None:
        run = self._json("GET", "/v1/audit/run").get("run")
        if run is None:
            return None
        return {**run, "started_at": _datetime(run.get("started_at"))}

    def record_decision(self, study_key: int, decision: str, reviewer: str, note: str | None = None) -> None:
        from echosearch.appcore.views import check_decision

        check_decision(decision, reviewer)
        self._json("POST", "/v1/audit/decisions", json={"study_key": int(study_key), "decision": decision,
                                                        "note": note}, headers={ACTOR_HEADER: reviewer})

    def decisions(self, study_key: int | None = None) -> pl.DataFrame:
        return self._frame("/v1/audit/decisions", {} if study_key is None else {"study_key": int(study_key)})

    # ---- index status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/info"))

    def ingest_errors(self) -> pl.DataFrame:
        from echosearch.appcore.data import ERRORS_SHOWN

        return self._frame("/v1/errors", {"limit": ERRORS_SHOWN})

    def calibrations(self) -> pl.DataFrame:
        return self._frame("/v1/calibrations")

    def score_distributions(self) -> pl.DataFrame:
        return self._frame("/v1/calibrations/score-distributions")

    # ---- clips and search -------------------------------------------------------------------------------
    def clip(self, video_key: int) -> tuple[bytes, str]:
        return self.client.call("GET", f"/v1/videos/{int(video_key)}/preview", raw=True, with_type=True)  # type: ignore[no-any-return]

    def _scope_frame(self, video_keys: list[int]) -> pl.DataFrame:
        return self._frame("/v1/videos/scope", {"video_key": [int(k) for k in video_keys]})

    def search(self, req: SearchRequest) -> SearchOutcome:
        import json

        headers = {"Accept": ARROW}
        if req.kind == "file":
            assert req.path is not None
            with Path(req.path).open("rb") as f:
                doc = self._json("POST", "/v1/search/trusted/upload", headers=headers,
                                 files={"file": (Path(req.path).name, f)}, data={"params": json.dumps(req.body())})
        else:
            doc = self._json("POST", "/v1/search/trusted", json=req.body(), headers=headers)
        return outcome_from_doc(doc)

    def matched_sentences(self, text: str | None, query: np.ndarray | None) -> list[tuple[str, bool]]:
        vec = None if query is None else np.asarray(query, np.float32).tolist()
        doc = self._json("POST", "/v1/search/sentences", json={"text": text or "", "vector": vec})
        return [(str(s), bool(hit)) for s, hit in doc["sentences"]]
