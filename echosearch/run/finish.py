"""After the write stage, from the catalog alone: scope model evidence, study vectors and predictions, report
text vectors, vector indexes. Both runners end here (the Ray runner through ``merge``).

Everything is derived from what the catalog holds, not from what this run wrote, so a run killed between
writing and finishing is finished by the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echosearch.catalog import Catalog
from echosearch.model.encode import Encoder, l2_normalise
from echosearch.model.zeroshot import pooling_tasks, study_predictions
from echosearch.run.write import store_predictions


def pool_studies(catalog: Catalog, model_name: str, study_keys: list[int] | None = None) -> int:
    """Study vectors (mean of in-scope video vectors, re-normalised) and study predictions for ``study_keys``
    (default: the stale ones); only those studies' videos are read."""
    study_keys = catalog.stale_studies() if study_keys is None else sorted(study_keys)
    if not study_keys:
        return 0
    owner = catalog.videos_of_studies(study_keys)
    out = catalog.out_of_scope_videos()  # identity and change compare in-scope clips only
    ids, vecs = catalog.embeddings("video", [k for k in owner if k not in out])
    by_study: dict[int, list[int]] = {}
    for i, vk in enumerate(ids):
        by_study.setdefault(owner[int(vk)], []).append(i)
    study_keys = sorted(by_study)
    if not study_keys:
        return 0
    study_vecs = np.stack([l2_normalise(vecs[by_study[s]].mean(axis=0)) for s in study_keys])
    counts = [len(by_study[s]) for s in study_keys]
    vpreds = catalog.video_predictions([int(k) for k in ids])
    binary, categorical = pooling_tasks(catalog.get_manifest("zeroshot"))
    spreds = [study_predictions([vpreds[int(ids[i])] for i in by_study[s] if int(ids[i]) in vpreds], binary,
                                categorical) for s in study_keys]
    with catalog.transaction():
        catalog.store_level_embeddings("study", study_keys, study_vecs, counts)
        store_predictions(catalog, "study", study_keys, spreds, model_name)
        if catalog.has_identity():
            pool_identity(catalog, {k: s for k, s in owner.items() if k not in out})
    return len(study_keys)


def pool_identity(catalog: Catalog, owner: dict[int, int]) -> None:
    """Study identity vectors (mean of the studies' video identity vectors, re-normalised) for the videos of
    ``owner`` (video key -> study key)."""
    ids, vecs = catalog.embeddings("video_identity", list(owner))
    by_study: dict[int, list[int]] = {}
    for i, vk in enumerate(ids):
        by_study.setdefault(int(owner[int(vk)]), []).append(i)
    keys = sorted(by_study)
    if keys:
        catalog.store_identity_embeddings("study_identity", keys,
                                          np.stack([l2_normalise(vecs[by_study[s]].mean(axis=0)) for s in keys]),
                                          [len(by_study[s]) for s in keys])


def embed_reports(catalog: Catalog, encoder: Encoder) -> int:
    """Text vectors of reports that have none yet (report-level search, preliminary interpretation)."""
    rows = catalog.reports_to_embed()
    if not rows:
        return 0
    vecs = encoder.encode_text([t for _, t in rows])
    catalog.store_level_embeddings("report", [k for k, _ in rows], vecs)
    return len(rows)


@dataclass
class FinishSummary:
    studies_pooled: int = 0
    reports_embedded: int = 0
    vector_indexes: dict[str, Any] = field(default_factory=dict)  # level -> manifest of what was built


def finish_index(cat: Catalog, encoder: Callable[[], Encoder], *, build_vectors: bool | Callable[[], bool] = True,
                 chunk_rows: int | None = None) -> FinishSummary:
    """Scope model evidence and views (before pooling, which leaves out-of-scope clips out), stale study
    vectors, new report vectors, then the vector indexes. ``encoder`` is called only when a model is needed
    (a merge with nothing new loads none); ``build_vectors`` may be a test of whether they are stale."""
    from echosearch.model import scope

    out = FinishSummary()
    model = cat.get_manifest("model")
    if model is None:  # nothing was ever encoded
        return out
    if len(cat.scope_to_check()):
        scope.finalize(cat, encoder())
    out.studies_pooled = pool_studies(cat, str(model["name"]))
    if cat.reports_without_vectors():
        out.reports_embedded = embed_reports(cat, encoder())
    if build_vectors() if callable(build_vectors) else build_vectors:
        from echosearch.store.vectorindex import build_all

        kwargs = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
        out.vector_indexes = {lvl: vi.manifest for lvl, vi in build_all(cat, **kwargs).items()}
    return out
