"""Template tokenizer for EchoCLIP-R-style models: report phrases become single tokens.

Written from the published description (the vocabulary itself is supplied by the user at run time and
never shipped): report text is cleaned (upper case, normalised punctuation and spacing); every phrase
that matches a template of the vocabulary becomes one template token, and the values inside it (numbers,
severity words) become value tokens; text that matches no template becomes one unknown token per run of
words. Sequences are ``[start] tokens... [end]`` padded with 0 to the context length (77).

Vocabulary file: one template per line; a variable slot is written ``<#>``, ``{}`` or ``‡``.

Token ids: 0 pad, 1 start, 2 end, 3 unknown, then one id per template (file order), then value tokens
(integers 0-100, decimal digits ``.0``-``.9``, severity words).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from echosearch.errors import ModelLoadError

PAD, START, END, UNK = 0, 1, 2, 3
N_SPECIAL = 4
SLOT_MARKERS = ("<#>", "{}", "‡")
SEVERITY_WORDS = ("MILD/MODERATE", "MODERATE/SEVERE", "TRACE/MILD", "MILDLY", "MODERATELY", "SEVERELY", "MILD",
                  "MODERATE", "SEVERE", "TRACE", "NORMAL", "SMALL", "LARGE")
VALUE_TOKENS: tuple[str, ...] = (
    *[str(i) for i in range(101)], *[f".{i}" for i in range(10)], *SEVERITY_WORDS
)
_VALUE_RE = r"(\d+(?:\.\d+)?|" + "|".join(re.escape(w) for w in SEVERITY_WORDS) + r")"


def clean_report(text: str) -> str:
    """Upper case, unify quotes/dashes, keep report characters, single spaces, spaced sentence ends."""
    t = text.upper().replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-")
    t = re.sub(r"[^A-Z0-9%./,:;()'\-\s‡]", " ", t)
    t = re.sub(r"\s+", " ", t)
    return t.strip()


@dataclass(frozen=True)
class _Template:
    token: int
    text: str
    pattern: re.Pattern[str]
    n_slots: int


class TemplateTokenizer:
    """Callable like open_clip's tokenizers: ``tok(list_of_texts) -> LongTensor (n, context_length)``."""

    def __init__(self, templates: Sequence[str], context_length: int = 77) -> None:
        self.context_length = context_length
        self.templates: list[_Template] = []
        for i, raw in enumerate(templates):
            text = clean_report(raw.replace("<#>", "‡").replace("{}", "‡"))
            if not text:
                continue
            parts = [re.escape(p) for p in text.split("‡")]
            pattern = re.compile(_VALUE_RE.join(parts) + r"(?=\s|$)")
            self.templates.append(_Template(N_SPECIAL + i, text, pattern, len(parts) - 1))
        self.n_templates = len(templates)
        self.value_offset = N_SPECIAL + self.n_templates
        self.value_ids = {v: self.value_offset + j for j, v in enumerate(VALUE_TOKENS)}
        self.vocab_size = self.value_offset + len(VALUE_TOKENS)
        # longest literal first so that a specific phrase wins over its prefix; grouped by first word for speed
        self._by_first: dict[str, list[_Template]] = {}
        for t in sorted(self.templates, key=lambda t: -len(t.text)):
            first = t.text.split(" ", 1)[0]
            self._by_first.setdefault("‡" if "‡" in first else first, []).append(t)

    @classmethod
    def from_file(cls, path: Path, context_length: int = 77) -> TemplateTokenizer:
        lines = [ln.rstrip("\n") for ln in Path(path).read_text(encoding="utf-8").splitlines()]
        return cls([ln for ln in lines if ln.strip()], context_length)

    def _values(self, value: str) -> list[int]:
        if value in self.value_ids:
            return [self.value_ids[value]]
        if re.fullmatch(r"\d+\.\d+", value):
            whole, frac = value.split(".")
            return self._values(whole) + [self.value_ids[f".{frac[0]}"]]
        if value.isdigit():  # > 100: one token per digit
            return [self.value_ids[d] for d in value]
        return [UNK]

    def encode(self, text: str) -> list[int]:
        """Token ids of one report (without start/end/padding)."""
        t = clean_report(text)
        out: list[int] = []
        pos = 0
        while pos < len(t):
            if t[pos] == " ":
                pos += 1
                continue
            word = t[pos:].split(" ", 1)[0]
            candidates = self._by_first.get(word, []) + self._by_first.get("‡", [])
            for tpl in candidates:
                m = tpl.pattern.match(t, pos)
                if m:
                    out.append(tpl.token)
                    for g in m.groups():
                        out.extend(self._values(g))
                    pos = m.end()
                    break
            else:
                if not out or out[-1] != UNK:
                    out.append(UNK)
                pos += len(word)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Readable text of ids (values filled into their templates' slots; unknown runs as ``[UNK]``)."""
        by_id = {t.token: t for t in self.templates}
        inv = {v: k for k, v in self.value_ids.items()}
        words: list[str] = []
        i = 0
        ids = [x for x in ids if x not in (PAD, START, END)]
        while i < len(ids):
            x = ids[i]
            i += 1
            if x in by_id:
                tpl = by_id[x]
                text = tpl.text
                for _ in range(tpl.n_slots):
                    val = inv.get(ids[i], "?") if i < len(ids) else "?"
                    i += 1
                    while i < len(ids) and inv.get(ids[i], "").startswith("."):
                        val += inv[ids[i]]
                        i += 1
                    text = text.replace("‡", val, 1)
                words.append(text)
            else:
                words.append("[UNK]")
        return " ".join(words)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        result = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [START, *self.encode(text)][: n - 1] + [END]
            result[row, : len(ids)] = torch.tensor(ids)
        return result


def load_template_tokenizer(folder: Path | None, context_length: int = 77) -> TemplateTokenizer:
    """The user's vocabulary: ``ECHOSEARCH_TEMPLATE_VOCAB`` or ``template_vocab.txt`` beside the weights."""
    candidates = [Path(p) for p in [os.environ.get("ECHOSEARCH_TEMPLATE_VOCAB", "")] if p]
    if folder is not None:
        candidates.append(Path(folder) / "template_vocab.txt")
    for c in candidates:
        if c.is_file():
            return TemplateTokenizer.from_file(c, context_length)
    raise ModelLoadError(
        "EchoCLIP-R needs its report-template vocabulary, which echosearch does not ship (academic licence): "
        "set ECHOSEARCH_TEMPLATE_VOCAB=/path/to/template_vocab.txt or put template_vocab.txt beside the weights"
    )
