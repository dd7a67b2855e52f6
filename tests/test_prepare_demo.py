"""prepare_demo.py: the parts that need no download (text world, German, QA spans, splits, the
CTranslate2 reader); the real build runs in the slow test and in CI's demo smoke run."""

import random
import struct

import numpy as np
import pytest

import prepare_demo as pd


def test_sentences_are_deterministic_and_bilingual():
    a = [pd.sentence(random.Random(3)) for _ in range(5)]
    b = [pd.sentence(random.Random(3)) for _ in range(5)]
    assert a == b
    for en, de in (pd.sentence(random.Random(i)) for i in range(200)):
        assert 6 <= len(en.split()) <= 14 and en.endswith(".") and de.endswith(".")


SLOTS = dict(a="Anna", b="Ben", c1="Paris", c2="Vienna", day="Monday", hour="ten", n="three", place="hospital",
             obj="keys", pod="evening", vehicle="plane")


@pytest.mark.parametrize("template, en, de", [
    (0, "Anna meets Ben at the hospital in Paris on Monday.", "Anna trifft Ben am Montag im Krankenhaus in Paris."),
    (2, "On Monday, Anna travels from Paris to Vienna by plane.", "Am Montag reist Anna mit dem Flugzeug von Paris nach Wien."),
    (3, "Anna calls Ben at ten in the evening.", "Anna ruft Ben am Abend um zehn an."),
    (5, "Anna and Ben visit the hospital in Paris on Monday.", "Anna und Ben besuchen am Montag das Krankenhaus in Paris."),
    (6, "Anna found three keys near the hospital yesterday.", "Anna hat gestern drei Schlüssel in der Nähe des Krankenhauses gefunden."),
    (7, "The plane to Paris leaves at ten on Monday.", "Das Flugzeug nach Paris fliegt am Montag um zehn ab."),
])
def test_hand_checked_german(template, en, de):
    assert pd.render(template, SLOTS) == (en, de)
    assert pd.render(1, {**SLOTS, "place": "station"})[1] == "Anna kauft um zehn Uhr drei Schlüssel am Bahnhof."
    assert pd.render(1, {**SLOTS, "hour": "one"})[1] == "Anna kauft um ein Uhr drei Schlüssel im Krankenhaus."  # not "eins Uhr"


def test_qa_answers_are_spans_of_the_passage():
    for seed in range(100):
        text, questions = pd.passage(random.Random(seed))
        assert len(questions) == 3 and len(text.split(". ")) == 3
        for question, answer in questions:
            assert question.endswith("?") and answer in text


def test_splits_never_share_a_sentence_or_passage():
    jobs = pd.plan_corpus("small", seed=0)
    by_split = {}
    for split, kind, stem, text, *_ in jobs:
        by_split.setdefault(split, set()).add(text)
    assert not (by_split["train"] & by_split["dev"]) and not (by_split["train"] & by_split["test"])
    assert jobs == pd.plan_corpus("small", seed=0)  # deterministic from the seed
    assert len({j[4].split(":")[0] for j in pd.plan_corpus("full", seed=0)}) == 3  # three engines


def test_ctranslate2_reader(tmp_path):
    def string(s):
        data = s.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    blob = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 2)
    blob += string("encoder/x") + struct.pack("<B2I", 2, 2, 3) + struct.pack("<BI", 4, a.nbytes) + a.tobytes()
    blob += string("encoder/num_heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2) + struct.pack("<h", 6)
    (tmp_path / "model.bin").write_bytes(blob)
    out = pd.read_ctranslate2(tmp_path / "model.bin")
    assert np.array_equal(out["encoder/x"], a) and int(out["encoder/num_heads"]) == 6
