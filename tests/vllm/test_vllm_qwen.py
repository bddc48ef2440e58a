"""arrcoc in vLLM on Qwen2-VL (CPU build, a tiny random Qwen2-VL saved with its processor to a tmp dir).

One engine per pipeline, ``K = 16`` merged tokens per image; images of 112x112 px (a 4x4 grid of merged
patches: 16 tokens), 112x168 and 168x112 (4x6 / 6x4: 24) and 168x168 (6x6: 36), so a batch mixes sizes:

* keep-everything (random_keep on the 16-token images): greedy ids and top-5 logprobs equal transformers'
  ``generate`` without arrcoc, i.e. the K placeholders carry the original 3-D rotary positions;
* random_keep, aim (AIM's merging), SparseVLM's text relevance (query-aware: the text after the image) and
  pool (where its output grid reaches K) on the larger images: the engine's prompt is text + K per image,
  and the answers and logprobs equal ``arrcoc.hf.apply`` with the same pipeline set to K for that image's
  grid (1e-4), one- and two-image prompts of different lengths in one batch; two questions on one image;
  chunked prefill (an image's placeholders split between two steps: 7 + 9);
* Qwen2.5-VL (window attention): keep-everything and random_keep the same way;
* the refusals: an image smaller than K or whose grid the budget rule cannot bring to K (at processing), K
  above the largest image, a CLS method (VisionZip: Qwen's tower has no class token).
"""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm.entrypoints")  # not just "vllm": tests/vllm itself imports as a namespace package

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vllm_helpers import assert_same_generation, top5, vllm_ids_and_tops  # noqa: E402

K = 16
MAX_NEW = 3
SIZES = {"square": (112, 112), "wide": (168, 112), "tall": (112, 168), "big": (168, 168), "small": (56, 56)}
TOKENS = {"square": 16, "wide": 24, "tall": 24, "big": 36, "small": 4}   # merged 2x2 patches of 14 px
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
#: SparseVLM's text relevance alone (its CLS saliency needs a class token, which Qwen's tower lacks)
PIPELINES = {"sparsevlm_text": {"name": "sparsevlm_text", "encoder": {"use": "hf_vision"},
                                "compress": [{"use": "sparsevlm", "keep": 0.4, "w_text": 1.0, "w_sal": 0.0}]}}
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, limit_mm_per_prompt={"image": 2},
              kv_cache_memory_bytes=64 << 20, distributed_executor_backend="uni", seed=0)


