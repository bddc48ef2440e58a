"""Training the ToyVQA model end to end, on CPU, resumable and seeded.

Each step takes ``batch_images`` training examples; each example is one image
and a ``questions_per_image``-turn LLaVA-1.5 conversation about it::

    <s> USER: <image> x 256 what colour is the star ? ASSISTANT: red </s> USER: how many ... ASSISTANT: two </s> ...

The first turn is exactly the evaluation prompt; later turns reuse the image
tokens, which are most of the sequence, so each image teaches several
answers for little more than the cost of one.

Loss = cross-entropy on the answer tokens (each answer word and its
``</s>``) + ``grounding_weight`` x the **grounding loss** + ``attention_weight``
x the **attention losses** + ``position_weight`` x the **position loss**.

Grounding loss:

For every patch token after the projector ``p`` and every word ``w`` of the
vocabulary (its LLM input embedding ``e_w``), ``logit = scale * cos(p, e_w)``
and a binary cross-entropy with target 1 when the patch is at least 25 %
covered by an object whose colour, shape or plural shape is ``w``, and 0 for
every other word (background patches: 0 for every word); patches an object
only grazes are left out.  Positives and negatives are averaged apart, so the
few object patches weigh as much as the many background ones.

Why: arrcoc's relevance scorers compare visual tokens after the projector with
the LLM input embeddings of the query's words.  In a real LLaVA those live in
the same space but are only loosely aligned; a model trained from scratch on
answers alone has no reason to align them at all, and the offline demo would
show noise.  The grounding loss makes "red" and "star" point at red and star
patches.  It is a deliberate departure from LLaVA's recipe, documented in
``docs/toyvqa.md``.

Attention losses: ``-log`` of the attention mass that three heads of the
language model put where the records say the answer is:

- first layer, head 0: each colour / shape word of a question attends to the
  patches of the objects with that colour / shape;
- first layer, head 1: the token the answer is predicted at (the ":" after
  ASSISTANT) attends to the colour / shape words its question names;
- second layer, head 0: that token attends to the patches of the object(s)
  the answer is read from (none for "no" / "zero").

Why: trained on answers alone (with the grounding loss), the model sat at the
text prior (~37 %) for the first 400 of 1500 steps, not even reading which
kind of question it was asked; finding one object among 256 image tokens
through two hops of attention learnt from scratch takes more than a 45-minute
CPU budget.  The supervision uses only the object records every sample keeps;
the other heads and layers are free.  As a side effect, the attention of these
heads is a faithful relevance map, which attention-based compressors (FastV,
SparseVLM) read.

Position loss: a linear probe (trained alongside, never saved) reads each
patch token's (row, col) after the projector; mean squared error in grid
units.  Why: the grounding loss rewards translation-invariant features, and
the vision tower dropped its position embeddings' information entirely (a
least-squares read-out of row and column from the patch tokens had R^2 <= 0),
so "left or right?" stayed at chance while colour and shape reached 97-100 %;
the Llama's rotary positions are relative and the values it reads carry none.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from .data import training_example
from .modeling import (
    EOS_ID,
    IMAGE_TOKEN_ID,
    IMAGE_TOKENS,
    NEXT_TURN,
    PAD_ID,
    ModelSize,
    build_model,
    require_transformers,
    build_processor,
    pixel_values,
    vocabulary,
)
from .questions import Question
from .scenes import COLOURS, GRID, PATCH, PLURALS, SHAPES, Scene

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
MIN_COVER = 0.25        # of a patch's pixels: an object's patch for the grounding loss
IGNORE = -100


#: The largest seed (and step count) a setting may hold: torch.manual_seed and int64 tensors take no more.
SEED_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_images: int = 16
    questions_per_image: int = 6
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grounding_weight: float = 0.25
    grounding_scale: float = 10.0
    attention_weight: float = 0.25
    position_weight: float = 1.0
    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)

    def __post_init__(self) -> None:
        """Every setting is checked here, before a model is built: a NaN learning rate trained NaN weights."""
        positive = ("lr", "grad_clip", "grounding_scale")
        non_negative = ("weight_decay", "grounding_weight", "attention_weight", "position_weight")
        for name in positive + non_negative + ("min_lr_ratio",):
            value = getattr(self, name)
            low = "> 0" if name in positive else ">= 0"
            bound = f"{low}" + (" and <= 1" if name == "min_lr_ratio" else "")
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and (value > 0 if name in positive else value >= 0) and (name != "min_lr_ratio" or value <= 1))
            if not ok:
                raise InputError(f"TrainConfig.{name}: expected a finite number {bound}, got {value!r}")
        for name, least in (("steps", 1), ("batch_images", 1), ("questions_per_image", 1), ("warmup", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= SEED_MAX:
                raise InputError(f"TrainConfig.{name}: expected an integer in [{least}, {SEED_MAX}], got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        values["size"] = ModelSize(**values["size"])
        return cls(**values)


# ------------------------------------------------------------------ batches
class Batcher:
    """Token ids, labels, pixels and grounding targets of training examples."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        vocab = vocabulary()
        self.vocab = vocab
        self.word_id = {w: i for i, w in enumerate(vocab)}
        # grounding targets: one column per vocabulary word; specials take no part
        self.ground_words = [i for i, w in enumerate(vocab) if not w.startswith("<")]
        column = {self.vocab[word_index]: c for c, word_index in enumerate(self.ground_words)}
        self.ground_groups = tuple(tuple(column[w] for w in words)
                                   for words in (tuple(COLOURS), SHAPES, tuple(PLURALS[s] for s in SHAPES)))
        self._first_prefix = tokenizer("USER: " + "<image>" * IMAGE_TOKENS + "\n", add_special_tokens=True)["input_ids"]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def conversation(self, questions: Sequence[Question]) -> tuple[list[int], list[int], list[tuple[int, str]],
                                                                    list[tuple[int, Question, list[int]]]]:
        """Ids and labels of a multi-turn conversation (labels: answer word and ``</s>`` of each turn),
        the positions of the colour / shape words of the questions, and for each turn the position the
        answer is predicted at (the ":" after ASSISTANT), its question, and the positions of the colour /
        shape words that question names."""
        ids: list[int] = list(self._first_prefix)
        labels: list[int] = [IGNORE] * len(ids)
        words: list[tuple[int, str]] = []
        answers: list[tuple[int, Question, list[int]]] = []
        for turn, q in enumerate(questions):
            text = f"{q.text} ASSISTANT:" if turn == 0 else NEXT_TURN.format(question=q.text)
            prompt_ids = self._encode(text)
            words += [(len(ids) + i, self.vocab[t]) for i, t in enumerate(prompt_ids) if self.vocab[t] in q.words]
            named = [len(ids) + i for i, t in enumerate(prompt_ids) if self.vocab[t] in q.words]
            answers.append((len(ids) + len(prompt_ids) - 1, q, named))
            answer = [self.word_id[q.answer], EOS_ID]
            ids += prompt_ids + answer
            labels += [IGNORE] * len(prompt_ids) + answer
        return ids, labels, words, answers

    def grounding_targets(self, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
        """``[256, W]`` targets over the grounding words and the ``[256]`` mask of patches that count."""
        targets = torch.zeros(GRID * GRID, len(self.ground_words))
        counted = torch.ones(GRID * GRID, dtype=torch.bool)
        column = {word_index: c for c, word_index in enumerate(self.ground_words)}
        for obj in scene.objects:
            words = (obj.colour, obj.shape, PLURALS[obj.shape])
            for patch, pixels in zip(obj.patches, obj.patch_pixels):
                if pixels >= MIN_COVER * PATCH * PATCH:
                    for w in words:
                        targets[patch, column[self.word_id[w]]] = 1.0
                else:
                    counted[patch] = False
        # a patch mostly covered by one object and grazed by another stays in, with its main object's words
        counted |= targets.sum(-1) > 0
        return targets, counted

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        conversations = [self.conversation(e.questions) for e in examples]
        length = max(len(c[0]) for c in conversations)
        # right padding: causal attention never lets a real token see the pads after it
        input_ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        word_rows, word_targets, answer_rows, answer_targets, read_rows, read_targets = [], [], [], [], [], []
        for b, ((ids, lab, words, answers), example) in enumerate(zip(conversations, examples)):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
            objects = example.scene.objects
            for position, word in words:
                holders = [i for i, o in enumerate(objects) if word in (o.colour, o.shape, PLURALS[o.shape])]
                if holders:   # "is there a red star?" with no star: nothing for "star" to look at
                    word_rows.append((b, position))
                    word_targets.append(attention_target(objects, holders))
            for position, q, named in answers:
                read_rows.append((b, position))
                read = torch.zeros(length)
                read[named] = 1.0
                read_targets.append(read)
                if q.targets:   # "no" and "zero" answers come from the absence of an object
                    answer_rows.append((b, position))
                    answer_targets.append(attention_target(objects, q.targets))
        grounding = [self.grounding_targets(e.scene) for e in examples]
        empty = torch.zeros(0, GRID * GRID)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values(np.stack([e.scene.image for e in examples])),
            "ground_targets": torch.stack([t for t, _ in grounding]),
            "ground_mask": torch.stack([m for _, m in grounding]),
            "word_rows": torch.tensor(word_rows, dtype=torch.long).reshape(-1, 2),
            "word_targets": torch.stack(word_targets) if word_targets else empty,
            "answer_rows": torch.tensor(answer_rows, dtype=torch.long).reshape(-1, 2),
            "answer_targets": torch.stack(answer_targets) if answer_targets else empty,
            "read_rows": torch.tensor(read_rows, dtype=torch.long).reshape(-1, 2),
            "read_targets": torch.stack(read_targets),
        }


