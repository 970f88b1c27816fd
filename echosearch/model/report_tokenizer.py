"""EchoCLIP-R's template tokenizer, reproduced id for id from its public behaviour.

EchoCLIP-R reads a report as a sequence of report *phrases* (templates) and the values inside them. The
two files that define its ids come with the EchoCLIP-R release under the authors' licence and are loaded
from the user's disk at run time, never shipped: ``template_vocab.txt`` (one phrase a line, ``<#>`` marks a
value slot) and ``blank_wordpiece.tokenizer`` (a Hugging Face ``tokenizers`` file: a WordPiece model
whose vocabulary holds only its special tokens). The steps, in EchoCLIP-R's order:

1. :func:`clean_report`: upper case, periods spaced, WAS -> IS, MODERATELY -> MODERATE, ..., dates and
   diagnosis codes removed, no space before units (``38 %`` -> ``38%``), a period added after a few
   phrases that reports often leave open.
2. :func:`extract_values`: every number and severity word becomes ``<#>``; the values are kept in order.
3. Two phrase rewrites (:data:`PHRASE_REWRITES`), then the *template tokenizer* (the blank WordPiece
   file plus every template as an added token) splits the text: phrases of the vocabulary become their
   ids, and every stretch of other text one unknown token (id 0), which is dropped.
4. Each template token takes as many values as it has slots, joined by ``‡``; the *value tokenizer* (the
   blank WordPiece file plus ``[UNK]``, 0..100, ``‡``, the severity words, ``.0``-``.9``, ``00``-``09`` as
   added tokens) splits them by longest match, and value ids are shifted past the template vocabulary.
   Values in text that matched no template are dropped with it.
5. ``[start] ids [end]``, start and end being the two ids after the last value id; padded with 0 to the
   context length (77), or cut to it with the end token kept last. open_clip's ``argmax`` text pooling
   then reads the end token, the highest id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from echosearch.errors import ModelLoadError

VOCAB_FILE = "template_vocab.txt"
WORDPIECE_FILE = "blank_wordpiece.tokenizer"
SLOT = "<#>"
VALUE_SEPARATOR = "‡"
SEVERITY_VALUES = ("MILD", "MODERATE", "SEVERE", "MILD/MODERATE", "MODERATE/SEVERE")
# the value tokenizer's added tokens, in id order ("[UNK]" is already the blank file's id 0 and is not re-added)
VALUE_VOCAB: tuple[str, ...] = (
    "[UNK]", *(str(i) for i in range(101)), VALUE_SEPARATOR, *SEVERITY_VALUES,
    *(f".{i}" for i in range(10)), *(f"0{i}" for i in range(10)),
)

# ---- report cleaning (EchoCLIP's rules, in its order) ---------------------------------------------------
_WORD_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r) for p, r in (
        (r"\bWAS\b", "IS"), (r"\bWERE\b", "ARE"), (r"\bAND/OR\b", "AND"), ("NORMALLY", "NORMAL"),
        ("MILDLY", "MILD"), ("MODERATELY", "MODERATE"), ("SEVERELY", "SEVERE"), ("PULMONARY ARTERY", "PA"),
        (r"\d{2}/\d{2}/\d{4}", ""), (r"\d{2}\.\d{2}\.\d{4}", ""), (r"[A-Z]\d+\.\d*\b", ""),  # dates, ICD codes
    )
)
# phrases after which a report's missing full stop is added (a number stands in each <#>)
_CLOSED_PHRASES = (
    "THE PEAK TRANSAORTIC GRADIENT IS <#>MMHG", "THE MEAN TRANSAORTIC GRADIENT IS <#>MMHG",
    "LV EJECTION FRACTION IS <#>%", "ESTIMATED PA PRESSURE IS <#>MMHG", "RESTING SEGMENTAL WALL MOTION ANALYSIS",
    "THE IVC DIAMETER IS <#>MM", "EST RV/RA PRESSURE GRADIENT IS <#>MMHG", "ESTIMATED PEAK RVSP IS <#>MMHG",
    "HEART FAILURE, UNSPECIFIED", "CHEST PAIN, UNSPECIFIED", "SINUS OF VALSALVA: <#>CM",
    "THE PEAK TRANSMITRAL GRADIENT IS <#>MMHG", "THE MEAN TRANSMITRAL GRADIENT IS <#>MMHG", "ASCENDING AORTA <#>CM",
    "ESTIMATED PA SYSTOLIC PRESSURE IS <#>MMHG", "ICD_CODE SHORTNESS BREATH",
    "ICD_CODE ABNORMAL ELECTROCARDIOGRAM ECG EKG", "SHORTNESS BREATH", "ABNORMAL ELECTROCARDIOGRAM ECG EKG",
    "THE LEFT ATRIAL APPENDAGE IS NORMAL IN APPEARANCE WITH NO EVIDENCE OF THROMBUS",
)
_OPEN_PHRASE = re.compile("(" + "|".join(
    "(?:" + re.escape(p).replace(re.escape(SLOT), r"(?:\d+\.?\d*)") + r")(?!\.)" for p in _CLOSED_PHRASES) + ")")
# applied after the values are taken out, so these match the report's <#> form
PHRASE_REWRITES = (
    ("THE INFERIOR VENA CAVA IS NORMAL IN SIZE AND SHOWS A NORMAL RESPIRATORY COLLAPSE, CONSISTENT WITH NORMAL "
     "RIGHT ATRIAL PRESSURE (<#>MMHG).",
     "THE INFERIOR VENA CAVA SHOWS A NORMAL RESPIRATORY COLLAPSE CONSISTENT WITH NORMAL RIGHT ATRIAL PRESSURE "
     "(<#>MMHG)."),
    ("RESTING SEGMENTAL WALL MOTION ANALYSIS.:", "RESTING SEGMENTAL WALL MOTION ANALYSIS."),
)
_VALUE = re.compile(r"(\d+\.?\d*)|((?<![A-Za-z])(?:MODERATE/SEVERE|MILD/MODERATE|MILD|MODERATE|SEVERE|VERY SEVERE))")


def clean_report(text: str) -> str:
    """A report in EchoCLIP's cleaned form (ends with one space); texts of 0-1 characters are left as they are."""
    if len(text) <= 1:
        return text
    t = text.upper().strip().replace("`", "'")
    t = re.sub(r"\^|CRLF|‡", "", t)
    t = re.sub(r"(?<=\D)\.|\.(?=\D)", ". ", t)  # a period not between two digits is a sentence end
    t = re.sub(r"[\[\]]", "", t)
    for pattern, repl in _WORD_REWRITES:
        t = pattern.sub(repl, t)
    t = re.sub(r"\s+(MMHG|MM|CM|%)", r"\1", t)
    t = re.sub(r"\s\.", ".", t)
    t = re.sub(r"\s+", " ", t)
    t = re.sub(r"\s\+\s", "+", t).replace("+CVPMMHG", "MMHG")
    t = t.strip() + " "
    t = _OPEN_PHRASE.sub(r"\1.", t)
    return re.sub(r"\.+", ".", t)