def build_qwen(path: str, family: str = "qwen2_vl") -> str:
    """A random 2-layer Qwen2-VL (head_dim 32: the CPU attention kernels' smallest), a word-level tokenizer
    ("w0".."w895" and Qwen's special tokens) and Qwen's processor with images of 56..168 px a side.
    ``family="qwen2_5_vl"``: Qwen2.5-VL, its tower with window attention in block 0 (windows of 2x2 merged
    tokens, so every image here is reordered into windows and back) and full attention in block 1."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i + 1 for i in range(896)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                                     pad_token="<|endoftext|>", unk_token="<unk>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    size = {"shortest_edge": 56 * 56, "longest_edge": 168 * 168}
    qwen25 = family == "qwen2_5_vl"
    processor = (transformers.Qwen2_5_VLProcessor if qwen25 else transformers.Qwen2VLProcessor)(
        image_processor=transformers.Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2,
                                                           temporal_patch_size=2),
        video_processor=transformers.Qwen2VLVideoProcessor(size=size), tokenizer=tokenizer)
    torch.manual_seed(0)
    vision = (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=128, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
              if qwen25 else
              dict(depth=2, embed_dim=32, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2))
    config = (transformers.Qwen2_5_VLConfig if qwen25 else transformers.Qwen2VLConfig)(
        vision_config=vision,
        text_config=dict(vocab_size=1000, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         pad_token_id=ids["<|endoftext|>"], max_position_embeddings=1024, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                          "rope_theta": 10000.0}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model_class = (transformers.Qwen2_5_VLForConditionalGeneration if qwen25
                   else transformers.Qwen2VLForConditionalGeneration)
    model_class(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def image(kind: str, seed: int):
    from PIL import Image

    width, height = SIZES[kind]
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(words: list[int], images: int = 1, after: list[int] = (7, 8)) -> str:
    text = " ".join(f"w{w}" for w in words)
    return f"{text} {' '.join([IMAGE] * images)} {' '.join(f'w{w}' for w in after)}"


#: (prompt, images): prompts of different lengths, one or two images, every size at least K
CASES = [
    (prompt([1, 2]), [("wide", 0)]),
    (prompt([3, 4, 5, 6, 9], after=[10]), [("tall", 1)]),
    (prompt([11]), [("big", 2)]),
    (prompt([12, 13, 14], images=2), [("wide", 3), ("wide", 4)]),
    (prompt([15, 16, 17, 18]), [("square", 5)]),
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_qwen(str(tmp_path_factory.mktemp("qwen2_vl_tiny")))


@pytest.fixture(scope="module")
def hf_model(qwen_dir):
    return load_hf(qwen_dir)


def load_hf(path: str):
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(path)


class Engine:
    """One vLLM engine at a time, keyed by its pipeline."""

    def __init__(self, path: str) -> None:
        self.path, self.key, self.llm = path, None, None

    def get(self, pipeline: str, tokens: int = K, **settings):
        from vllm import LLM

        import arrcoc.vllm

        key = (pipeline, tokens, tuple(sorted(settings.items())))
        if key != self.key:
            self.close()
            self.llm = LLM(model=self.path, **{**ENGINE, **settings},
                           **arrcoc.vllm.engine_args(PIPELINES.get(pipeline, pipeline), tokens_per_image=tokens))
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            shutdown = getattr(getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
        self.llm, self.key = None, None
        gc.collect()


@pytest.fixture(scope="module")
def engine(qwen_dir):
    engine = Engine(qwen_dir)
    yield engine
    engine.close()


def generate(llm, cases):
    from vllm import SamplingParams

    requests = [{"prompt": text, "multi_modal_data": {"image": [image(*i) for i in images]}}
                for text, images in cases]
    return llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5, ignore_eos=True),
                        use_tqdm=False)


def hf_generate(model, processor, text, images):
    inputs = processor(images=[image(*i) for i in images], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return (ids, [top5(logits[0]) for logits in out.logits]), inputs["input_ids"].shape[1]


def planned(pipeline: str, model, kind: str):
    """``pipeline`` set to K tokens for an image of ``kind`` by the budget rules (as arrcoc eval sets it)."""
    from arrcoc.budget import plan_budget
    from arrcoc.integrations import hf
    from arrcoc.spec import resolve_spec

    width, height = SIZES[kind]
    grid = (height // 28, width // 28)
    adapter = hf.adapter_for(model)
    return plan_budget(resolve_spec(PIPELINES.get(pipeline, pipeline)), K / TOKENS[kind], original=TOKENS[kind],
                       grid=grid, layers=model.config.text_config.num_hidden_layers, has_cls=False,
                       encoder_layers=adapter.default_attention_layer + 1).spec


def test_keep_everything_equals_transformers(engine, hf_model):
    """random_keep at K = 16 on images of 16 tokens keeps every token: the model's own answers."""
    model, processor = hf_model
    cases = [(prompt([1, 2, 3]), [("square", 0)]), (prompt([4], after=[5, 6, 7, 8]), [("square", 1)]),
             (prompt([9, 10], images=2), [("square", 2), ("square", 3)])]
    outs = generate(engine.get("random_keep"), cases)
    for i, ((text, images), out) in enumerate(zip(cases, outs)):
        want, length = hf_generate(model, processor, text, images)
        assert len(out.prompt_token_ids) == length  # K = every token: the model's own prompt
        assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, f"prompt {i}")


@pytest.mark.parametrize("pipeline", ["random_keep", "aim", "sparsevlm_text"])
def test_pipeline_equals_apply(engine, hf_model, pipeline):
    """A batch of prompts of different lengths with one or two images of different sizes: text + K per image,
    and each prompt's answer that of arrcoc.hf.apply with the pipeline set to K for its images."""
    from arrcoc.integrations import hf

    model, processor = hf_model
    outs = generate(engine.get(pipeline), CASES)
    for i, ((text, images), out) in enumerate(zip(CASES, outs)):
        (kind,) = {kind for kind, _ in images}  # one plan per prompt: apply runs a prompt's images as one batch
        full_want, full_length = hf_generate(model, processor, text, images)
        text_tokens = full_length - sum(TOKENS[kind] for kind, _ in images)
        assert len(out.prompt_token_ids) == text_tokens + K * len(images), f"prompt {i}"
        if pipeline == "random_keep" and len(images) == 2:
            continue  # apply draws a prompt's second image with seed + 1, vLLM each image with seed (docs/vllm.md)
        with hf.apply(model, planned(pipeline, model, kind)) as run:
            want, _ = hf_generate(model, processor, text, images)
            assert (run.state.counts == K).all()
        assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, f"{pipeline} prompt {i}")
        if TOKENS[kind] > K:  # the reduction changed the answer: the comparison tells them apart
            assert want != full_want


