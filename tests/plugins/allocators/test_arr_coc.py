import torch

import arrcoc


def test_arr_coc_yaml_validates():
    spec = arrcoc.resolve_spec("arr_coc")
    # the shipped ToyVQA model encodes both the image and the query (tests/toyvqa/test_toyvqa_relevance.py)
    assert (spec.encoder.use, spec.encoder.params["model"]) == ("hf_vision", "arrcoc:toyvqa")
    assert (spec.query_encoder.use, spec.query_encoder.params["model"]) == ("hf_text", "arrcoc:toyvqa")
    assert [s.use for s in spec.compress] == ["sparsevlm"]
    assert spec.score[0].params["weights"] == {"query": 0.7, "saliency": 0.3}
    assert spec.allocate.use == "homunculus"
    tiers = spec.allocate.params["tiers"]
    assert sum(c * k for c, k in tiers) == 94   # of the 16 x 16 = 256 patch tokens


def test_arr_coc_runs_on_a_tiny_model():
    spec = {
        "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224", "layer": -2,
                    "model_kwargs": {"depth": 3}},
        "query_encoder": {"use": "toy_text"},
        "compress": [{"use": "sparsevlm", "keep": 0.4}],
        "score": [{"use": "relevance", "weights": {"query": 0.7, "saliency": 0.3}}],
        "allocate": {"use": "homunculus", "tiers": [[20, 8], [30, 3], [23, 1]], "region": [1, 1]},
    }
    state = arrcoc.run_pipeline(spec, torch.rand(2, 3, 224, 224), query=["a red apple", "the blue mug"])
    assert [r.tokens_out for r in state.trace] == [(197, 197), (79, 79), (79, 79), (274, 274)]
    assert state.per_token["tier"][0].bincount().tolist() == [160, 90, 23]
    state.check()
