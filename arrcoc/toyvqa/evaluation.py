"""Scoring a ToyVQA model: answer accuracy, and how well patch tokens align with words.

Answers are predicted as the **argmax of the next-token logits over the whole
vocabulary** after the LLaVA-1.5 prompt: exactly the first token greedy
``model.generate`` would produce (so a non-answer word counts as wrong).  The
batch is left-padded, as for ``generate``, with the position ids
``generate`` would use (``cumsum(attention_mask) - 1``), so padding changes
no prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .data import Accuracy, samples
from .modeling import pixel_values, prompt
from .questions import Sample


@dataclass
class EvalResult:
    accuracy: Accuracy
    predictions: list[tuple[int, str, str, str]] = field(default_factory=list)   # (seed, question, answer, predicted)

    @property
    def overall(self) -> float:
        return self.accuracy.overall

    @property
    def per_type(self) -> dict[str, float]:
        return {qtype: self.accuracy.of(qtype) for qtype in self.accuracy.per_type}


def _batches(items: Iterable[Sample], size: int) -> Iterable[list[Sample]]:
    batch: list[Sample] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def predict(model, processor, batch: list[Sample]) -> list[str]:
    """Greedy next-token answers to a batch of samples (left padding, ``generate``'s positions)."""
    inputs = processor(images=[s.image for s in batch], text=[prompt(s.question.text) for s in batch],
                       padding=True, return_tensors="pt")
    attention_mask = inputs["attention_mask"]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    logits = model(input_ids=inputs["input_ids"].to(device), attention_mask=attention_mask.to(device),
                   pixel_values=inputs["pixel_values"].to(device, dtype), position_ids=position_ids.to(device),
                   logits_to_keep=1).logits[:, -1]
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def evaluate(model, processor, split: str = "test", n: int = 1000, batch_size: int = 32, start: int = 0,
             progress: bool = True) -> EvalResult:
    """Accuracy of ``model`` on questions ``start .. start + n - 1`` of ``split``, overall and per type."""
    if n < 1 or batch_size < 1:
        raise InputError(f"evaluate: expected n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    model.eval()
    result = EvalResult(Accuracy())
    batches = _batches(samples(split, n, start), batch_size)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"[bold]evaluate {split}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("acc {task.fields[acc]:6.1%}"), TextColumn("{task.fields[rate]:.1f} q/s"),
                       TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task("evaluate", total=n, acc=0.0, rate=0.0)
    try:
        for batch in batches:
            predicted = predict(model, processor, batch)
            for s, p in zip(batch, predicted):
                result.accuracy.add(s.question.qtype, p == s.question.answer)
                result.predictions.append((s.seed, s.question.text, s.question.answer, p))
            if bar is not None:
                speed = bar.tasks[0].speed or 0.0
                bar.update(task, advance=len(batch), acc=result.accuracy.overall, rate=speed)
    finally:
        if bar is not None:
            bar.stop()
    return result


# ------------------------------------------------------------------ alignment
@torch.no_grad()
def patch_word_cosines(model, images: np.ndarray, word_ids: torch.Tensor) -> torch.Tensor:
    """``[B, W, 256]`` cosine of each patch token after the projector with each word's LLM input embedding."""
    parameter = next(model.parameters())
    features = model.model.get_image_features(
        pixel_values=pixel_values(images).to(parameter.device, parameter.dtype), return_dict=True).pooler_output
    patches = F.normalize(torch.stack(list(features)).float(), dim=-1)
    words = F.normalize(model.get_input_embeddings()(word_ids.to(parameter.device)).float(), dim=-1)
    return torch.einsum("wd,bnd->bwn", words, patches)


def grounding_alignment(model, split: str = "test", n: int = 100, batch_size: int = 32) -> dict[str, float | int]:
    """How often a question's words point at the queried object's patches, by cosine after the projector.

    - ``word top-1``: for each colour / shape word a question names, the patch
      with the highest cosine to the word's embedding lies on an object with
      that colour or shape (any such object);
    - ``query top-1``: for questions about one object, the patch with the
      highest summed cosine over the question's colour and shape words lies on
      the queried object (the relevance a demo would show);
    - ``query recall@k``: the fraction of the queried object's patches among
      the top k patches by that score, k = its number of patches.
    """
    from .modeling import vocabulary
    from .scenes import PLURALS

    word_id = {w: i for i, w in enumerate(vocabulary())}
    singular = {plural: shape for shape, plural in PLURALS.items()}
    word_hits = words_total = query_hits = queries = 0
    recall_sum = 0.0
    for batch in _batches(samples(split, n), batch_size):
        vocab_words = [w for w in vocabulary() if not w.startswith("<")]
        ids = torch.tensor([word_id[w] for w in vocab_words])
        cosines = patch_word_cosines(model, np.stack([s.image for s in batch]), ids)
        column = {w: c for c, w in enumerate(vocab_words)}
        for s, cos in zip(batch, cosines):
            for word in s.question.words:
                attribute = singular.get(word, word)
                holders = [o for o in s.objects if attribute in (o.colour, o.shape)]
                if not holders:
                    continue
                top = int(cos[column[word]].argmax())
                words_total += 1
                word_hits += any(top in o.patches for o in holders)
            if len(s.question.targets) == 1:
                score = cos[[column[w] for w in s.question.words]].sum(0)
                target = s.target_patches()
                queries += 1
                query_hits += int(score.argmax()) in target
                top_k = score.topk(len(target)).indices.tolist()
                recall_sum += len(set(top_k) & set(target)) / len(target)
    return {"scenes": n, "word top-1": word_hits / max(words_total, 1), "words": words_total,
            "query top-1": query_hits / max(queries, 1), "query recall@k": recall_sum / max(queries, 1),
            "queries": queries}
