"""ToyVQA questions: templates, answers computed from object records, balanced sampling.

Five question types, each answered by one word that depends on a small
region of the image:

=========  ==========================================  =====================
type       template                                    answers
=========  ==========================================  =====================
colour     what colour is the {shape} ?                the 6 colours
shape      what shape is the {colour} object ?         the 6 shapes
presence   is there a(n) {colour} {shape} ?            yes, no
position   is the {colour} {shape} on the left or      left, right /
           the right ? / ... at the top or the         top, bottom
           bottom ?
count      how many {shapes} are there ?               zero .. three
=========  ==========================================  =====================

Questions are unambiguous by construction: a colour question names a shape
that occurs once, a shape question a colour that occurs once, a position
question a colour-shape pair that occurs once and lies at least
``POSITION_MARGIN`` pixels from the image's midline.

:func:`make_sample` draws the question type uniformly, then the answer
uniformly among that type's answers (the position template too), then builds
a scene in which that is the answer; so answers are balanced per type and the
question alone says nothing about the answer.  Distractors are deliberate:
objects sharing the target's colour or shape, "no" answers whose colour and
shape both occur on other objects.  :func:`questions_about` asks further,
answer-balanced questions about an existing scene (used for multi-turn
training).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from .scenes import COLOURS, IMAGE_SIZE, PLURALS, SHAPES, ObjectSpec, Scene, render_scene

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "presence", "position", "count")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
POSITION_MARGIN = 10     # pixels between a position question's object centre and the midline
MIN_OBJECTS, MAX_OBJECTS = 3, 8

TEMPLATES: dict[str, str] = {
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    "presence": "is there {article} {colour} {shape} ?",
    "position_lr": "is the {colour} {shape} on the left or the right ?",
    "position_tb": "is the {colour} {shape} at the top or the bottom ?",
    "count": "how many {shapes} are there ?",
}
TEMPLATE_TYPE: dict[str, str] = {name: name.split("_")[0] for name in TEMPLATES}

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "presence": ("yes", "no"),
    "position": ("left", "right", "top", "bottom"),
    "count": COUNT_WORDS,
}
ANSWER_WORDS: tuple[str, ...] = tuple(dict.fromkeys(a for answers in ANSWERS.values() for a in answers))


def question_words() -> tuple[str, ...]:
    """Every word a question or answer can contain, in a fixed order (the tokenizer's vocabulary)."""
    words: list[str] = []
    for template in TEMPLATES.values():
        words += template.replace("{shape}", "").replace("{colour}", "").replace("{shapes}", "").split()
    words = [w for w in words if w != "{article}"] + ["a", "an"]
    words += list(COLOURS) + list(SHAPES) + list(PLURALS.values()) + list(ANSWER_WORDS)
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    qtype: str                       # one of QUESTION_TYPES
    template: str                    # a key of TEMPLATES
    targets: tuple[int, ...]         # indices of the objects the answer is read from (empty for "no" / zero)
    words: tuple[str, ...]           # the colour / shape words the question names, in order


@dataclass(frozen=True)
class Sample:
    """One ToyVQA example: a scene and one question about it."""

    seed: int
    scene: Scene
    question: Question

    @property
    def image(self) -> np.ndarray:
        return self.scene.image

    @property
    def objects(self):
        return self.scene.objects

    def target_patches(self) -> tuple[int, ...]:
        """Flat indices of the patches holding the queried object(s): the relevance ground truth."""
        return self.scene.patches_of(self.question.targets)


# ---------------------------------------------------------- reading records
def _find(scene: Scene, colour: str | None = None, shape: str | None = None) -> list[int]:
    return [i for i, o in enumerate(scene.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def _side(value: float, low: str, high: str) -> str | None:
    """``low`` / ``high`` for a centre clearly on one side of the midline, else None."""
    middle = (IMAGE_SIZE - 1) / 2
    if value <= middle - POSITION_MARGIN:
        return low
    if value >= middle + POSITION_MARGIN:
        return high
    return None


def _colour_question(scene: Scene, shape: str) -> Question | None:
    found = _find(scene, shape=shape)
    if len(found) != 1:
        return None
    return Question(TEMPLATES["colour"].format(shape=shape), scene.objects[found[0]].colour,
                    "colour", "colour", tuple(found), (shape,))


def _shape_question(scene: Scene, colour: str) -> Question | None:
    found = _find(scene, colour=colour)
    if len(found) != 1:
        return None
    return Question(TEMPLATES["shape"].format(colour=colour), scene.objects[found[0]].shape,
                    "shape", "shape", tuple(found), (colour,))


def _presence_question(scene: Scene, colour: str, shape: str) -> Question:
    found = _find(scene, colour, shape)
    article = "an" if colour[0] in "aeiou" else "a"
    return Question(TEMPLATES["presence"].format(article=article, colour=colour, shape=shape), "yes" if found else "no",
                    "presence", "presence", tuple(found), (colour, shape))


def _position_question(scene: Scene, template: str, colour: str, shape: str) -> Question | None:
    found = _find(scene, colour, shape)
    if len(found) != 1:
        return None
    row, col = scene.objects[found[0]].centre
    answer = _side(col, "left", "right") if template == "position_lr" else _side(row, "top", "bottom")
    if answer is None:
        return None
    return Question(TEMPLATES[template].format(colour=colour, shape=shape), answer,
                    "position", template, tuple(found), (colour, shape))


def _count_question(scene: Scene, shape: str) -> Question | None:
    found = _find(scene, shape=shape)
    if len(found) >= len(COUNT_WORDS):
        return None
    return Question(TEMPLATES["count"].format(shapes=PLURALS[shape]), COUNT_WORDS[len(found)],
                    "count", "count", tuple(found), (PLURALS[shape],))


def all_questions(scene: Scene, qtype: str) -> list[Question]:
    """Every valid question of ``qtype`` about ``scene``, answers read from its records."""
    if qtype == "colour":
        found = [_colour_question(scene, s) for s in SHAPES]
    elif qtype == "shape":
        found = [_shape_question(scene, c) for c in COLOURS]
    elif qtype == "presence":
        found = [_presence_question(scene, c, s) for c in COLOURS for s in SHAPES]
    elif qtype == "position":
        found = [_position_question(scene, t, c, s) for t in ("position_lr", "position_tb")
                 for c in COLOURS for s in SHAPES]
    elif qtype == "count":
        found = [_count_question(scene, s) for s in SHAPES]
    else:
        raise InputError(f"question type: expected one of {list(QUESTION_TYPES)}, got {qtype!r}")
    return [q for q in found if q is not None]


# ------------------------------------------------- scenes built for answers
def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _fillers(rng: np.random.Generator, count: int, allowed: Callable[[str, str], bool]) -> list[ObjectSpec]:
    """``count`` random objects whose (colour, shape) ``allowed`` accepts."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES if allowed(c, s)]
    return [ObjectSpec(shape=s, colour=c) for c, s in (pairs[int(rng.integers(len(pairs)))] for _ in range(count))]


def _scene_for(qtype: str, answer: str, template: str, rng: np.random.Generator) -> tuple[list[ObjectSpec], Callable]:
    """Objects whose records make ``answer`` the answer, and how to ask about them."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    if qtype == "colour":
        shape = _pick(rng, SHAPES)
        specs = [ObjectSpec(shape, answer)]
        if rng.random() < 0.5:  # a same-colour distractor: colour alone does not find the object
            specs.append(ObjectSpec(_pick(rng, [s for s in SHAPES if s != shape]), answer))
        specs += _fillers(rng, n - len(specs), lambda c, s: s != shape)
        return specs, lambda scene: _colour_question(scene, shape)
    if qtype == "shape":
        colour = _pick(rng, COLOURS)
        specs = [ObjectSpec(answer, colour)]
        if rng.random() < 0.5:  # a same-shape distractor in another colour
            specs.append(ObjectSpec(answer, _pick(rng, [c for c in COLOURS if c != colour])))
        specs += _fillers(rng, n - len(specs), lambda c, s: c != colour)
        return specs, lambda scene: _shape_question(scene, colour)
    if qtype == "presence":
        colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
        specs = [ObjectSpec(shape, colour)] if answer == "yes" else []
        # hard negatives (and matching distractors for "yes"): the colour and the shape on other objects
        if rng.random() < 0.7:
            specs.append(ObjectSpec(_pick(rng, [s for s in SHAPES if s != shape]), colour))
        if rng.random() < 0.7:
            specs.append(ObjectSpec(shape, _pick(rng, [c for c in COLOURS if c != colour])))
        specs += _fillers(rng, max(0, n - len(specs)), lambda c, s: (c, s) != (colour, shape))
        return specs, lambda scene: _presence_question(scene, colour, shape)
    if qtype == "position":
        colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
        middle = (IMAGE_SIZE - 1) / 2
        # 2 pixels of slack: the drawn centroid may sit a pixel from the planned centre
        low = (0, int(np.floor(middle - POSITION_MARGIN)) - 2)
        high = (int(np.ceil(middle + POSITION_MARGIN)) + 2, IMAGE_SIZE - 1)
        side = low if answer in ("left", "top") else high
        target = ObjectSpec(shape, colour, cols=side) if template == "position_lr" else ObjectSpec(shape, colour, rows=side)
        specs = [target] + _fillers(rng, n - 1, lambda c, s: (c, s) != (colour, shape))
        return specs, lambda scene: _position_question(scene, template, colour, shape)
    if qtype == "count":
        shape, k = _pick(rng, SHAPES), COUNT_WORDS.index(answer)
        specs = [ObjectSpec(shape, _pick(rng, COLOURS)) for _ in range(k)]
        specs += _fillers(rng, max(0, n - k), lambda c, s: s != shape)
        return specs, lambda scene: _count_question(scene, shape)
    raise InputError(f"question type: expected one of {list(QUESTION_TYPES)}, got {qtype!r}")


def _shuffled(specs: list[ObjectSpec], rng: np.random.Generator) -> list[ObjectSpec]:
    # the target must not always be object 0 (drawn first, placed first)
    return [specs[i] for i in rng.permutation(len(specs))]


def make_sample(seed: int) -> Sample:
    """The sample of ``seed``: question type, then answer, then a scene with that answer.

    Same seed, same sample (image bytes included), on any machine.
    """
    # numpy would take a float or a bool as a seed and fail on a negative one with its own message
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"ToyVQA seed: expected a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    template = qtype
    if qtype == "position":
        template = ("position_lr", "position_tb")[int(rng.integers(2))]
        answer = _pick(rng, ("left", "right") if template == "position_lr" else ("top", "bottom"))
    else:
        answer = _pick(rng, ANSWERS[qtype])
    specs, ask = _scene_for(qtype, answer, template, rng)
    scene = render_scene(_shuffled(specs, rng), rng)
    question = ask(scene)
    # the answer is read back from the records, not assumed from the plan
    if question is None or question.answer != answer:
        raise RuntimeError(f"ToyVQA seed {seed}: planned answer {answer!r} for a {qtype} question, "
                           f"the drawn scene gives {question}")
    return Sample(seed=seed, scene=scene, question=question)


def questions_about(scene: Scene, rng: np.random.Generator, count: int,
                    exclude: tuple[str, ...] = ()) -> list[Question]:
    """``count`` further questions about ``scene``: a random type, then an answer uniform among the
    answers that type can have here, then a question with that answer; no question twice."""
    asked = set(exclude)
    chosen: list[Question] = []
    candidates = {qtype: all_questions(scene, qtype) for qtype in QUESTION_TYPES}
    for _ in range(count):
        for _try in range(10):
            qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
            options = [q for q in candidates[qtype] if q.text not in asked]
            if options:
                break
        else:
            break
        answers = sorted(Counter(q.answer for q in options))
        answer = answers[int(rng.integers(len(answers)))]
        with_answer = [q for q in options if q.answer == answer]
        question = with_answer[int(rng.integers(len(with_answer)))]
        asked.add(question.text)
        chosen.append(question)
    return chosen