def extract_values(text: str) -> tuple[list[str], str]:
    """(values in order, text with each replaced by ``<#>``): numbers and severity words."""
    values = [a or b for a, b in _VALUE.findall(text)]
    return values, _VALUE.sub(SLOT, text)


def rewrite_phrases(text: str) -> str:
    for old, new in PHRASE_REWRITES:
        text = text.replace(old, new)
    return text


# ---- the tokenizer ----------------------------------------------------------------------------------------
def _read_vocab(path: Path) -> list[str]:
    """Template lines as EchoCLIP reads them (text mode, newline stripped, nothing else)."""
    with Path(path).open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f.readlines()]


class TemplateTokenizer:
    """Callable like open_clip's tokenizers: ``tok(list_of_texts) -> LongTensor (n, context_length)``."""

    def __init__(self, templates: Sequence[str], wordpiece_json: str, context_length: int = 77) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise ModelLoadError("EchoCLIP-R's tokenizer needs the `tokenizers` package: pip install tokenizers") from exc
        try:
            self._templates = Tokenizer.from_str(wordpiece_json)
            self._values = Tokenizer.from_str(wordpiece_json)
        except Exception as exc:
            raise ModelLoadError(f"{WORDPIECE_FILE} is not a Hugging Face tokenizers file ({exc})") from exc
        self._templates.add_tokens(list(templates))
        self._values.add_tokens(list(VALUE_VOCAB))
        vocab = self._templates.get_vocab()
        self.n_templates = len(vocab)  # value ids start here
        self.slots = {i: tok.count(SLOT) for tok, i in vocab.items()}
        self.template_text = {i: tok for tok, i in vocab.items()}
        self.value_text = {i + self.n_templates: tok for tok, i in self._values.get_vocab().items()}
        last_value = self.n_templates + len(self.value_text) - 1
        self.start_id, self.end_id = last_value + 1, last_value + 2
        self.vocab_size = self.end_id + 1
        self.context_length = context_length
        self.digest = ""  # sha256 of the two files, set by from_files

    @classmethod
    def from_files(cls, vocab_file: Path, wordpiece_file: Path, context_length: int = 77) -> TemplateTokenizer:
        data = Path(wordpiece_file).read_bytes()
        tok = cls(_read_vocab(vocab_file), data.decode("utf-8"), context_length)
        tok.digest = hashlib.sha256(Path(vocab_file).read_bytes() + b"\0" + data).hexdigest()
        return tok

    def _value_ids(self, values: Sequence[str]) -> list[int]:
        ids: list[int] = self._values.encode(VALUE_SEPARATOR.join(values)).ids
        return [i + self.n_templates for i in ids]

    def encode(self, text: str) -> list[int]:
        """Ids of one report, without start, end or padding."""
        values, text = extract_values(clean_report(text))
        text = rewrite_phrases(text)
        enc = self._templates.encode(text)
        # which extracted values sit in a recognised phrase: unknown stretches drop theirs
        keep: list[bool] = []
        for (a, b), tok, tid in zip(enc.offsets, enc.tokens, enc.ids, strict=True):
            known = tok != "[UNK]"
            keep.extend([known] * (self.slots.get(tid, 0) if known else text[a:b].count(SLOT)))
        matched = [v for v, k in zip(values, keep, strict=False) if k]
        out: list[int] = []
        for tid in (i for i in enc.ids if i != 0):
            n = self.slots.get(tid, 0)
            mine, matched = matched[:n], matched[n:]  # a literal "<#>" in a report can leave too few
            out.append(tid)
            out.extend(self._value_ids(mine))
        return out

    def sequence(self, text: str, context_length: int | None = None) -> list[int]:
        """The model's input row: ``[start] ids [end]`` padded with 0, or cut with the end token kept last."""
        n = context_length or self.context_length
        ids = [self.start_id, *self.encode(text), self.end_id]
        if len(ids) > n:
            return [*ids[: n - 1], self.end_id]
        return ids + [0] * (n - len(ids))

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """Readable form of each id: ``[phrase]``, ``<value>``, ``[BOS]``/``[EOS]``."""
        names = {self.start_id: "[BOS]", self.end_id: "[EOS]"}
        return [names.get(i) or (f"<{self.value_text[i]}>" if i in self.value_text
                                 else f"[{self.template_text.get(i, '?')}]") for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """The report the ids stand for: each phrase with its values put back in its slots."""
        parts: list[str] = []
        i, ids = 0, [x for x in ids if x not in (0, self.start_id, self.end_id)]
        while i < len(ids):
            phrase = self.template_text.get(ids[i], "[UNK]")
            i += 1
            raw = ""
            while i < len(ids) and ids[i] in self.value_text:
                raw += self.value_text[ids[i]]
                i += 1
            for v in raw.split(VALUE_SEPARATOR) if raw else []:
                phrase = phrase.replace(SLOT, v, 1)
            parts.append(phrase.strip())
        return " ".join(parts)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.sequence(t, context_length) for t in texts], dtype=torch.long).reshape(len(texts), -1)


