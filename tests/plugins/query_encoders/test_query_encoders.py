"""Query encoders: ``toy_text`` (offline hashing bag-of-words) and ``tensor`` (precomputed embeddings)."""

from __future__ import annotations

import pytest
import torch

import arrcoc
from arrcoc.errors import InputError, MissingInputError, ParamsError

CPU = torch.device("cpu")


def toy(**params):
    return arrcoc.create("query_encoder", "toy_text", **params)


def encode(qe, queries, dim=64, dtype=torch.float32):
    return qe.encode(queries, dim=dim, device=CPU, dtype=dtype)


# ------------------------------------------------------------------ toy_text
def test_toy_text_is_deterministic_and_word_based():
    emb, mask = encode(toy(), ["red cat on a mat", "mat cat red"])
    again, _ = encode(toy(), ["red cat on a mat", "mat cat red"])
    assert torch.equal(emb, again)
    # "on" and "a" are stopwords: red, cat, mat / mat, cat, red
    assert mask.tolist() == [[True] * 3, [True] * 3]
    assert torch.equal(emb[0, 0], emb[1, 2]) and torch.equal(emb[0, 1], emb[1, 1]) and torch.equal(emb[0, 2], emb[1, 0])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3))  # unit vectors
    # case and punctuation do not matter
    shouted, _ = encode(toy(), ["RED, cat!"])
    assert torch.equal(shouted[0, :2], emb[0, :2])


def test_toy_text_different_words_are_nearly_orthogonal_and_seed_matters():
    emb, _ = encode(toy(), ["apple banana cherry"], dim=512)
    gram = emb[0] @ emb[0].T
    off = gram[~torch.eye(3, dtype=torch.bool)]
    assert bool((off.abs() < 0.25).all())
    other, _ = encode(toy(seed=1), ["apple banana cherry"], dim=512)
    assert not torch.allclose(emb, other)


def test_toy_text_stopwords():
    emb, mask = encode(toy(), ["what is the colour of the cat"])
    assert mask.sum().item() == 2  # colour, cat
    kept, _ = encode(toy(), ["colour cat"])
    assert torch.equal(emb, kept)
    _, mask = encode(toy(drop_stopwords=False), ["what is the colour of the cat"])
    assert mask.sum().item() == 7
    # a query made only of stopwords keeps them rather than encoding nothing
    _, mask = encode(toy(), ["what is this"])
    assert mask.sum().item() == 3


def test_toy_text_keeps_words_in_any_script():
    from arrcoc_plugins.query_encoders.toy_text import words_of

    assert words_of("Is the café open?") == ["café", "open"]
    assert words_of("Straße, STRASSE & strasse") == ["strasse"] * 3  # case folding
    assert words_of("cafe\u0301 ＣＡＦＥ ﬁsh") == ["café", "cafe", "fish"]  # NFKC: combining accent, full width, ligature
    assert words_of("где кошка? 猫はどこ。 x_y 42 🐱") == ["где", "кошка", "猫はどこ", "x", "y", "42"]
    emb, mask = encode(toy(), ["café", "caf", "CAFÉ"])
    assert mask.tolist() == [[True]] * 3
    assert not torch.equal(emb[0], emb[1]) and torch.equal(emb[0], emb[2])


def test_toy_text_ragged_batch_is_padded_with_zeros():
    emb, mask = encode(toy(), ["cat", "dog on sofa"])
    assert emb.shape == (2, 2, 64) and mask.tolist() == [[True, False], [True, True]]
    assert bool((emb[0, 1] == 0).all())


def test_toy_text_dim_dtype_and_errors():
    emb, _ = encode(toy(dim=16), ["cat"], dim=64, dtype=torch.bfloat16)
    assert emb.shape == (1, 1, 16) and emb.dtype == torch.bfloat16
    with pytest.raises(InputError, match=(
        r"^query\[1\]: '\?\?! 🐱 \.\.\.' has no words to encode \(toy_text keeps runs of letters and digits, in any "
        r"script; punctuation, symbols and emoji are dropped\)$"
    )):
        encode(toy(), ["cat", "??! 🐱 ..."])
    with pytest.raises(ParamsError, match=r"dim"):
        toy(dim=0)


