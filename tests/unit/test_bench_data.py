import json

import pytest

from kmd.editors.bench.data import DatasetError, load_records

ZSRE = {"subject": "S", "src": "What is S?", "pred": "a", "rephrase": "S is what?", "alt": "b",
        "answers": ["a"], "loc": "nq question: q", "loc_ans": "c", "cond": "", "case_id": 7}
CF = {"case_id": 2, "prompt": "T, the", "target_new": "piano", "subject": "T", "ground_truth": "guitar",
      "rephrase_prompt": "T plays", "locality_prompt": "J plays the", "locality_ground_truth": "guitar"}
HALLU = {"prompt": "A passage.", "target_new": "More text.", "subject": "x",
         "locality_prompt": "L", "locality_ground_truth": "M"}
TEMPORAL = dict(HALLU, ood_rephrase="Another prompt")


@pytest.mark.parametrize("row, fmt", [(ZSRE, "zsre"), (CF, "counterfact"), (HALLU, "hallucination"), (TEMPORAL, "temporal")])
def test_formats_are_detected(tmp_path, row, fmt):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([row, row]))
    found, records = load_records(path)
    assert found == fmt and len(records) == 2
    assert records[0].target.strip()


def test_bad_record_is_named(tmp_path):
    path = tmp_path / "d.json"
    broken = dict(ZSRE, case_id=9001)
    del broken["alt"]
    path.write_text(json.dumps([ZSRE, broken]))
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 9001\): field 'alt'"):
        load_records(path)


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ZSRE, ZSRE])[:-30])
    with pytest.raises(DatasetError, match="not valid JSON.*truncated"):
        load_records(path)


def test_limit_and_unknown_format(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ZSRE] * 5))
    assert len(load_records(path, limit=3)[1]) == 3
    with pytest.raises(DatasetError, match="unknown format"):
        load_records(path, fmt="nope")


def test_long_form_record_without_locality_answer_is_kept_unscored(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([HALLU, dict(HALLU, locality_ground_truth="")]))
    _, records = load_records(path)
    assert records[0].loc_answer == "M" and records[1].loc_answer is None
    path.write_text(json.dumps([dict(HALLU, locality_ground_truth=5)]))
    with pytest.raises(DatasetError, match="locality_ground_truth"):
        load_records(path)