def find_tokenizer_files(*folders: Path | None) -> tuple[Path, Path]:
    """(vocabulary, WordPiece file) from the first folder holding both; refuses in one line naming them."""
    tried = [Path(f).expanduser() for f in folders if f is not None]
    for folder in tried:
        vocab, wordpiece = folder / VOCAB_FILE, folder / WORDPIECE_FILE
        if vocab.is_file() and wordpiece.is_file():
            return vocab, wordpiece
    where = ", ".join(str(f) for f in tried) or "no folder given"
    raise ModelLoadError(
        f"EchoCLIP-R needs its tokenizer files {VOCAB_FILE} and {WORDPIECE_FILE} (from the EchoCLIP-R release; "
        f"echosearch does not ship them) in one folder: pass --tokenizer DIR, set ECHOSEARCH_TOKENIZER_DIR, or put "
        f"them beside the weights (looked in: {where})"
    )


def load_template_tokenizer(folder: Path | None, tokenizer_dir: Path | None = None,
                            context_length: int = 77) -> TemplateTokenizer:
    """The user's EchoCLIP-R tokenizer: ``tokenizer_dir`` (default: the ``tokenizer_dir`` setting) first,
    then the model's own folder."""
    if tokenizer_dir is None:
        from echosearch.config import load_settings

        tokenizer_dir = load_settings().tokenizer_dir
    vocab, wordpiece = find_tokenizer_files(tokenizer_dir, folder)
    return TemplateTokenizer.from_files(vocab, wordpiece, context_length)


def check_vocab_size(tokenizer: Any, model_cfg: dict[str, Any]) -> None:
    """Refuse a tokenizer whose ids overrun the model's token table (wrong or edited vocabulary file)."""
    size = int((model_cfg.get("text_cfg") or {}).get("vocab_size", 0) or 0)
    need = getattr(tokenizer, "vocab_size", 0)
    if size and need and need > size:
        raise ModelLoadError(
            f"the EchoCLIP-R tokenizer files give {need} token ids but the model's text tower has {size}: "
            f"{VOCAB_FILE} does not belong to these weights")
