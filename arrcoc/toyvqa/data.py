"""ToyVQA splits, training examples, and the baselines that tell skill from priors.

Splits are disjoint ranges of seeds (``SPLITS``); sample ``i`` of a split is
``make_sample(start + i)``.  Training examples are multi-turn: a scene built
for one balanced question plus further answer-balanced questions about the
same scene (LLaVA trains on multi-turn conversations too; here it spreads the
cost of the 256 image tokens over several answers).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import InputError
from .questions import QUESTION_TYPES, Question, Sample, make_sample, questions_about
from .scenes import Scene

# [start, stop) seed ranges; disjoint, so no scene is in two splits.
SPLITS: dict[str, tuple[int, int]] = {
    "test": (0, 100_000),
    "val": (100_000, 200_000),
    "train": (1_000_000, 2**31 - 1),
}


def split_seed(split: str, index: int) -> int:
    """The seed of sample ``index`` of ``split``."""
    if split not in SPLITS:
        raise InputError(f"ToyVQA split: expected one of {list(SPLITS)}, got {split!r}")
    start, stop = SPLITS[split]
    if not 0 <= index < stop - start:
        raise InputError(f"ToyVQA {split} index: expected 0 <= index < {stop - start}, got {index}")
    return start + index


def sample(split: str, index: int) -> Sample:
    """Sample ``index`` of ``split`` (deterministic)."""
    return make_sample(split_seed(split, index))


def samples(split: str, n: int, start: int = 0) -> Iterator[Sample]:
    """Samples ``start .. start + n - 1`` of ``split``."""
    for index in range(start, start + n):
        yield sample(split, index)


@dataclass(frozen=True)
class TrainingExample:
    seed: int
    scene: Scene
    questions: tuple[Question, ...]     # the first is the sample's own balanced question


def training_example(index: int, questions_per_image: int) -> TrainingExample:
    """Training example ``index``: train sample ``index`` plus ``questions_per_image - 1`` more questions."""
    first = sample("train", index)
    # a second stream for the extra questions, so they never change the sample itself
    rng = np.random.default_rng([first.seed, 1])
    more = questions_about(first.scene, rng, questions_per_image - 1, exclude=(first.question.text,))
    return TrainingExample(seed=first.seed, scene=first.scene, questions=(first.question, *more))


# ------------------------------------------------------------------ baselines
@dataclass
class Accuracy:
    """Accuracy overall and per question type."""

    correct: int = 0
    total: int = 0
    per_type: dict[str, list[int]] = field(default_factory=lambda: {t: [0, 0] for t in QUESTION_TYPES})

    def add(self, qtype: str, ok: bool) -> None:
        self.correct += int(ok)
        self.total += 1
        self.per_type[qtype][0] += int(ok)
        self.per_type[qtype][1] += 1

    @property
    def overall(self) -> float:
        return self.correct / max(self.total, 1)

    def of(self, qtype: str) -> float:
        correct, total = self.per_type[qtype]
        return correct / max(total, 1)

    def as_dict(self) -> dict:
        return {"accuracy": self.overall, "n": self.total,
                "per_type": {t: {"accuracy": self.of(t), "n": n} for t, (_, n) in self.per_type.items()}}


def _most_common(counter: Counter) -> str:
    # ties broken by the answer's spelling, so the baseline is deterministic
    return min(counter.items(), key=lambda item: (-item[1], item[0]))[0]


def baselines(n_train: int = 20_000, n_test: int = 2_000, progress: bool = False) -> dict[str, Accuracy]:
    """Text-blind and image-blind predictors fitted on ``n_train`` train questions, scored on ``n_test`` test ones.

    - ``majority``: the most frequent answer overall;
    - ``type prior``: the most frequent answer of the question's type;
    - ``template prior``: the most frequent answer of the question's template;
    - ``question lookup``: the most frequent answer to the exact question text in train (falling back to
      the template prior): the best any image-blind classifier can do with this much data.
    """
    overall: Counter = Counter()
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_template: dict[str, Counter] = defaultdict(Counter)
    by_text: dict[str, Counter] = defaultdict(Counter)
    train = samples("train", n_train)
    test = samples("test", n_test)
    if progress:
        from rich.progress import track

        train = track(train, total=n_train, description="baselines: train questions", transient=True)
        test = track(test, total=n_test, description="baselines: test questions", transient=True)
    for s in train:
        q = s.question
        overall[q.answer] += 1
        by_type[q.qtype][q.answer] += 1
        by_template[q.template][q.answer] += 1
        by_text[q.text][q.answer] += 1
    predictors = {
        "majority": lambda q: _most_common(overall),
        "type prior": lambda q: _most_common(by_type[q.qtype]),
        "template prior": lambda q: _most_common(by_template[q.template]),
        "question lookup": lambda q: _most_common(by_text[q.text] if q.text in by_text else by_template[q.template]),
    }
    scores = {name: Accuracy() for name in predictors}
    for s in test:
        for name, predict in predictors.items():
            scores[name].add(s.question.qtype, predict(s.question) == s.question.answer)
    return scores
