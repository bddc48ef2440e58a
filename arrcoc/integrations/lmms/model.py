"""``--model arrcoc`` for lmms-eval: any model family arrcoc supports, every request under ``arrcoc.hf.apply``.

``python -m lmms_eval --model arrcoc --model_args pretrained=DIR,pipeline=cdpruner,budget=0.111,batch_size=8``:

* ``pretrained``: a local Hugging Face checkpoint, or ``arrcoc:toyvqa`` (the shipped model), loaded as
  ``arrcoc eval --model`` loads it (fp32 on a CPU, the checkpoint's dtype on a GPU);
* ``pipeline``: a shipped pipeline's name or a YAML file; left out, every visual token is kept (the
  ``all tokens`` reference of ``arrcoc eval``);
* ``budget``: the budget vocabulary of ``arrcoc eval`` (a fraction of the visual tokens in (0, 1], written
  with a decimal point: ``0.25``, ``1.0``) or a token count (an integer: ``64``); the pipeline's
  token-setting stages are planned for it with :func:`arrcoc.budget.plan_budget`, from the model's budget
  context (:meth:`~arrcoc.integrations.hf.adapter.Adapter.budget_context`) as ``arrcoc eval`` does;
  left out, the pipeline runs with the params its YAML gives;
* ``batch_size`` (or lmms-eval's ``--batch_size``), ``device`` (``cpu``, ``cuda``, ``auto``).

Requests are batched in the order lmms-eval hands them over (grouped by generation settings), prompts
left-padded, so a batch holds the questions ``arrcoc eval`` puts in one ``generate`` call and the answers
equal its answers.  ``generate_until`` is greedy ``generate`` (sampling when a task asks for a
temperature); ``loglikelihood`` runs the prompt alone through the pipeline (a query-aware stage must not
see the answer it scores) and decodes the continuation with the KV cache, each step forced to the
continuation's next token, summing the log-probabilities of the raw logits (``isgreedy``: every forced
token is the argmax).

arrcoc's report of every call (``run.report``: visual tokens per decoder layer, prefill FLOPs, KV cache
bytes, milliseconds) is summed per request type and logged through lmms-eval's
``log_metrics``, which puts it in the results JSON under ``throughput`` as ``avg_arrcoc_<field>``
(per image; the mean over request types when a run has several).  Under ``accelerate launch`` each
process evaluates its shard and the sums are added over the processes before rank 0 logs them.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ...budget import plan_budget
from ...errors import ArrcocWarning, BudgetError, InputError
from ...evaluation.methods import no_stages, post_tower
from ...spec import PipelineSpec, resolve_spec
from ...timing import clock

#: The report fields logged into lmms-eval's results (``throughput.avg_arrcoc_<field>``), per image.
REPORT_FIELDS = ("images", "visual_tokens", "visual_tokens_in", "prefill_gflops", "kv_bytes", "prefill_ms",
                 "llm_prefill_ms", "total_ms")
#: Summed beside them: generated tokens (lmms-eval's own ``total_gen_tokens``).
_SUMS = (*REPORT_FIELDS, "new_tokens")


def parse_budget(budget: Any) -> float | int | None:
    """``budget`` from ``--model_args``: ``None`` (the pipeline's own params), a fraction in (0, 1] (a float:
    the budget of ``arrcoc eval``) or a token count (an int >= 1); a :class:`BudgetError` otherwise."""
    if budget is None or budget == "":
        return None
    if isinstance(budget, bool):
        raise BudgetError(f"lmms-eval model arrcoc: budget must be a fraction of the visual tokens in (0, 1] "
                          f"(e.g. 0.25) or a token count (e.g. 64), got {budget!r}")
    if isinstance(budget, str):  # lmms-eval hands numbers over parsed; a string is what it could not parse
        text = budget.strip()
        try:
            budget = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise BudgetError(f"lmms-eval model arrcoc: budget must be a fraction of the visual tokens in (0, 1] "
                              f"(e.g. 0.25) or a token count (e.g. 64), got {budget!r}") from None
    if isinstance(budget, int):
        if budget < 1:
            raise BudgetError(f"lmms-eval model arrcoc: a token-count budget must be >= 1, got {budget}")
        return budget
    if not 0.0 < float(budget) <= 1.0:
        raise BudgetError(f"lmms-eval model arrcoc: a fractional budget must lie in (0, 1], got {budget!r}; "
                          "write a token count as an integer (budget=64)")
    return float(budget)


def prompt_for(processor: Any, question: str, images: int) -> str:
    """The model's chat prompt for ``images`` images and ``question`` (``arrcoc eval``'s prompt for one)."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"USER: {'<image>' * images}{chr(10) if images else ''}{question} ASSISTANT:"


