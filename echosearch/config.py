"""One settings object for the whole tool: environment variables ``ECHOSEARCH_*`` and an optional TOML file.

Precedence: explicit keyword arguments > environment > TOML file (``ECHOSEARCH_CONFIG`` or
``./echosearch.toml``) > defaults. The pseudonymisation secret has no usable default outside demo mode.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from echosearch.errors import ConfigError

DEFAULT_CONFIG_FILE = "echosearch.toml"


class Settings(BaseSettings):
    """Runtime configuration. Every field can be set as ``ECHOSEARCH_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="ECHOSEARCH_", extra="ignore")

    index: Path = Field(Path("indexes/default"), description="Index folder (catalog + vectors).")
    model: str = Field("echosearch-demo", description="Model name, local-dir:DIR, or weights file.")
    identity_model: str | None = Field(
        None, description="Identity encoder: a head folder from `echosearch train-identity`, or a model name / "
        "local-dir:DIR whose image tower gives identity vectors; none = identity uses the content vectors. "
        "Demo mode with the echosearch-demo model defaults to the head shipped with it.")
    tokenizer_dir: Path | None = Field(None, description="Folder with EchoCLIP-R's template_vocab.txt and "
                                       "blank_wordpiece.tokenizer (default: beside the weights).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    batch_size: int = Field(64, ge=1, description="Frames per model forward pass.")
    frame_policy: Literal["auto", "sector", "echoclip"] = Field(
        "auto", description="Frame preparation policy: auto (the model's own), sector or echoclip.")
    frames_per_video: int = Field(16, ge=1, le=512, description="Frames sampled per video.")
    frame_sampling: Literal["uniform", "all"] = Field(
        "uniform", description="uniform (frames_per_video spread over the clip) or all (every frame).")
    workers: int = Field(max(1, min(4, (os.cpu_count() or 2) - 1)), ge=0, description="Decode processes.")
    secret: SecretStr | None = Field(None, description="Key for pseudonymising patient/accession IDs.")
    mode: Literal["production", "demo"] = Field("production", description="demo allows a generated secret.")
    store_raw_identifiers: bool = Field(False, description="Opt in to storing raw IDs, names, birth dates.")
    keep_frame_embeddings: bool = Field(False, description="Store per-frame vectors in the catalog.")
    cycle_vectors: bool = Field(
        True, description="Store each clip's cycle vector (how its features move over the frames: EF evidence "
        "for the change scan; 2 x C x 9 floats per clip, C = the tower's channels before its last stage).")
    zeroshot_method: Literal["auto", "echoclip", "contrast"] = Field(
        "auto", description="Zero-shot rule: echoclip (EchoCLIP's) or contrast (echosearch's); auto: by model.")
    zeroshot_prompts: Path | None = Field(None, description="Prompt file, echosearch's or EchoCLIP's format.")
    audit_log: Path | None = Field(None, description="Append-only audit log of the app (default: catalog).")

    @model_validator(mode="after")
    def _identity_default(self) -> Settings:
        """Demo mode pairs the shipped demo model with its shipped identity head; ``none`` means no identity model."""
        if self.identity_model is None and self.mode == "demo" and self.model == "echosearch-demo":
            from echosearch.identity.model import demo_identity_head

            head = demo_identity_head()
            self.identity_model = str(head) if head is not None else None
        elif self.identity_model is not None and self.identity_model.strip().lower() in ("", "none"):
            self.identity_model = None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("ECHOSEARCH_CONFIG", DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def require_secret(self) -> bytes:
        """The pseudonymisation key. Production refuses to run without one; demo mode uses :func:`demo_secret`."""
        if self.secret is not None and self.secret.get_secret_value():
            value = self.secret.get_secret_value()
            if len(value) < 16:
                raise ConfigError("ECHOSEARCH_SECRET must be at least 16 characters")
            return value.encode()
        if self.mode == "demo":
            generated = demo_secret()
            self.secret = SecretStr(generated)
            return generated.encode()
        raise ConfigError(
            "no pseudonymisation secret: set ECHOSEARCH_SECRET (>= 16 characters) or `secret` in "
            "echosearch.toml; use ECHOSEARCH_MODE=demo only for synthetic data"
        )


def demo_secret() -> str:
    """Demo mode's key (synthetic data only): generated once per user and kept in the user's cache folder
    (``$XDG_CACHE_HOME/echosearch/demo-secret``, mode 0600), so that a demo index can be opened again by later
    commands (``locate``, ``train-identity``, a second ``index``) instead of each process sealing with its own."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "echosearch" / "demo-secret"
    try:
        value = path.read_text().strip()
        if len(value) >= 16:
            return value
    except OSError:
        pass
    value = secrets.token_hex(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        try:
            os.link(tmp, path)  # the first process to store one wins; the others read it
        except FileExistsError:
            value = path.read_text().strip() or value
        finally:
            tmp.unlink()
    except OSError:
        pass  # no writable cache folder: this process's own key, as before
    return value


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment/TOML, with explicit overrides (``None`` values ignored)."""
    from pydantic import ValidationError

    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:  # name each field and its problem, never the value (it may be the secret)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False, include_context=False))
    except ValueError as exc:  # e.g. a TOML file that does not parse (its message gives line and column only)
        problems = f"{type(exc).__name__}: {exc}"
    # raised outside the handler, so that no chained exception (with the input values) travels with it
    raise ConfigError(f"invalid configuration: {problems}")
