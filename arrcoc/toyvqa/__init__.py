"""ToyVQA: a procedural visual question answering task and a small LLaVA trained on it.

The task (``scenes``, ``questions``, ``data``): 128 x 128 scenes of 3-8 small
coloured shapes on textured, cluttered backgrounds, and one-word questions
whose answer sits in one small region (colour, shape, presence, position,
count).  Every sample keeps the records of its objects, including which of
the 16 x 16 patches hold them: the ground truth for relevance.

The model (``modeling``, ``train``, ``evaluation``): a real
``transformers.LlavaForConditionalGeneration`` (CLIP tower with a class token,
LLaVA-1.5 feature selection and projector, a small Llama, a word-level
tokenizer), trained on CPU and shipped in the package::

    import arrcoc.toyvqa as toyvqa

    model, processor = toyvqa.load()                 # offline, from toyvqa.model_path()
    s = toyvqa.sample("test", 0)
    inputs = processor(images=[s.image], text=[toyvqa.prompt(s.question.text)], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=1)       # -> s.question.answer
    toyvqa.evaluate(model, processor, split="test", n=1000)

Importing this package needs neither ``transformers`` nor a model: only
:func:`load` and the training code import ``transformers`` (the ``hf``
extra), and nothing trains at import.  See ``docs/toyvqa.md``.
"""

from .data import SPLITS, Accuracy, baselines, sample, samples, split_seed, training_example
from .evaluation import EvalResult, evaluate, grounding_alignment, patch_word_cosines, predict
from .modeling import PROMPT, ModelSize, load, model_path, pixel_values, prompt, vocabulary
from .questions import ANSWERS, QUESTION_TYPES, TEMPLATES, Question, Sample, make_sample, questions_about
from .scenes import COLOURS, GRID, IMAGE_SIZE, PATCH, SHAPES, ObjectSpec, Scene, SceneObject, render_scene

__all__ = [
    "ANSWERS", "Accuracy", "COLOURS", "EvalResult", "GRID", "IMAGE_SIZE", "ModelSize", "ObjectSpec", "PATCH",
    "PROMPT", "QUESTION_TYPES", "Question", "SHAPES", "SPLITS", "Sample", "Scene", "SceneObject", "TEMPLATES",
    "baselines", "evaluate", "grounding_alignment", "load", "make_sample", "model_path", "patch_word_cosines",
    "pixel_values", "predict", "prompt", "questions_about", "render_scene", "sample", "samples", "split_seed",
    "training_example", "vocabulary",
]
