"""Setting up an indexing run: the one place that turns settings into the models and bindings both runners use.

:func:`load_run_encoder` loads the content encoder the settings name; :func:`prepare_run` checks the
pseudonym key, binds the model, the identity model, the cycle vectors and the zero-shot method to the catalog
(refusing a mismatch), and returns a :class:`RunSetup` from which each runner takes its read context, its encode
stage (or the spec an encode worker loads it from) and what every shard records.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.errors import ConfigError
from echosearch.identity.model import IdentityEncoder, load_identity_encoder
from echosearch.ingest.discover import Sidecars
from echosearch.ingest.prepare import FramePolicy
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.model.cycle import CycleRunner, cycle_info
from echosearch.model.encode import Encoder, load_encoder
from echosearch.model.zeroshot import PromptBank, load_prompts, resolve_method
from echosearch.run.encode import EncodeSpec, EncodeStage
from echosearch.run.read import ReadContext, default_policy
from echosearch.run.units import config_digest

log = logging.getLogger(__name__)


def load_run_encoder(settings: Settings) -> Encoder:
    """The content encoder of the settings (model, device, frame policy and sampling)."""
    return load_encoder(settings.model, device=settings.device, frames_per_video=settings.frames_per_video,
                        policy=settings.frame_policy, sampling=settings.frame_sampling)


def identity_encoder(catalog: Catalog, content: Encoder, settings: Settings) -> IdentityEncoder | None:
    """The identity encoder of an indexing run (``identity_model``, else the one the index recorded), bound to
    the catalog; None when identity uses the content vectors."""
    stored = catalog.get_manifest("identity_model")
    spec = settings.identity_model or (stored or {}).get("source")
    if not spec:
        return None
    enc = load_identity_encoder(spec, content, device=settings.device)
    catalog.bind_identity(enc.manifest)
    return enc


@dataclass
class RunSetup:
    """What a run was set up with. ``encoder`` is None for a scan (rows only, no vectors)."""

    settings: Settings
    pz: Pseudonymizer
    policy: FramePolicy
    encoder: Encoder | None = None
    identity: IdentityEncoder | None = None
    bank: PromptBank | None = None
    cycle: CycleRunner | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # what every shard records (model, identity, zero-shot...)

    def read_context(self, sidecars: Sidecars, known: Container[str] = frozenset()) -> ReadContext:
        s = self.settings
        return ReadContext(self.policy, sidecars, s.require_secret(), s.store_raw_identifiers, known)

    def encode_stage(self) -> EncodeStage:
        """The encode stage on this process's models."""
        assert self.encoder is not None, "a scan has no encode stage"
        return EncodeStage(self.encoder, bank=self.bank, identity=self.identity, batch_size=self.settings.batch_size,
                           keep_frames=self.settings.keep_frame_embeddings, cycle=self.cycle)

    def encode_spec(self) -> EncodeSpec:
        """What an encode worker elsewhere loads the same models from."""
        identity = self.meta.get("identity_model")
        return EncodeSpec.from_settings(self.settings, identity["source"] if identity else None,
                                        cycle=self.meta.get("cycle"))


def prepare_run(cat: Catalog, settings: Settings, encoder: Encoder | None = None, *,
                policy: FramePolicy | None = None) -> RunSetup:
    """Check the pseudonym key (sealing paths an older index stored in the clear), then, with an encoder, bind
    the model, the identity model and the zero-shot method to the catalog, refusing a mismatch."""
    pz = Pseudonymizer(settings.require_secret())
    cat.check_pseudonym_key(pz.fingerprint())
    if not settings.store_raw_identifiers:
        cat.seal_plain_paths(pz)  # an index from before sealing: its paths carry identifiers
    if encoder is None:
        return RunSetup(settings, pz, policy or default_policy(settings))
    cat.bind_model(encoder.identity)
    if cat.get_manifest("model_source") is None:
        cat.set_manifest("model_source", settings.model)
    ident = identity_encoder(cat, encoder, settings)
    info = cycle_info(encoder)
    cycle = cat.bind_cycle(info, settings.cycle_vectors)
    if settings.cycle_vectors and info is not None and cycle is None:
        log.warning("%s holds videos encoded without cycle vectors, so this run stores none either (the change "
                    "scan's EF probe reads the content vectors); index into a new folder to have them", cat.index_dir)
    method = resolve_method(settings.zeroshot_method, encoder.source.spec)
    prompts = load_prompts(str(settings.zeroshot_prompts)) if settings.zeroshot_prompts else None
    bank = PromptBank.build(encoder, prompts, method=method)
    done = cat.get_manifest("zeroshot") or ({"method": "contrast", "prompts": "echosearch"}  # before the manifest
                                            if cat.counts()["predictions"] else None)
    if done and (done.get("method"), done.get("prompts")) != (bank.method, bank.source):
        raise ConfigError(f"{cat.index_dir} holds zero-shot predictions by method {done.get('method')} with prompts "
                          f"{done.get('prompts')}; this run would use {bank.method} with {bank.source}: set "
                          "zeroshot_method/zeroshot_prompts to match, or index into a new folder")
    cat.set_manifest("zeroshot", bank.manifest())
    meta: dict[str, Any] = {"model": encoder.identity, "model_source": cat.get_manifest("model_source"),
                            "identity_model": ident.manifest if ident is not None else None, "cycle": cycle,
                            "zeroshot": bank.manifest(), "secret_fingerprint": pz.fingerprint(),
                            "keep_frames": settings.keep_frame_embeddings,
                            "store_raw": settings.store_raw_identifiers}
    meta["config"] = config_digest(meta)
    return RunSetup(settings, pz, policy or encoder.policy, encoder, ident, bank,
                    CycleRunner(encoder, cycle) if cycle else None, meta)