def attention_target(objects, indices: Sequence[int]) -> torch.Tensor:
    """``[256]`` mask of the patches of ``objects[indices]``: those at least ``MIN_COVER`` covered, or
    an object's best-covered patch if none is."""
    target = torch.zeros(GRID * GRID)
    for i in indices:
        obj = objects[i]
        main = obj.main_patches(MIN_COVER) or (obj.patches[int(np.argmax(obj.patch_pixels))],)
        target[list(main)] = 1.0
    return target


def examples_for_step(step: int, config: TrainConfig):
    """The training examples of ``step``: a pure function of the step, so resuming replays nothing."""
    first = step * config.batch_images
    return [training_example(first + i, config.questions_per_image) for i in range(config.batch_images)]


# -------------------------------------------------------------------- losses
def grounding_loss(patch_tokens: torch.Tensor, word_embeddings: torch.Tensor, targets: torch.Tensor,
                   mask: torch.Tensor, scale: float, groups: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Balanced BCE on ``scale * cos(patch, word)``, plus a softmax over each word group.

    Shapes: ``[B, N, D]`` patches, ``[W, D]`` words, ``[B, N, W]`` targets, ``[B, N]`` mask.  The BCE
    puts object patches near their words and background far from all; alone, it is content with
    every shape word equally near every object (a wrong shape is one negative among thousands),
    so each group of ``groups`` (columns: the colours, the shapes, the plurals) also gets a
    cross-entropy over its words on the patches that have one of them: "star, not cross".
    """
    cosine = F.normalize(patch_tokens, dim=-1) @ F.normalize(word_embeddings, dim=-1).T
    logits = scale * cosine
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = mask.unsqueeze(-1).to(losses.dtype)
    positive, negative = targets * weight, (1 - targets) * weight
    loss = ((losses * positive).sum() / positive.sum().clamp(min=1)
            + (losses * negative).sum() / negative.sum().clamp(min=1))
    for columns in groups:
        group_targets = targets[..., list(columns)]
        has = (group_targets.sum(-1) > 0) & mask
        if has.any():
            loss = loss + F.cross_entropy(logits[..., list(columns)][has], group_targets[has].argmax(-1))
    return loss


def attention_loss(attention: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, start: int = 0) -> torch.Tensor:
    """``-log`` of the attention mass that ``rows`` ([K, 2] batch, position) put on their targets.

    ``attention``: one head's ``[B, L, L]`` probabilities; ``targets``: ``[K, W]`` over the key
    positions ``start .. start + W - 1`` (the 256 image tokens, or the whole sequence).
    """
    if len(rows) == 0:
        return attention.new_zeros(())
    probabilities = attention[rows[:, 0], rows[:, 1], start: start + targets.shape[1]]
    mass = (probabilities * targets.to(probabilities.dtype)).sum(-1)
    return -torch.log(mass.clamp(min=1e-6)).mean()


def position_loss(patch_tokens: torch.Tensor, probe: torch.nn.Module) -> torch.Tensor:
    """Mean squared error of ``probe``'s (row, col) of every patch token, in [0, 1] units of the grid."""
    coords = torch.arange(GRID, dtype=patch_tokens.dtype, device=patch_tokens.device) / (GRID - 1)
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), -1).reshape(GRID * GRID, 2)
    return F.mse_loss(probe(patch_tokens), grid.expand(patch_tokens.shape[0], -1, -1))


