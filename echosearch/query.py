"""The query API: nearest videos, studies or reports to a vector, text, video file or catalog id, with filters.

Every method returns a polars DataFrame, best first: ``rank``, ``score`` (cosine similarity; with a study
context, see :data:`TEXT_CONTEXT`, the weighted sum of the clip's and its study's cosines, the clip's own in
``clip_score``) and the catalog metadata of each hit (``RESULT_COLUMNS``), joined by catalog key. The catalog is opened read-only; vector
indexes are loaded on first use and refused when stale; the encoder is loaded only for text/file queries.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.errors import ModelMismatchError, QueryError
from echosearch.filters import Filters, resolve_ids
from echosearch.run.single import embed_file
from echosearch.store.vectorindex import LEVELS, VectorIndex, build_all, catalog_count, load_index, normalise

RESULT_COLUMNS = ("rank", "score", "video_key", "study_key", "study_uid", "patient_pseudonym", "study_date", "view",
                  "manufacturer", "path", "pred_ef")
REPORT_COLUMNS = ("rank", "score", "study_key", "study_uid", "patient_pseudonym", "study_date", "report_text")

TEXT_CONTEXT = 0.5
"""Default weight of a clip's study vector in a text query's clip scores (docs/search.md, "Study context").

A finding is reported per study and its evidence is spread over the study's views: ranking a clip by
``(1 - c) cos(q, clip) + c cos(q, study)`` raised the demo model's finding recall@10 on fresh cohorts from
0.767 to 0.841 (validation seeds) and 0.796 to 0.854 (report seeds), and the recall of clips whose view can
show the finding from 0.822 to 0.875 and 0.848 to 0.881, at ``c = 0.5``.
"""


def context_score(clip: np.ndarray, study: np.ndarray, c: float) -> np.ndarray:
    """``(1 - c) clip + c study`` of cosines; a clip whose study has no vector (NaN) scores as the clip alone."""
    study = np.where(np.isnan(study), clip, study)
    return ((1 - c) * clip + c * study).astype(np.float32)


@dataclass
class SearchInfo:
    """How the last search ran: ``n_available`` results existed (after filters), ``plan`` exact or ann."""

    level: str
    k: int
    n_available: int
    n_returned: int
    plan: str
    filters: dict[str, Any] = field(default_factory=dict)
    context: float = 0.0


class Searcher:
    """Search one index folder. Not for concurrent use from several threads without its lock (held per call)."""

    context_fetch = 64
    """First length of both ranked lists of a study-context search (grown 4x per round until exact)."""

    def __init__(self, index_dir: Path | str, *, encoder: Any = None, catalog: Catalog | None = None) -> None:
        """Open ``index_dir``'s catalog read-only, or use ``catalog`` (a reader the caller owns and closes)."""
        self.index_dir = Path(index_dir)
        self._owns_catalog = catalog is None
        self.catalog = Catalog.open(self.index_dir, read_only=True) if catalog is None else catalog
        self._encoder = encoder
        self._indexes: dict[str, VectorIndex] = {}
        self._video_study: tuple[np.ndarray, np.ndarray] | None = None
        self._study_videos: tuple[np.ndarray, np.ndarray] | None = None
        self._orphan_keys: np.ndarray | None = None
        self._row_study: np.ndarray | None = None
        self._lock = threading.RLock()
        self.last_info: SearchInfo | None = None

    def close(self) -> None:
        if self._owns_catalog:
            self.catalog.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- resources ------------------------------------------------------------------------------
    def index(self, level: str) -> VectorIndex:
        """The level's vector index, loaded (and checked against the catalog) on first use."""
        if level not in LEVELS:
            raise QueryError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
        with self._lock:
            if level not in self._indexes:
                if catalog_count(self.catalog, level) == 0:
                    raise QueryError(f"index {self.index_dir} has no {level} embeddings: run `echosearch index` first")
                self._indexes[level] = load_index(self.index_dir, level, self.catalog)
            return self._indexes[level]

    def encoder(self) -> Any:
        """The encoder this index was built with (loaded on first text/file query)."""
        if self._encoder is None:
            from echosearch.model.encode import encoder_for_index

            self._encoder = encoder_for_index(self.catalog)
        else:
            ident, stored = getattr(self._encoder, "identity", None), self.catalog.get_manifest("model")
            if isinstance(ident, dict) and isinstance(stored, dict) and any(
                    ident.get(key) != stored.get(key) for key in ("weights_sha256", "embed_dim")):
                raise ModelMismatchError(f"index {self.index_dir} was built with {stored.get('name')}; "
                                         f"the given encoder is {ident.get('name')}")
        return self._encoder

    def _vector(self, level: str, key: int) -> np.ndarray:
        ids, vecs = self.catalog.embeddings(level, [int(key)])
        if len(ids) == 0:
            raise QueryError(f"{level} {key} has no embedding in {self.index_dir} (unknown id or not encoded yet)")
        return vecs[0]

    def _study_of(self, video_keys: np.ndarray) -> np.ndarray:
        """Study key of each video key (cached key table)."""
        if self._video_study is None:
            self._video_study = self.catalog.video_study_keys()
        keys, studies = self._video_study
        pos = np.clip(np.searchsorted(keys, video_keys), 0, max(len(keys) - 1, 0))
        return studies[pos] if len(keys) else np.zeros(len(video_keys), np.int64)

    def _videos_of_studies(self, study_keys: np.ndarray) -> np.ndarray:
        """Video keys of the given studies (cached key table sorted by study)."""
        if self._study_videos is None:
            self._study_of(np.zeros(0, np.int64))  # loads the key table
            assert self._video_study is not None
            keys, studies = self._video_study
            order = np.argsort(studies, kind="stable")
            self._study_videos = (studies[order], keys[order])
        studies, videos = self._study_videos
        lo, hi = np.searchsorted(studies, study_keys, "left"), np.searchsorted(studies, study_keys, "right")
        return np.concatenate([videos[a:b] for a, b in zip(lo, hi, strict=True)] or [np.zeros(0, np.int64)])

    def _row_studies(self, vi: VectorIndex) -> np.ndarray:
        """Study key of each row of the video index (cached like the index)."""
        if self._row_study is None:
            self._row_study = self._study_of(vi.ids)
        return self._row_study

    def _study_key(self, study_uid: str) -> int:
        key = self.catalog.study_key(study_uid)
        if key is None:
            raise QueryError(f"study {study_uid!r} is not in {self.index_dir}")
        return key

    # ---- the core -----------------------------------------------------------------------------
    def _search(self, vec: np.ndarray, k: int, level: str, filters: Filters | None, *,
                exclude: set[int] | None = None, collapse_study: bool = False, context: float = 0.0) -> pl.DataFrame:
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if not 0.0 <= context <= 1.0:
            raise QueryError(f"context must lie in [0, 1], got {context}")
        if level != "video" or (context > 0 and "study" not in self._indexes
                                and catalog_count(self.catalog, "study") == 0):
            context = 0.0  # no study vectors yet (an interrupted first index): clips stand alone
        with self._lock:
            vi = self.index(level)
            q = np.asarray(vec, dtype=np.float32).reshape(1, -1)
            if q.shape[1] != vi.dim:
                raise QueryError(f"query vector has width {q.shape[1]}; the {level} index has {vi.dim}")
            sel = resolve_ids(self.catalog.con, level, filters)
            drop = np.asarray(sorted(exclude or ()), dtype=np.int64)
            if sel is not None and len(drop):
                sel = np.setdiff1d(sel, drop, assume_unique=True)
            rows = None if sel is None else vi.rows_of(sel)
            n_pool = vi.ntotal if rows is None else len(rows)
            dropped = vi.rows_of(drop) if sel is None else np.zeros(0, np.int64)
            n_available = n_pool - len(dropped)
            collapse = collapse_study and level == "video"
            if collapse:  # distinct studies among the available clips, in O(n)
                studies = self._row_studies(vi)
                per_study = np.bincount(studies if rows is None else studies[rows])
                np.subtract.at(per_study, studies[dropped], 1)
                n_available = int(np.count_nonzero(per_study))
            extra: dict[str, np.ndarray] = {}
            if context > 0:
                ids, scores, clip = self._context_search(q, k, vi, sel, drop, collapse, context)
                extra = {"clip_score": clip}
            else:
                ids, scores = self._plain_search(q, k, vi, sel, drop, collapse, n_pool)
            scores, ids = scores[:k], ids[:k]
            frame = self._frame(level, ids, scores, {c: v[:k] for c, v in extra.items()})
            plan = vi.plan_for(None if sel is None else n_pool)
            self.last_info = SearchInfo(level, k, n_available, frame.height, plan,
                                        filters.as_dict() if filters else {}, context)
            return frame

    def _plain_search(self, q: np.ndarray, k: int, vi: VectorIndex, sel: np.ndarray | None, drop: np.ndarray,
                      collapse: bool, n_pool: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the best items by their own vectors, fetching more until k remain after exclusions
        and (``collapse``) one clip per study."""
        fetch = min(n_pool, (4 * k if collapse else k) + (len(drop) if sel is None else 0))
        while True:
            scores, ids = vi.search(q, fetch, selector_ids=sel)
            scores, ids = scores[0], ids[0]
            if len(drop) and sel is None:
                keep = ~np.isin(ids, drop)
                scores, ids = scores[keep], ids[keep]
            if collapse:  # best clip per study: first occurrence in score order
                _, first = np.unique(self._study_of(ids), return_index=True)
                first = np.sort(first)
                scores, ids = scores[first], ids[first]
            if len(ids) >= k or fetch >= n_pool:
                break
            fetch = min(n_pool, fetch * 4)
        return ids, scores

    def _orphans(self, vi: VectorIndex, si: VectorIndex) -> np.ndarray:
        """Video keys of clips whose study has no study vector (a run stopped before pooling): no study list
        reaches them, so every context search scores them (cached like the indexes)."""
        if self._orphan_keys is None:
            self._orphan_keys = vi.ids[~np.isin(self._row_studies(vi), si.ids)]
        return self._orphan_keys

    def _context_search(self, q: np.ndarray, k: int, vi: VectorIndex, sel: np.ndarray | None, drop: np.ndarray,
                        collapse: bool, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, scores, clip scores) of the best clips by ``(1 - c) cos(q, clip) + c cos(q, its study)``.

        Threshold algorithm over two ranked lists: the best ``n`` allowed clips by their own score and the
        best ``n`` studies that hold an allowed clip. Every clip of either list is scored exactly, and so is
        every clip whose study has no vector (it scores as its clip alone); any other clip scores at most
        ``(1 - c) a_n + c b_n`` (the lists' last scores), so once the k-th candidate reaches that bound (or a
        list is exhausted) the answer is what a full scan gives, up to the ANN plans' own recall.
        """
        si = self.index("study")
        q0 = normalise(q)[0]
        orphans = self._orphans(vi, si)
        study_sel = None if sel is None else np.unique(self._study_of(sel))
        n = max(2 * k, self.context_fetch)
        while True:
            n_a = n + (len(drop) if sel is None else 0)
            a_s, a_ids = (x[0] for x in vi.search(q, n_a, selector_ids=sel))
            b_s, b_ids = (x[0] for x in si.search(q, n, selector_ids=study_sel))
            exhausted = len(a_ids) < n_a or len(b_ids) < n
            cand = np.union1d(np.union1d(a_ids, self._videos_of_studies(b_ids)), orphans)
            if sel is not None:
                cand = cand[np.isin(cand, sel)]
            if len(drop):
                cand = cand[~np.isin(cand, drop)]
            rows = vi.rows_of(cand)
            keys = vi.ids[rows]
            clip = vi.vectors(rows) @ q0
            studies = self._study_of(keys)
            uniq, inv = np.unique(studies, return_inverse=True)
            srows = si.rows_of(uniq)
            study_score = np.full(len(uniq), np.nan, np.float32)
            study_score[np.searchsorted(uniq, si.ids[srows])] = si.vectors(srows) @ q0
            fused = context_score(clip, study_score[inv], c)
            order = np.argsort(-fused, kind="stable")
            keys, fused, clip = keys[order], fused[order], clip[order]
            if collapse:  # best clip per study: first occurrence in score order
                _, first = np.unique(studies[order], return_index=True)
                first = np.sort(first)
                keys, fused, clip = keys[first], fused[first], clip[first]
            bound = (1 - c) * float(a_s[-1]) + c * float(b_s[-1]) if len(a_s) and len(b_s) else -np.inf
            if exhausted or (len(keys) >= k and fused[k - 1] >= bound):
                return keys, fused.astype(np.float32), clip.astype(np.float32)
            n *= 4

    def _frame(self, level: str, ids: np.ndarray, scores: np.ndarray,
               extra: dict[str, np.ndarray] | None = None) -> pl.DataFrame:
        """Hits with catalog metadata, in rank order (``extra`` columns after the standard ones)."""
        key = "video_key" if level == "video" else "study_key"
        hits = pl.DataFrame({"rank": np.arange(1, len(ids) + 1, dtype=np.int32), "score": scores.astype(np.float64),
                             key: ids.astype(np.int64)})
        meta = self.catalog.hit_rows(level, [int(i) for i in ids])
        out = hits.join(meta, on=key, how="left").sort("rank")
        cols = REPORT_COLUMNS if level == "report" else RESULT_COLUMNS
        out = out.select([c for c in cols if c in out.columns])
        return out.with_columns(pl.Series(c, v.astype(np.float64)) for c, v in (extra or {}).items())

    # ---- public queries -----------------------------------------------------------------------
    def by_vector(self, vec: np.ndarray, k: int = 10, level: str = "video", filters: Filters | None = None, *,
                  collapse_study: bool = False, context: float = 0.0) -> pl.DataFrame:
        """Nearest items of ``level`` to an embedding (normalised here).

        ``context`` (video level): weight of each clip's study vector in its score, ``score = (1 - context)
        cos(q, clip) + context cos(q, study)``; the clip's own cosine is then returned as ``clip_score``.
        """
        return self._search(vec, k, level, filters, collapse_study=collapse_study, context=context)

    def by_text(self, text: str, k: int = 10, level: str = "video", filters: Filters | None = None, *,
                collapse_study: bool = False, context: float = TEXT_CONTEXT) -> pl.DataFrame:
        """Nearest items to a text description (the model's text tower; e.g. report phrases).

        Clips are ranked with their study's evidence by default (``context``, see :data:`TEXT_CONTEXT`);
        ``context=0`` ranks each clip by its own vector alone, e.g. to find the views that show a finding.
        """
        if not text.strip():
            raise QueryError("empty text query")
        vec = np.asarray(self.encoder().encode_text([text]))[0]
        return self._search(vec, k, level, filters, collapse_study=collapse_study, context=context)

    def embed_file(self, path: Path | str) -> np.ndarray:
        """The video vector of a DICOM/AVI/MP4 file, read and encoded by the indexing stages as the index's
        videos were."""
        if not Path(path).is_file():
            raise QueryError(f"no such file: {path}")
        video_vec, _frames = embed_file(Path(path), self.encoder())
        return np.asarray(video_vec, dtype=np.float32)

    def by_video_file(self, path: Path | str, k: int = 10, level: str = "video", filters: Filters | None = None, *,
                      collapse_study: bool = False, context: float = 0.0) -> pl.DataFrame:
        """Nearest items to an uploaded clip (not added to the index)."""
        return self._search(self.embed_file(path), k, level, filters, collapse_study=collapse_study, context=context)

    def like_video(self, video_key: int, k: int = 10, filters: Filters | None = None, *, level: str = "video",
                   collapse_study: bool = False, context: float = 0.0) -> pl.DataFrame:
        """Items most like a catalog video, the video itself excluded (its study, at study level)."""
        vec = self._vector("video", video_key)
        exclude = {int(video_key)} if level == "video" else {int(self._study_of(np.array([video_key]))[0])}
        return self._search(vec, k, level, filters, exclude=exclude, collapse_study=collapse_study, context=context)

    def like_study(self, study_uid: str, k: int = 10, filters: Filters | None = None, *, level: str = "study",
                   collapse_study: bool = False, context: float = 0.0) -> pl.DataFrame:
        """Items most like a catalog study (its study vector), the study and its own videos excluded."""
        key = self._study_key(study_uid)
        vec = self._vector("study", key)
        exclude = {key} if level != "video" else set(self._videos_of_studies(np.array([key])).tolist())
        return self._search(vec, k, level, filters, exclude=exclude, collapse_study=collapse_study, context=context)

    def reports_for(self, query: np.ndarray | int | str | Path, k: int = 5, *,
                    include_self: bool = False) -> pl.DataFrame:
        """Nearest report texts to a vector, a video key, a study UID or a video file (``Path``).

        For a catalog video or study its own study's report is left out unless ``include_self``.
        """
        own: set[int] = set()
        if isinstance(query, Path):
            vec = self.embed_file(query)
        elif isinstance(query, str):
            key = self._study_key(query)
            vec, own = self._vector("study", key), {key}
        elif isinstance(query, (int, np.integer)):
            vec = self._vector("video", int(query))
            own = {int(self._study_of(np.array([int(query)]))[0])}
        else:
            vec = np.asarray(query, dtype=np.float32)
        return self._search(vec, k, "report", None, exclude=None if include_self else own)


def reindex(index_dir: Path | str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Rebuild every level's vector index from the catalog alone; returns the manifests."""
    with Catalog.open(index_dir, read_only=True) as cat:
        return {level: vi.manifest for level, vi in build_all(cat, **kwargs).items()}
