"""EchoCLIP-R's template tokenizer, with a vocabulary and a blank WordPiece file written by this project.

Expected ids are written out from EchoCLIP-R's id layout, not computed by the code under test: with a
blank WordPiece file of 5 special tokens and T templates, template i has id 5 + i; the value tokenizer's
added tokens are 0..100 (ids 5-105), ``‡`` 106, MILD 107, MODERATE 108, SEVERE 109, MILD/MODERATE 110,
MODERATE/SEVERE 111, .0-.9 112-121, 00-09 122-131, shifted by 5 + T; start and end follow (137 + T, 138 + T).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.cli import main
from echosearch.errors import ModelLoadError
from echosearch.model.report_tokenizer import (
    TemplateTokenizer,
    check_vocab_size,
    clean_report,
    extract_values,
    load_template_tokenizer,
)

TEMPLATES = [
    "LV EJECTION FRACTION IS <#>%. ",  # 5
    "THE LEFT VENTRICLE IS <#> DILATED. ",  # 6
    "LVIDD <#>MM. ",  # 7
    "AORTIC ROOT <#>CM, ASCENDING AORTA <#>CM. ",  # 8
    "TRACE MITRAL REGURGITATION. ",  # 9
    "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION. ",  # 10
    "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION. NO WALL MOTION ABNORMALITY. ",  # 11
    "THE INFERIOR VENA CAVA SHOWS A NORMAL RESPIRATORY COLLAPSE CONSISTENT WITH NORMAL RIGHT ATRIAL PRESSURE "
    "(<#>MMHG). ",  # 12
    "ESTIMATED PA SYSTOLIC PRESSURE IS <#>MMHG. ",  # 13
]
T0 = 5 + len(TEMPLATES)  # value ids start here (14)
START, END = T0 + 132, T0 + 133


def v(value: str) -> int:
    """The id of one value token, from the layout in the module docstring."""
    if value.isdigit() and len(value) <= 3 and int(value) <= 100 and not (len(value) == 2 and value[0] == "0"):
        return T0 + 5 + int(value)
    if len(value) == 2 and value[0] == "0":
        return T0 + 122 + int(value[1])
    if value.startswith("."):
        return T0 + 112 + int(value[1])
    return T0 + {"‡": 106, "MILD": 107, "MODERATE": 108, "SEVERE": 109, "MILD/MODERATE": 110,
                 "MODERATE/SEVERE": 111}[value]


def write_blank_wordpiece(path: Path) -> Path:
    """A WordPiece tokenizer file whose vocabulary is only the 5 special tokens (EchoCLIP-R's structure)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(WordPiece({s: i for i, s in enumerate(specials)}, unk_token="[UNK]"))
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("echoclip-r-tokenizer")
    (d / "template_vocab.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    write_blank_wordpiece(d / "blank_wordpiece.tokenizer")
    return d


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> TemplateTokenizer:
    return load_template_tokenizer(None, tok_dir)


def test_layout_of_special_template_and_end_ids(tok: TemplateTokenizer) -> None:
    assert (tok.n_templates, tok.start_id, tok.end_id, tok.vocab_size) == (T0, START, END, END + 1)


def test_zero_one_and_two_values_per_template(tok: TemplateTokenizer) -> None:
    assert tok.encode("TRACE MITRAL REGURGITATION.") == [9]
    assert tok.encode("LV EJECTION FRACTION IS 55%.") == [5, v("55")]
    assert tok.encode("AORTIC ROOT 3.4 CM, ASCENDING AORTA 3.6 CM.") == [
        8, v("3"), v(".4"), v("‡"), v("3"), v(".6")]
    assert tok.encode("THE LEFT VENTRICLE IS MODERATE/SEVERE DILATED.") == [6, v("MODERATE/SEVERE")]


def test_values_split_by_longest_match(tok: TemplateTokenizer) -> None:
    assert tok.encode("LVIDD 2.29 MM.") == [7, v("2"), v(".2"), v("9")]
    assert tok.encode("LVIDD 120 MM.") == [7, v("12"), v("0")]
    assert tok.encode("LVIDD 100 MM.") == [7, v("100")]
    assert tok.encode("LVIDD 1.05 MM.") == [7, v("1"), v(".0"), v("5")]


def test_cleaning_rules_reach_the_templates(tok: TemplateTokenizer) -> None:
    # WAS -> IS, MODERATELY -> MODERATE, lower case, "38 %" -> "38%", missing final period added
    assert tok.encode("lv ejection fraction was 38 %") == [5, v("38")]
    assert tok.encode("The left ventricle was moderately dilated.") == [6, v("MODERATE")]
    assert tok.encode("The left ventricle is severely dilated") == []  # no period: not the phrase
    # PULMONARY ARTERY -> PA, a date and a diagnosis code removed
    assert tok.encode("12/01/2020 I50.9 Estimated pulmonary artery systolic pressure is 41 mmHg.") == [13, v("41")]
    # EchoCLIP's phrase rewrite of the IVC sentence
    ivc = ("THE INFERIOR VENA CAVA IS NORMAL IN SIZE AND SHOWS A NORMAL RESPIRATORY COLLAPSE, CONSISTENT WITH "
           "NORMAL RIGHT ATRIAL PRESSURE (3 MMHG).")
    assert tok.encode(ivc) == [12, v("3")]


def test_words_that_are_not_values_stay_text(tok: TemplateTokenizer) -> None:
    values, text = extract_values(clean_report("TRACE MITRAL REGURGITATION. NORMAL SIZE. SMALL LARGE MILDLY."))
    assert values == ["MILD"] and "TRACE" in text and "SMALL LARGE <#>." in text
    assert tok.encode("Trace mitral regurgitation.") == [9]
    assert extract_values("VERY SEVERE AR, MILDER")[0] == ["VERY SEVERE", "MILD"]


def test_unknown_text_and_its_values_are_dropped(tok: TemplateTokenizer) -> None:
    ids = tok.encode("SOMETHING ELSE 42 ENTIRELY. LVIDD 50 MM. MORE UNKNOWN TEXT 7.")
    assert ids == [7, v("50")]
    assert 0 not in ids
    assert tok.encode("nothing here matches") == []


def test_longest_phrase_wins(tok: TemplateTokenizer) -> None:
    assert tok.encode("Normal left ventricular systolic function. No wall motion abnormality.") == [11]
    assert tok.encode("Normal left ventricular systolic function.") == [10]


def test_rows_pad_with_zero_and_truncate_keeping_end_last(tok: TemplateTokenizer) -> None:
    rows = tok(["LV EJECTION FRACTION IS 60%.", "LVIDD 50 MM. " * 60, ""])
    assert rows.shape == (3, 77) and rows.dtype == torch.long
    assert rows[0, :4].tolist() == [START, 5, v("60"), END] and rows[0, 4:].eq(0).all()
    assert rows[1].tolist() == [START, *[7, v("50")] * 37, 7, END]
    assert rows[2, :2].tolist() == [START, END]
    # open_clip's argmax pooling reads the end token: the highest id of every row
    assert rows.argmax(dim=-1).tolist() == [3, 76, 1]


def test_open_clip_argmax_pooling_lands_on_the_end_token(tok: TemplateTokenizer) -> None:
    """A CLIP text tower sized to this vocabulary pools the end token's position for template rows."""
    import open_clip

    from echosearch.model.encode import encode_text_bucketed

    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": tok.vocab_size, "width": 32, "heads": 4, "layers": 1}}
    model = open_clip.CLIP(**cfg).eval()
    assert model.text_pool_type == "argmax"
    rows = tok(["LV EJECTION FRACTION IS 35%. LVIDD 61 MM.", "TRACE MITRAL REGURGITATION."])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.encode_text(rows), dim=-1)
        x = model.ln_final(model.transformer(model.token_embedding(rows) + model.positional_embedding,
                                             attn_mask=model.attn_mask))
        at_end = torch.nn.functional.normalize(x[torch.arange(2), (rows == END).int().argmax(1)] @ model.text_projection,
                                               dim=-1)
        bucketed = encode_text_bucketed(model, rows)
    assert torch.allclose(ref, at_end, atol=1e-6) and torch.allclose(ref, bucketed, atol=1e-6)
    check_vocab_size(tok, cfg)
    with pytest.raises(ModelLoadError, match="does not belong"):
        check_vocab_size(tok, {"text_cfg": {"vocab_size": tok.vocab_size - 1}})


SLOTTED = [i for i, t in enumerate(TEMPLATES) if "<#>" in t]


@given(st.lists(st.tuples(st.sampled_from(SLOTTED), st.lists(st.one_of(
    st.integers(0, 999).map(str),
    st.tuples(st.integers(0, 99), st.integers(0, 99)).map(lambda p: f"{p[0]}.{p[1]}"),
    st.sampled_from(["MILD", "MODERATE", "SEVERE", "MILD/MODERATE"])), min_size=2, max_size=2)),
    min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_decode_gives_back_the_cleaned_report(parts: list[tuple[int, list[str]]]) -> None:
    """Any report made of known phrases round-trips: ids -> phrases with their values in their slots."""
    tok = _shared_tokenizer()  # function-scoped fixtures do not mix with hypothesis
    sentences = []
    for i, values in parts:
        s = TEMPLATES[i]
        for value in values[: s.count("<#>")]:
            s = s.replace("<#>", value, 1)
        sentences.append(s.strip())
    report = " ".join(sentences)
    ids = tok.encode(report)
    assert [i for i in ids if i < T0] == [i + 5 for i, _ in parts]
    assert tok.decode(ids) == clean_report(report).strip()


_CACHE: dict[str, TemplateTokenizer] = {}


def _shared_tokenizer() -> TemplateTokenizer:
    if "tok" not in _CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            wp = write_blank_wordpiece(Path(d) / "blank_wordpiece.tokenizer").read_text()
        _CACHE["tok"] = TemplateTokenizer(TEMPLATES, wp)
    return _CACHE["tok"]


def test_missing_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOSEARCH_TOKENIZER_DIR", raising=False)
    (tmp_path / "template_vocab.txt").write_text("\n".join(TEMPLATES))
    with pytest.raises(ModelLoadError, match="template_vocab.txt and blank_wordpiece.tokenizer"):
        load_template_tokenizer(tmp_path)
    write_blank_wordpiece(tmp_path / "blank_wordpiece.tokenizer")
    assert load_template_tokenizer(tmp_path).n_templates == T0
    monkeypatch.setenv("ECHOSEARCH_TOKENIZER_DIR", str(tmp_path))
    assert load_template_tokenizer(None).n_templates == T0


def test_cli_model_tokens(tok_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["model", "tokens", "--model", "echo-clip-r", "--tokenizer", str(tok_dir), "--json",
               "LV ejection fraction was 38 %. Some other text. LVIDD 2.29 mm."])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["ids"][:7] == [START, 5, v("38"), 7, v("2"), v(".2"), v("9")] and out["ids"][7] == END
    assert len(out["ids"]) == 77 and out["ids"][8:] == [0] * 69
    assert out["tokens"][:3] == ["[BOS]", "[LV EJECTION FRACTION IS <#>%. ]", "<38>"] and out["tokens"][-1] == "[EOS]"
    assert out["text"] == "LV EJECTION FRACTION IS 38%. LVIDD 2.29MM."
    rc = main(["model", "tokens", "--model", "echo-clip-r", "--tokenizer", str(tok_dir / "missing"), "x"])
    assert rc != 0 and "blank_wordpiece.tokenizer" in capsys.readouterr().err


def test_template_model_folder_loads_and_encodes_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder hinted as a template-tokenizer model, with the two files beside its weights, encodes
    reports through the template ids; a text tower too small for the vocabulary is refused."""
    import open_clip

    from echosearch.model.encode import load_encoder
    from echosearch.model.models import write_model_folder

    monkeypatch.delenv("ECHOSEARCH_TOKENIZER_DIR", raising=False)
    tok = _shared_tokenizer()
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": tok.vocab_size, "width": 32, "heads": 4, "layers": 1}}
    torch.manual_seed(0)
    folder = write_model_folder(open_clip.CLIP(**cfg), cfg, tmp_path / "tiny-r",
                                hints={"name": "tiny-r", "frame_policy": "echoclip", "tokenizer": "template"})
    with pytest.raises(ModelLoadError, match="blank_wordpiece.tokenizer"):
        load_encoder(f"local-dir:{folder}", device="cpu")
    (folder / "template_vocab.txt").write_text("\n".join(TEMPLATES) + "\n")
    write_blank_wordpiece(folder / "blank_wordpiece.tokenizer")
    enc = load_encoder(f"local-dir:{folder}", device="cpu")
    a, b, c = enc.encode_text(["LV ejection fraction was 35 %.", "LV EJECTION FRACTION IS 35%.",
                               "LV EJECTION FRACTION IS 60%."])
    assert np.allclose(a, b, atol=1e-6) and not np.allclose(b, c, atol=1e-3)
    assert enc.identity["tokenizer"]["kind"] == "template" and len(enc.identity["tokenizer"]["sha256"]) == 64
    small = {**cfg, "text_cfg": {**cfg["text_cfg"], "vocab_size": tok.vocab_size - 10}}
    write_model_folder(open_clip.CLIP(**small), small, folder, hints={"name": "tiny-r", "tokenizer": "template"})
    with pytest.raises(ModelLoadError, match="does not belong"):
        load_encoder(f"local-dir:{folder}", device="cpu")


def test_an_index_refuses_other_tokenizer_files(tmp_path: Path) -> None:
    """Report vectors made with one vocabulary do not match queries tokenized with another."""
    from echosearch.catalog import Catalog
    from echosearch.errors import ModelMismatchError

    ident = {"name": "tiny-r", "weights_sha256": "ab" * 32, "embed_dim": 16, "preprocessing": {"name": "echoclip"},
             "tokenizer": {"kind": "template", "sha256": "1" * 64}}
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        cat.bind_model(ident)
        cat.bind_model(dict(ident))  # the same files: fine
        with pytest.raises(ModelMismatchError, match="tokenizer files"):
            cat.bind_model({**ident, "tokenizer": {"kind": "template", "sha256": "2" * 64}})