def forward_losses(model, batch: dict[str, torch.Tensor], batcher: Batcher, config: TrainConfig,
                   position_probe: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Answer, grounding, attention and position losses, their weighted sum, and answer-word accuracy."""
    image_outputs = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    patch_tokens = torch.stack(list(image_outputs.pooler_output))            # [B, 256, D] after the projector
    supervise_attention = config.attention_weight > 0
    out = model(input_ids=batch["input_ids"], mm_encoder_outputs={"image": image_outputs},
                output_attentions=supervise_attention)
    logits = out.logits[:, :-1]
    targets = batch["labels"][:, 1:]
    answer_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    embeddings = model.get_input_embeddings().weight[batcher.ground_words]
    ground = grounding_loss(patch_tokens, embeddings, batch["ground_targets"], batch["ground_mask"],
                            config.grounding_scale, batcher.ground_groups)
    words = (targets != IGNORE) & (targets != EOS_ID)
    accuracy = (logits.argmax(-1)[words] == targets[words]).float().mean()
    loss = answer_loss + config.grounding_weight * ground
    losses = {"answer_loss": answer_loss, "grounding_loss": ground}
    if supervise_attention:
        if not out.attentions:
            raise ModelError("attention supervision needs the language model's attention probabilities: "
                             "call use_supervised_attention(model) first (train() does)")
        image_start = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
        # first layer, head 0: each colour / shape word looks at the objects that have it
        word_attention = attention_loss(out.attentions[0][:, 0], batch["word_rows"], batch["word_targets"], image_start)
        # first layer, head 1: the token before the answer reads the colour / shape words of its question
        read_attention = attention_loss(out.attentions[0][:, 1], batch["read_rows"], batch["read_targets"])
        # second layer (of three), head 0: that token, knowing what is asked about, looks at the object the
        # answer is read from; the layer after it is free to compare, count, decide
        answer_layer = min(1, len(out.attentions) - 1)
        answer_attention = attention_loss(out.attentions[answer_layer][:, 0], batch["answer_rows"],
                                          batch["answer_targets"], image_start)
        loss = loss + config.attention_weight * (word_attention + read_attention + answer_attention)
        losses |= {"word_attention_loss": word_attention, "read_attention_loss": read_attention,
                   "answer_attention_loss": answer_attention}
    if config.position_weight > 0:
        if position_probe is None:
            raise ModelError("the position loss needs the position probe (train() makes one)")
        where = position_loss(patch_tokens, position_probe)
        loss = loss + config.position_weight * where
        losses["position_loss"] = where
    return {"loss": loss, **losses, "accuracy": accuracy}


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, config: TrainConfig, *extra: torch.nn.Module) -> torch.optim.Optimizer:
    # no decay on norms, biases and embeddings (the usual transformer recipe)
    decay, no_decay = [], []
    named = list(model.named_parameters()) + [(n, p) for module in extra for n, p in module.named_parameters()]
    for name, parameter in named:
        (no_decay if parameter.ndim < 2 or "embed" in name else decay).append(parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))


SUPERVISED_ATTENTION = "toyvqa_supervised_heads"
SUPERVISED_HEADS = (0, 1)


def use_supervised_attention(model) -> None:
    """Make the language model's attention return the probabilities of heads 0 and 1, computed beside sdpa.

    sdpa keeps no probabilities, and eager attention for every head costs a
    third more per step on CPU; this runs sdpa for the output and a softmax
    for the two heads the attention loss reads.  Only training uses it: the
    saved model is set back to sdpa.
    """
    require_transformers()
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        kwargs.pop("output_attentions", None)
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
        # query heads 0 and 1, and the key heads they share under grouped-query attention
        kv_heads = [h // module.num_key_value_groups for h in SUPERVISED_HEADS]
        scores = (query[:, list(SUPERVISED_HEADS)] @ key[:, kv_heads].transpose(-1, -2)) * scaling
        if attention_mask is None:   # sdpa's is_causal path: the causal mask, made here
            q_len, k_len = scores.shape[-2:]
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
            scores = scores.masked_fill(~causal, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
        return output, scores.softmax(-1)

    AttentionInterface.register(SUPERVISED_ATTENTION, attention)
    # masks as sdpa builds them (without this an unknown implementation gets no mask at all)
    AttentionMaskInterface.register(SUPERVISED_ATTENTION, sdpa_mask)
    model.set_attn_implementation({"text_config": SUPERVISED_ATTENTION})


# ----------------------------------------------------------------- the loop
class TrainingExistsError(InputError):
    """The output directory already holds a training run."""


def _save_checkpoint(path: Path, step: int, model, position_probe, optimizer, config: TrainConfig,
                     elapsed: dict[str, float]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "position_probe": position_probe.state_dict(),
                "optimizer": optimizer.state_dict(), "config": config.as_dict(), "elapsed": elapsed}, tmp)
    os.replace(tmp, path)   # never a half-written checkpoint


def _progress_columns():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} (answer {task.fields[answer]:.3f}, ground {task.fields[ground]:.3f})"),
            TextColumn("acc {task.fields[acc]:6.1%}"), TextColumn("{task.fields[rate]:.2f} it/s"),
            TimeElapsedColumn(), TimeRemainingColumn())


def train(out: str | Path, config: TrainConfig = TrainConfig(), *, resume: bool = False, checkpoint_every: int = 50,
          progress: bool = True, threads: int | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train a ToyVQA model into ``out`` and save it there (fp32, ``save_pretrained``); returns ``out``.

    ``resume=True`` continues from ``out/checkpoint.pt``, which must come from
    the same ``config``; data are a pure function of the step, so a resumed
    run sees exactly the batches an uninterrupted one would.
    """
    out = Path(out)
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise TrainingExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or another --out")
    if threads is not None:
        torch.set_num_threads(threads)
    processor = build_processor()
    batcher = Batcher(processor.tokenizer)
    model = build_model(config.size, seed=config.seed)
    if config.attention_weight > 0:
        use_supervised_attention(model)
    # training only, never saved with the model: a linear read-out of each patch token's grid position
    position_probe = torch.nn.Linear(config.size.text_width, 2)
    optimizer = make_optimizer(model, config, position_probe)
    start, elapsed = 0, {"wall_s": 0.0, "cpu_s": 0.0}
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state["config"] != config.as_dict():
            differ = {k: (state["config"][k], v) for k, v in config.as_dict().items() if state["config"].get(k) != v}
            raise TrainingExistsError(f"{checkpoint_path} was trained with another config; (checkpoint, now): {differ}")
        model.load_state_dict(state["model"])
        position_probe.load_state_dict(state["position_probe"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
    elif resume and progress:
        print(f"no checkpoint in {out}: starting from step 0")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(config.as_dict(), indent=2))
    model.train()

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall0, cpu0 = time.time(), cpu_seconds()
    recent: list[dict[str, float]] = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(*_progress_columns())
        bar.start()
        task = bar.add_task("train", total=config.steps, completed=start, loss=0.0, answer=0.0, ground=0.0, acc=0.0, rate=0.0)
    try:
        with open(out / LOG, "a") as log:
            for step in range(start, config.steps):
                t0 = time.time()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, config)
                batch = batcher(examples_for_step(step, config))
                losses = forward_losses(model, batch, batcher, config, position_probe)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise ModelError(f"step {step}: gradient norm is {float(grad_norm)}; lower --lr")
                optimizer.step()
                record = {k: v.item() for k, v in losses.items()} | {
                    "step": step + 1, "lr": learning_rate(step, config), "grad_norm": float(grad_norm),
                    "seconds": time.time() - t0}
                log.write(json.dumps(record) + "\n")
                log.flush()   # a background run can be followed with tail -f
                recent = (recent + [record])[-20:]
                if bar is not None:
                    mean = {k: sum(r[k] for r in recent) / len(recent) for k in ("loss", "answer_loss", "grounding_loss", "accuracy", "seconds")}
                    bar.update(task, completed=step + 1, loss=mean["loss"], answer=mean["answer_loss"],
                               ground=mean["grounding_loss"], acc=mean["accuracy"], rate=1.0 / mean["seconds"])
                done = step + 1
                if done % checkpoint_every == 0 or done == config.steps:
                    now = {"wall_s": elapsed["wall_s"] + time.time() - wall0,
                           "cpu_s": elapsed["cpu_s"] + cpu_seconds() - cpu0}
                    _save_checkpoint(checkpoint_path, done, model, position_probe, optimizer, config, now)
                if on_step is not None:   # after the checkpoint: a callback that stops the run loses nothing
                    on_step(done, record)
    finally:
        if bar is not None:
            bar.stop()
    total = {"wall_s": elapsed["wall_s"] + time.time() - wall0, "cpu_s": elapsed["cpu_s"] + cpu_seconds() - cpu0}
    model.eval()
    model.set_attn_implementation({"text_config": "sdpa"})   # what users get: the default, fast path
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"config": config.as_dict(), "steps": config.steps, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "parameters": sum(p.numel() for p in model.parameters()),
               "last_20_steps": {k: sum(r[k] for r in recent) / max(len(recent), 1)
                                 for k in ("answer_loss", "grounding_loss", "accuracy")} if recent else None,
               **total}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return out


def export(source: str | Path, target: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a trained model to ``target`` with its weights in ``dtype`` (the package ships fp16)."""
    from .modeling import load

    model, processor = load(source, dtype=torch.float32)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(target)
    processor.save_pretrained(target)
    return target
