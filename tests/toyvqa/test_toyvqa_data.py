"""ToyVQA questions and splits: unambiguous, balanced, disjoint; baselines stay near chance."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from arrcoc.errors import InputError
from arrcoc.toyvqa import ANSWERS, QUESTION_TYPES, SPLITS, baselines, sample, samples, split_seed, training_example
from arrcoc.toyvqa.questions import POSITION_MARGIN, all_questions
from arrcoc.toyvqa.scenes import IMAGE_SIZE


@pytest.fixture(scope="module")
def test_samples():
    return list(samples("test", 1000))


def test_answers_are_balanced_per_type(test_samples):
    types = Counter(s.question.qtype for s in test_samples)
    for qtype in QUESTION_TYPES:
        assert 0.8 * 200 <= types[qtype] <= 1.2 * 200, types
        answers = Counter(s.question.answer for s in test_samples if s.question.qtype == qtype)
        expected = types[qtype] / len(ANSWERS[qtype])
        assert set(answers) == set(ANSWERS[qtype])
        for answer in ANSWERS[qtype]:
            assert 0.6 * expected <= answers[answer] <= 1.4 * expected, (qtype, answers)


def test_questions_are_unambiguous_and_answered_from_the_records(test_samples):
    for s in test_samples[:300]:
        q = s.question
        # the same question, recomputed from the records, has the same answer
        assert q in all_questions(s.scene, q.qtype)
        objects = s.objects
        if q.qtype == "colour":
            assert [o.shape for o in objects].count(q.words[0]) == 1
            assert objects[q.targets[0]].colour == q.answer
        elif q.qtype == "shape":
            assert [o.colour for o in objects].count(q.words[0]) == 1
            assert objects[q.targets[0]].shape == q.answer
        elif q.qtype == "presence":
            assert (q.answer == "yes") == any((o.colour, o.shape) == q.words for o in objects)
        elif q.qtype == "position":
            assert [(o.colour, o.shape) for o in objects].count(q.words) == 1
            row, col = objects[q.targets[0]].centre
            value = col if q.answer in ("left", "right") else row
            assert abs(value - (IMAGE_SIZE - 1) / 2) >= POSITION_MARGIN
            assert (value < IMAGE_SIZE / 2) == (q.answer in ("left", "top"))
        elif q.qtype == "count":
            assert ("zero", "one", "two", "three").index(q.answer) == len(q.targets)


def test_splits_are_disjoint():
    ranges = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    digests = {split: {hashlib.sha1(s.image.tobytes()).hexdigest() for s in samples(split, 150)}
               for split in SPLITS}
    assert all(len(d) == 150 for d in digests.values())
    assert not digests["train"] & digests["test"] and not digests["train"] & digests["val"]
    assert not digests["val"] & digests["test"]
    assert sample("test", 5).seed == split_seed("test", 5) == SPLITS["test"][0] + 5


def test_bad_split_or_index_say_what_was_expected():
    with pytest.raises(InputError, match="expected one of .*'train'.*got 'dev'"):
        split_seed("dev", 0)
    with pytest.raises(InputError, match="expected 0 <= index < 100000, got 100000"):
        split_seed("test", 100_000)


def test_training_examples_add_valid_distinct_questions():
    example = training_example(3, 6)
    assert example.questions[0] == sample("train", 3).question
    assert len(example.questions) == 6
    assert len({q.text for q in example.questions}) == 6
    for q in example.questions:
        assert q in all_questions(example.scene, q.qtype)
    again = training_example(3, 6)
    assert again.questions == example.questions


def test_image_blind_baselines_stay_near_chance():
    scores = baselines(n_train=1000, n_test=300)
    assert scores["majority"].overall < 0.2
    # the template prior knows the type: chance per type is 1/6, 1/6, 1/2, 1/2, 1/4 (0.32 on average)
    for name in ("type prior", "template prior", "question lookup"):
        assert scores[name].overall < 0.45, (name, scores[name].as_dict())


def test_an_unknown_question_type_is_an_input_error():
    with pytest.raises(InputError, match=r"question type: expected one of \['colour'.*got 'colours'"):
        all_questions(sample("test", 0).scene, "colours")
