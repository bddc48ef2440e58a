"""Engines and references shared by the vLLM tests: the shipped ToyVQA model, 16 test questions."""

from __future__ import annotations

import gc
import math
from typing import Any

import torch

#: Engine settings for the CPU build: small KV cache, no CUDA graphs, float32 like the reference.
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, limit_mm_per_prompt={"image": 1},
              kv_cache_memory_bytes=256 << 20, distributed_executor_backend="uni", seed=0)
#: Visual tokens the ToyVQA model gives an image (128 px, patch 8), and the budget the tests use.
ALL, K = 256, 64
MAX_NEW = 3


def toy_samples(n: int = 16, start: int = 0) -> list[Any]:
    import arrcoc.toyvqa as toyvqa

    return list(toyvqa.samples("test", n, start=start))


def request(sample: Any, question: str | None = None) -> dict[str, Any]:
    import arrcoc.toyvqa as toyvqa
    from PIL import Image

    return {"prompt": toyvqa.prompt(question or sample.question.text),
            "multi_modal_data": {"image": Image.fromarray(sample.image)}}


class Engines:
    """One vLLM engine at a time (each takes seconds to start and memory to hold), keyed by its settings."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.llm: Any = None

    def get(self, pipeline: str, tokens: int, images_per_prompt: int = 1, tell_model: bool = True) -> Any:
        """The engine for these settings; ``tell_model=False`` starts it as a user who does not pass the model
        to ``engine_args`` does (arrcoc's class is then picked from the config vLLM loads)."""
        from vllm import LLM

        import arrcoc.vllm
        from arrcoc.models import resolve_model

        key = (pipeline, tokens, images_per_prompt, tell_model)
        if key != self.key:
            self.close()
            settings = {**ENGINE, "limit_mm_per_prompt": {"image": images_per_prompt}}
            self.llm = LLM(model=resolve_model("arrcoc:toyvqa"), **settings,
                           **arrcoc.vllm.engine_args(pipeline, tokens_per_image=tokens,
                                                     model="arrcoc:toyvqa" if tell_model else None))
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
        self.llm, self.key = None, None
        gc.collect()


def generate(llm: Any, requests: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Greedy outputs of ``requests`` in one batch, and the pre-LLM state of each image the engine encoded."""
    from vllm import SamplingParams

    llm.apply_model(lambda model: setattr(model.arrcoc, "record", []))
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5), use_tqdm=False)
    states = llm.apply_model(lambda model: [s.to("cpu") for s in model.arrcoc.record])[0]
    llm.apply_model(lambda model: setattr(model.arrcoc, "record", None))
    return outs, states


def hf_generate(model: Any, processor: Any, sample: Any, question: str | None = None, bos: bool = True
                ) -> tuple[list[int], list[dict]]:
    """transformers' greedy ids and, per step, the top-5 ``{token: logprob}`` of the raw logits (one prompt;
    ``bos=False``: tokenised as vLLM's chat endpoint does, without the tokenizer's special tokens)."""
    import arrcoc.toyvqa as toyvqa

    inputs = processor(images=[sample.image], text=[toyvqa.prompt(question or sample.question.text)],
                       return_tensors="pt", add_special_tokens=bos)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return ids, [top5(logits[0]) for logits in out.logits]


def top5(logits: torch.Tensor) -> dict[int, float]:
    """``{token: logprob}`` of the five most likely tokens of one step's raw logits ``[vocab]``."""
    values, index = torch.log_softmax(logits.double(), -1).topk(5)
    return dict(zip(index.tolist(), values.tolist()))


def vllm_ids_and_tops(out: Any) -> tuple[list[int], list[dict]]:
    completion = out.outputs[0]
    tops = [{t: lp.logprob for t, lp in step.items() if lp.rank is not None and lp.rank <= 5}
            for step in completion.logprobs]
    return list(completion.token_ids), tops


def assert_same_generation(got: tuple[list[int], list[dict]], want: tuple[list[int], list[dict]], tol: float,
                           where: str) -> None:
    ids, tops = got
    want_ids, want_tops = want
    # transformers stops at eos like vLLM (one prompt, no padding): the same ids, eos included
    assert ids == want_ids[: len(ids)] and len(ids) == len(want_ids), f"{where}: ids {ids} != {want_ids}"
    for step, (top, want_top) in enumerate(zip(tops, want_tops)):
        assert set(top) == set(want_top), f"{where} step {step}: top-5 tokens {sorted(top)} != {sorted(want_top)}"
        worst = max(abs(top[t] - want_top[t]) for t in top)
        assert worst <= tol, f"{where} step {step}: logprobs differ by {worst:.3g} (> {tol})"
        assert all(math.isfinite(v) for v in top.values())


def planned(pipeline: str, model):
    """``pipeline`` set to K tokens per image by the budget rules, with the context read off the HF model."""
    from arrcoc.integrations import hf
    from arrcoc.budget import plan_budget
    from arrcoc.spec import resolve_spec

    spec = resolve_spec(pipeline)
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    adapter = hf.adapter_for(model)
    return plan_budget(spec, K / ALL, original=side * side, grid=(side, side),
                       layers=model.config.text_config.num_hidden_layers, has_cls=adapter.has_cls,
                       encoder_layers=adapter.default_attention_layer + 1).spec


def apply_reference(model, processor, spec, sample, question=None, bos=True):
    """``arrcoc.hf.apply``'s answer for one prompt (batch of one, as each vLLM image runs) and its kept tokens."""
    from arrcoc.integrations import hf

    with hf.apply(model, spec) as run:
        result = hf_generate(model, processor, sample, question, bos)
        origin = run.state.origin[0].cpu()
    return result, origin