def test_two_questions_on_one_image(engine, hf_model):
    """A query-aware pipeline: the same image asked two questions in one batch keeps a set for each (the
    image's hash is keyed by the question, or vLLM's encoder cache would hand the first set to both)."""
    from arrcoc.integrations import hf

    model, processor = hf_model
    cases = [(prompt([1, 2], after=[7, 8]), [("big", 0)]), (prompt([1, 2], after=[30, 31, 32]), [("big", 0)])]
    outs = generate(engine.get("sparsevlm_text"), cases)
    kept = []
    for i, ((text, images), out) in enumerate(zip(cases, outs)):
        with hf.apply(model, planned("sparsevlm_text", model, "big")) as run:
            want, _ = hf_generate(model, processor, text, images)
            kept.append(run.state.origin[0])
        assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, f"question {i}")
    assert not torch.equal(kept[0], kept[1])  # the questions do keep different tokens


def test_pool_only_where_its_grid_reaches_k(engine, hf_model):
    """pool's budget rule picks an output grid: 16 tokens of a 6x6 grid, but 15 (5x3) of a 4x6 one.  Such an
    image is refused when its prompt is processed (in the model a wrong count would stop the engine); the
    others equal arrcoc.hf.apply."""
    from arrcoc.errors import BudgetError
    from arrcoc.integrations import hf

    model, processor = hf_model
    llm = engine.get("pool")
    with pytest.raises(BudgetError, match=r"pipeline 'pool' set to tokens_per_image=16 hands on 15 tokens for "
                                          r"image 0 of the prompt \(a grid of 4x6 merged patches\)"):
        generate(llm, [(prompt([1]), [("wide", 0)])])
    cases = [(prompt([1, 2]), [("big", 0)]), (prompt([3, 4, 5]), [("big", 1)])]
    for i, ((text, images), out) in enumerate(zip(cases, generate(llm, cases))):
        assert len(out.prompt_token_ids) == len(text.split()) - 1 + 2 + K  # the words, start and end, K
        with hf.apply(model, planned("pool", model, "big")) as run:
            want, _ = hf_generate(model, processor, text, images)
            assert (run.state.counts == K).all()
        assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, f"pool prompt {i}")


def test_chunked_prefill(engine, hf_model):
    """Prefill in chunks of 20 tokens: an image's K placeholders are split between two steps, each step's part
    at its own kept cells' positions (the answer is still apply's)."""
    from arrcoc.integrations import hf

    model, processor = hf_model
    llm = engine.get("random_keep", max_num_batched_tokens=20, enable_chunked_prefill=True)
    cases = [(prompt(list(range(1, 13))), [("big", 0)])]  # 12 words and <|vision_start|>, then 16 placeholders
    (out,) = generate(llm, cases)
    with hf.apply(model, planned("random_keep", model, "big")):
        want, _ = hf_generate(model, processor, *cases[0])
    assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, "chunked")


def test_qwen2_5_vl(tmp_path_factory, engine):
    """Qwen2.5-VL (window attention in the tower): keep-everything equals transformers' generate; random_keep at
    K equals arrcoc.hf.apply, in one batch of mixed sizes."""
    from arrcoc.integrations import hf

    engine.close()
    path = build_qwen(str(tmp_path_factory.mktemp("qwen2_5_vl_tiny")), "qwen2_5_vl")
    model, processor = load_hf(path)
    llm = Engine(path)
    try:
        cases = [(prompt([1, 2, 3]), [("square", 0)]), *CASES[:3]]
        outs = generate(llm.get("random_keep"), cases)
    finally:
        llm.close()
    for i, ((text, images), out) in enumerate(zip(cases, outs)):
        (kind,) = {kind for kind, _ in images}
        want, length = hf_generate(model, processor, text, images)
        assert len(out.prompt_token_ids) == length - TOKENS[kind] + K, f"prompt {i}"
        if TOKENS[kind] > K:
            with hf.apply(model, planned("random_keep", model, kind)):
                want, _ = hf_generate(model, processor, text, images)
        assert_same_generation(vllm_ids_and_tops(out), want, 1e-4, f"qwen2.5 prompt {i}")


def test_image_smaller_than_k_is_refused(engine):
    from arrcoc.errors import BudgetError

    for attempt in range(2):  # the second time from vLLM's processor cache
        with pytest.raises(BudgetError, match=r"image 0 of the prompt gives 4 visual tokens \(a grid of 2x2 "
                                              r"merged patches.*fewer than tokens_per_image=16"):
            generate(engine.get("random_keep"), [(prompt([1]), [("small", 0)])])
    # the engine goes on serving
    (out,) = generate(engine.get("random_keep"), [(prompt([1]), [("square", 0)])])
    assert len(out.outputs[0].token_ids) == MAX_NEW


def test_k_above_the_largest_image_is_refused(engine):
    from arrcoc.errors import BudgetError

    with pytest.raises(BudgetError, match=r"tokens_per_image=37 is above the 36 visual tokens this model gives even "
                                          r"its largest image \(168x168 px"):
        engine.get("random_keep", 37)


def test_cls_attention_method_is_refused(engine):
    from arrcoc.errors import ArrcocError

    with pytest.raises(ArrcocError, match="no class token"):
        engine.get("visionzip")