def test_toy_text_dim_defaults_to_the_pipelines_token_width():
    spec = {
        "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224", "layer": -1,
                    "model_kwargs": {"depth": 1, "img_size": 32}},
        "query_encoder": {"use": "toy_text"},
    }
    image = torch.rand(2, 3, 32, 32)
    state = arrcoc.run_pipeline(spec, image, query="where is the red cup", device="cpu")
    assert state.query.shape == (2, 2, 192) and state.query_mask.all()  # red, cup; D = 192
    expected, _ = encode(toy(), ["red cup"], dim=192)
    assert torch.equal(state.query[1], expected[0])
    spec["query_encoder"] = {"use": "toy_text", "dim": 24}
    state = arrcoc.run_pipeline(spec, image, query=["cup", "red cup"], device="cpu")
    assert state.query.shape == (2, 2, 24) and state.query_mask.tolist() == [[True, False], [True, True]]
    with pytest.raises(InputError, match=r"query\[0\]: empty query string"):
        arrcoc.run_pipeline(spec, image, query="  ", device="cpu")
    del spec["query_encoder"]
    spec["score"] = [{"use": "query"}]  # a stage that uses the query, and nothing to encode it
    with pytest.raises(MissingInputError, match=r"query strings need a `query_encoder:` section"):
        arrcoc.run_pipeline(spec, image, query="cup", device="cpu")


# -------------------------------------------------------------------- tensor
@pytest.fixture
def table(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {"what is on the table": torch.randn(3, 8, generator=g), "cat": torch.randn(8, generator=g)}
    path = tmp_path / "queries.pt"
    torch.save(data, path)
    return path, data


def test_tensor_query_looks_up_the_file(table):
    path, data = table
    qe = arrcoc.create("query_encoder", "tensor", file=str(path))
    emb, mask = qe.encode(["cat", "what is on the table"], dim=999, device=CPU, dtype=torch.float16)
    assert emb.shape == (2, 3, 8) and emb.dtype == torch.float16
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(emb[0, 0], data["cat"].half()) and bool((emb[0, 1:] == 0).all())
    assert torch.equal(emb[1], data["what is on the table"].half())


def test_tensor_query_errors(table, tmp_path):
    path, _ = table
    qe = arrcoc.create("query_encoder", "tensor", file=str(path))
    with pytest.raises(InputError, match=r"query\[0\]: 'cats' is not in .*queries\.pt' \(did you mean 'cat'\?\); known: 'cat', 'what is on the table'"):
        qe.encode(["cats"], dim=8, device=CPU, dtype=torch.float32)
    with pytest.raises(ParamsError, match=r"embeddings file '.*missing\.pt' does not exist"):
        arrcoc.create("query_encoder", "tensor", file=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"cat": torch.ones(2, 2, 2)}, bad)
    with pytest.raises(InputError, match=r"must hold a dict \{str: float tensor \[T, D\] or \[D\]\}"):
        arrcoc.create("query_encoder", "tensor", file=str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    with pytest.raises(InputError, match=r"tensor: cannot read '.*junk\.pt' as a torch\.save'd dict \{str: tensor\}"):
        arrcoc.create("query_encoder", "tensor", file=str(junk))
    mixed = tmp_path / "mixed.pt"
    torch.save({"a": torch.ones(4), "b": torch.ones(1, 5)}, mixed)
    qe = arrcoc.create("query_encoder", "tensor", file=str(mixed))
    with pytest.raises(InputError, match=r"embeddings of these queries differ in width: \[4, 5\]"):
        qe.encode(["a", "b"], dim=4, device=CPU, dtype=torch.float32)


def test_tensor_query_in_a_pipeline(table):
    path, data = table
    spec = {
        "encoder": {"use": "timm_vit", "model": "vit_tiny_patch16_224", "layer": -1,
                    "model_kwargs": {"depth": 1, "img_size": 32}},
        "query_encoder": {"use": "tensor", "file": str(path)},
    }
    state = arrcoc.run_pipeline(spec, torch.rand(1, 3, 32, 32), query="cat", device="cpu")
    assert state.query.shape == (1, 1, 8)
    assert torch.equal(state.query[0, 0], data["cat"])
