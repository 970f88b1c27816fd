"""EchoCLIP-R-style template tokenizer, tested with a vocabulary written by this project."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.errors import ModelLoadError
from echosearch.report_tokenizer import END, PAD, START, UNK, TemplateTokenizer, clean_report, load_template_tokenizer

VOCAB = [
    "LV EJECTION FRACTION IS <#>%.",
    "THE LEFT VENTRICLE IS <#> DILATED.",
    "<#> MITRAL REGURGITATION.",
    "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.",
    "LVIDD <#> MM.",
    "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION.",
    "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION. NO WALL MOTION ABNORMALITY.",
]


@pytest.fixture
def tok() -> TemplateTokenizer:
    return TemplateTokenizer(VOCAB)


def test_phrases_become_single_tokens_and_values_value_tokens(tok: TemplateTokenizer) -> None:
    ids = tok.encode("lv ejection fraction is 35%.  The left ventricle is SEVERELY dilated.")
    assert ids == [4, tok.value_ids["35"], 5, tok.value_ids["SEVERELY"]]
    assert tok.decode(ids) == "LV EJECTION FRACTION IS 35%. THE LEFT VENTRICLE IS SEVERELY DILATED."


def test_longest_template_wins_and_unknown_text_is_one_token(tok: TemplateTokenizer) -> None:
    ids = tok.encode("NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION. NO WALL MOTION ABNORMALITY. SOMETHING ELSE ENTIRELY. LVIDD 52 MM.")
    assert ids == [4 + 6, UNK, 4 + 4, tok.value_ids["52"]]


def test_decimals_and_large_numbers(tok: TemplateTokenizer) -> None:
    assert tok.encode("LVIDD 4.5 MM.") == [8, tok.value_ids["4"], tok.value_ids[".5"]]
    assert tok.decode(tok.encode("LVIDD 4.5 MM.")) == "LVIDD 4.5 MM."
    assert tok.encode("LVIDD 120 MM.") == [8, tok.value_ids["1"], tok.value_ids["2"], tok.value_ids["0"]]


def test_call_pads_and_truncates_to_context(tok: TemplateTokenizer) -> None:
    out = tok(["LV EJECTION FRACTION IS 60%."] + ["LVIDD 50 MM. " * 60])
    assert out.shape == (2, 77)
    assert out[0, :4].tolist() == [START, 4, tok.value_ids["60"], END] and out[0, 4:].eq(PAD).all()
    assert out[1, -1].item() == END and out.max().item() < tok.vocab_size


@given(st.lists(st.tuples(st.sampled_from([0, 2, 4]), st.integers(0, 100)), min_size=1, max_size=8))
@settings(max_examples=50, deadline=None)
def test_round_trip_of_template_reports(parts: list[tuple[int, int]]) -> None:
    tok = TemplateTokenizer(VOCAB)
    text = " ".join(VOCAB[i].replace("<#>", str(v)) for i, v in parts)
    assert tok.decode(tok.encode(text)) == clean_report(text)


def test_vocabulary_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOSEARCH_TEMPLATE_VOCAB", raising=False)
    with pytest.raises(ModelLoadError, match="template_vocab.txt"):
        load_template_tokenizer(tmp_path)
    (tmp_path / "template_vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert load_template_tokenizer(tmp_path).n_templates == len(VOCAB)