class ArrcocLMM(lmms):
    """An arrcoc pipeline at a budget inside a Hugging Face VLM, as an lmms-eval model (see the module doc)."""

    is_simple = True

    def __init__(self, pretrained: str = "arrcoc:toyvqa", pipeline: str | None = None, budget: Any = None,
                 batch_size: Any = 1, device: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise InputError(f"lmms-eval model arrcoc: unknown model_args {sorted(kwargs)}; expected pretrained, "
                             "pipeline, budget, batch_size, device")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise InputError(f"lmms-eval model arrcoc: batch_size must be an integer >= 1, got {batch_size!r}") \
                from None
        if self.batch_size_per_gpu < 1:
            raise InputError(f"lmms-eval model arrcoc: batch_size must be an integer >= 1, got {batch_size!r}")
        # Arguments checked before the model loads: a typo fails in a second, not after a minute.
        self.budget = parse_budget(budget)
        self.spec, note = self._pipeline(pipeline)
        if note:
            warnings.warn(f"lmms-eval model arrcoc: {note}", ArrcocWarning, stacklevel=2)
        if self.budget is not None and self.spec is None:
            raise BudgetError(f"lmms-eval model arrcoc: budget={budget!r} needs a pipeline (pipeline=NAME or a "
                              "YAML file) whose stages it sets; without one every visual token is kept")

        from accelerate import Accelerator

        from ...evaluation.runner import load_model
        from ...integrations.hf import adapter_for

        accelerator = Accelerator()
        if accelerator.num_processes > 1:   # data parallel: one model per process, lmms-eval shards the requests
            device = str(accelerator.device) if device in (None, "cuda", "auto") else device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("lmms-eval model arrcoc: device 'cuda' asked for, but torch sees no CUDA device")
        self._model, self.processor, self.pretrained = load_model(pretrained, device)
        self.adapter = adapter_for(self._model)   # a clear error for a family arrcoc has no adapter for
        self._tokenizer = self.processor.tokenizer
        parameter = next(self._model.parameters())
        self._device, self.dtype = parameter.device, parameter.dtype
        self.plans: dict[str, PipelineSpec] = {}   # by budget context (JSON)
        self.plan_params: dict[str, Any] = {}
        self.chat_template = None   # lmms-eval reads it; the prompt is the processor's own (prompt_for)

    # ------------------------------------------------------------- lmms-eval
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ArrcocLMM":
        """``--model_args`` first: lmms-eval passes its ``--batch_size`` (default 1) and ``--device`` too, and a
        ``batch_size`` in ``--model_args`` is the more specific of the two."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None:
                args.setdefault(key, value)
        return cls(**args)

    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        totals = _Totals()
        for indices, gen_kwargs in self._groups(requests):
            gen_kwargs = dict(gen_kwargs)
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new_tokens = int(gen_kwargs.pop("max_new_tokens", 128))
            temperature = float(gen_kwargs.pop("temperature", 0) or 0)
            sample = {"do_sample": temperature > 0, **({"temperature": temperature} if temperature > 0 else {}),
                      "top_p": gen_kwargs.pop("top_p", None) if temperature > 0 else None,
                      "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
            for chunk in _chunks(indices, self.batch_size):
                contexts, visuals = self._inputs(requests, chunk)
                inputs, spec = self._encode(contexts, visuals)
                with self._apply(spec) as run:
                    start = clock(self.device)
                    sequences = self.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                                    pad_token_id=self.tokenizer.pad_token_id, **sample)
                    ms = (clock(self.device) - start) * 1e3
                new = sequences[:, inputs["input_ids"].shape[1]:]
                totals.add(run.report, ms, int((new != self.tokenizer.pad_token_id).sum()))
                for i, row in zip(chunk, new.tolist()):
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    for stop in until:   # lmms-eval's convention: the text before the first stop sequence
                        if stop:
                            text = text.split(stop, 1)[0]
                    out[i] = text
        self._log(totals, "generate_until")
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        totals = _Totals()
        for chunk in _chunks(list(range(len(requests))), self.batch_size):
            contexts, visuals = self._inputs(requests, chunk)
            continuations = []
            for i in chunk:
                _, target, _, doc_id, task, split = requests[i].args
                continuations.append(target if isinstance(target, str)
                                     else target(self.task_dict[task][split][doc_id]))
            prompts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
            # The continuation's tokens: what it adds to the prompt's (the image placeholders, which the processor
            # expands, are in both).
            targets = []
            for p, c in zip(prompts, continuations):
                prompt_ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
                full_ids = self.tokenizer(p + c, add_special_tokens=False)["input_ids"]
                if len(full_ids) <= len(prompt_ids) or full_ids[:len(prompt_ids)] != prompt_ids:
                    raise InputError(f"lmms-eval model arrcoc: the loglikelihood continuation {c!r} does not add "
                                     f"tokens after its prompt's (prompt ends {p[-40:]!r})")
                targets.append(full_ids[len(prompt_ids):])
            inputs, spec = self._encode(prompts, visuals, prompts=True)
            # The prompt alone goes through the pipeline (a query-aware stage must not see the answer it is scored
            # on), then the continuation is decoded with the KV cache, each step forced to its next token; the
            # raw logits of every step score it.
            steps = max(len(t) for t in targets)
            pad = self.tokenizer.pad_token_id
            forced = torch.full((len(chunk), steps), pad, dtype=torch.long)
            for row, t in enumerate(targets):
                forced[row, :len(t)] = torch.tensor(t)
            calls = [0] * len(chunk)

            def next_token(row: int, ids: torch.Tensor) -> list[int]:
                step = calls[row]
                calls[row] += 1
                return [int(forced[row, min(step, steps - 1)])]

            with self._apply(spec) as run:
                start = clock(self.device)
                result = self.model.generate(**inputs, max_new_tokens=steps, do_sample=False,
                                             num_beams=1, prefix_allowed_tokens_fn=next_token, pad_token_id=pad,
                                             output_logits=True, return_dict_in_generate=True)
                ms = (clock(self.device) - start) * 1e3
            totals.add(run.report, ms, sum(len(t) for t in targets))
            # [B, steps, vocab]; generate stops early only when every row has written the end-of-sequence token,
            # which a continuation holding it would do before its end: refused rather than scored short
            logprobs = torch.log_softmax(torch.stack(result.logits, 1).float(), -1).cpu()
            if logprobs.shape[1] < max(len(t) for t in targets):
                raise InputError("lmms-eval model arrcoc: a loglikelihood continuation holds the end-of-sequence "
                                 "token before its end; generation stopped there")
            for row, (i, t) in enumerate(zip(chunk, targets)):
                step_logprobs = logprobs[row, :len(t)]
                target = torch.tensor(t)
                score = step_logprobs.gather(-1, target[:, None]).sum()
                out[i] = (float(score), bool((step_logprobs.argmax(-1) == target).all()))
        self._log(totals, "loglikelihood")
        return out  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise InputError("lmms-eval model arrcoc: multi-round generation is not supported; run single-round tasks "
                         "(generate_until, loglikelihood)")

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _pipeline(pipeline: str | None) -> tuple[PipelineSpec | None, str]:
        if pipeline in (None, ""):
            return None, ""
        spec = resolve_spec(str(pipeline))   # UnknownPipelineError names the shipped pipelines
        return post_tower(spec)   # an encoder.in_blocks compressor runs on the tower's output, as in arrcoc eval

    @staticmethod
    def _groups(requests: list[Instance]) -> Iterable[tuple[list[int], dict]]:
        """Request indices grouped by generation settings, each group in lmms-eval's order."""
        groups: dict[str, tuple[list[int], dict]] = {}
        for i, request in enumerate(requests):
            gen_kwargs = request.args[1] or {}
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, ([], gen_kwargs))[0].append(i)
        return groups.values()

    def _inputs(self, requests: list[Instance], chunk: list[int]) -> tuple[list[str], list[list[Any]]]:
        contexts, visuals = [], []
        for i in chunk:
            context, _, doc_to_visual, doc_id, task, split = requests[i].args
            images = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            images = [im.convert("RGB") if hasattr(im, "convert") else im for im in (images or [])]
            if any(isinstance(im, str) for im in images):
                raise InputError(f"lmms-eval model arrcoc: task {task!r} gives videos or paths; arrcoc's lmms-eval "
                                 "model takes images")
            contexts.append(context)
            visuals.append(images)
        return contexts, visuals

    def _prompt(self, context: str, images: int) -> str:
        # A task whose context already places the image keeps its placement; the others get arrcoc eval's prompt.
        if "<image>" in context:
            return prompt_for(self.processor, context.replace("<image>", "").strip(), images) \
                if images == context.count("<image>") else context
        return prompt_for(self.processor, context, images)

    def _encode(self, texts: list[str], visuals: list[list[Any]], prompts: bool = False
                ) -> tuple[dict[str, Any], PipelineSpec]:
        """The processor's left-padded inputs for one batch and the pipeline planned for its images."""
        if not prompts:
            texts = [self._prompt(t, len(v)) for t, v in zip(texts, visuals)]
        images = [im for v in visuals for im in v]
        kwargs = {"images": images} if images else {}
        # Left padding whatever the tokenizer's default: the last column is every sequence's last token.
        inputs = self.processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs, self._plan(inputs)

    def _plan(self, inputs: dict[str, Any]) -> PipelineSpec:
        """The spec this batch runs: the pipeline planned at the budget for its images' budget context."""
        if self.spec is None:
            return no_stages()
        if self.budget is None or "pixel_values" not in inputs:
            return self.spec
        image_inputs = {k: inputs[k] for k in self.adapter.image_input_names if k in inputs}
        contexts = {json.dumps(c, sort_keys=True, default=list)
                    for c in self.adapter.budget_context(inputs["pixel_values"], image_inputs)}
        if len(contexts) != 1:
            raise BudgetError("lmms-eval model arrcoc: budgets are fractions of one visual-token count per batch, "
                              f"but this batch's images differ ({sorted(contexts)[:3]}); use batch_size=1 or a "
                              "LLaVA-1.5-style model")
        key = contexts.pop()
        if key not in self.plans:
            context = json.loads(key)
            original = int(context["original"])
            fraction = self.budget if isinstance(self.budget, float) else self.budget / original
            if isinstance(self.budget, int) and self.budget > original:
                raise BudgetError(f"lmms-eval model arrcoc: budget={self.budget} tokens, but the model gives an image "
                                  f"{original} visual tokens; ask for at most {original}")
            plan = plan_budget(self.spec, fraction, original=original, grid=tuple(context["grid"]),
                               layers=int(context["layers"]), has_cls=bool(context["has_cls"]),
                               encoder_layers=int(context["encoder_layers"]))
            self.plans[key] = plan.spec
            self.plan_params = plan.params
        return self.plans[key]

    @contextmanager
    def _apply(self, spec: PipelineSpec) -> Iterator[Any]:
        """``arrcoc.hf.apply`` for one call (its ``run.report`` read after it); the pre-LLM stages' warnings show
        as Python shows warnings, once per place."""
        from ...integrations.hf import apply

        with torch.inference_mode(), apply(self.model, spec, tokenizer=self.tokenizer) as run:
            yield run

    def _log(self, totals: "_Totals", kind: str) -> None:
        """The summed reports (over every process) logged into lmms-eval's results, per image."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        sums = totals.as_tensor()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.to(self.device)
            torch.distributed.all_reduce(sums)
        values = dict(zip(_SUMS, sums.cpu().tolist()))
        images = values.pop("images")
        if self.rank != 0 or images == 0:
            return
        metrics = {f"arrcoc_{k}": values[k] / images for k in REPORT_FIELDS if k != "images"}
        metrics["arrcoc_images"] = images
        seconds, new_tokens = values["total_ms"] / 1e3, int(values["new_tokens"])
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / seconds if seconds > 0 else 0.0, additional_metrics=metrics)


class _Totals:
    """Sums of one request type's reports (float64: FLOPs and bytes of many calls)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(_SUMS, 0.0)

    def add(self, report: Any, total_ms: float, new_tokens: int = 0) -> None:
        s = self.sums
        s["new_tokens"] += new_tokens
        layers = max(len(report.layer_visual), 1)
        s["images"] += report.batch
        s["visual_tokens"] += sum(sum(v) for v in report.layer_visual) / layers   # mean over layers, per image summed
        s["visual_tokens_in"] += sum(report.visual_tokens_in)
        s["prefill_gflops"] += report.prefill_flops / 1e9
        s["kv_bytes"] += report.kv_cache_bytes
        s["prefill_ms"] += report.prefill_ms
        s["llm_prefill_ms"] += report.llm_prefill_ms
        s["total_ms"] += total_ms

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.sums[k] for k in _SUMS], dtype=torch.float64)


def _chunks(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]
