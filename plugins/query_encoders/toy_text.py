"""``toy_text``: an offline stand-in text encoder (no weights to download).

Each word becomes one query token: a fixed pseudo-random unit vector seeded
by a hash of the word (a hashing bag-of-words).  Equal words give equal
vectors and different words nearly orthogonal ones, which is enough to test
and demonstrate query-guided stages end to end — it knows nothing of
meaning, so it is not a substitute for a trained text encoder.

What it keeps: a word is a run of Unicode letters and digits, in any script
("café", "Straße", "日本語", "42"), after NFKC normalisation (full-width and
compatibility forms become their plain letters, "e" + combining accent
becomes "é") and case folding ("Straße" and "STRASSE" are one word).
Everything else separates words and is dropped: spaces, punctuation,
symbols, emoji, underscores.  A script written without spaces (Chinese,
Japanese) gives one word per run between punctuation.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache
from typing import Sequence

import torch
from pydantic import Field

from arrcoc.errors import InputError
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Params, QueryEncoder

STOPWORDS = frozenset(
    "a an and are as at be by do does for from how in is it its of on or that the this to was what "
    "where which who why with".split()
)


#: Runs of Unicode letters and digits (``\w`` without the underscore).
WORD = re.compile(r"[^\W_]+")


def words_of(text: str, drop_stopwords: bool = True) -> list[str]:
    """The words of ``text`` as toy_text encodes them (see the module docstring); stopwords dropped
    unless nothing else is left."""
    words = WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    kept = [w for w in words if not (drop_stopwords and w in STOPWORDS)]
    return kept or words


@lru_cache(maxsize=65536)
def word_vector(word: str, dim: int, seed: int) -> torch.Tensor:
    """Unit vector of ``word``: N(0, 1) entries from a generator seeded by blake2b(word, seed)."""
    digest = hashlib.blake2b(f"{seed}:{word}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    vector = torch.randn(dim, generator=generator)
    return vector / vector.norm()


def encode_words(texts: Sequence[str], dim: int, seed: int = 0, drop_stopwords: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, dim]`` word vectors (padded with zeros) and their mask ``[B, T]``."""
    tokenised = [words_of(t, drop_stopwords) for t in texts]
    for i, words in enumerate(tokenised):
        if not words:
            raise InputError(
                f"query[{i}]: {texts[i]!r} has no words to encode (toy_text keeps runs of letters and digits, "
                "in any script; punctuation, symbols and emoji are dropped)"
            )
    T = max(len(w) for w in tokenised)
    out = torch.zeros(len(texts), T, dim)
    mask = torch.zeros(len(texts), T, dtype=torch.bool)
    for b, words in enumerate(tokenised):
        out[b, : len(words)] = torch.stack([word_vector(w, dim, seed) for w in words])
        mask[b, : len(words)] = True
    return out, mask


class ToyTextParams(Params):
    dim: int | None = Field(None, ge=1, description="Embedding width; default: the visual tokens' width.")
    seed: int = Field(0, description="Seed of the word hashing.")
    drop_stopwords: bool = Field(True, description="Skip common function words ('what', 'is', 'the', ...).")


class ToyText(QueryEncoder):
    """Offline hashing bag-of-words query encoder (a documented stand-in, no weights).

    A word is a run of Unicode letters and digits, NFKC-normalised and case-folded; punctuation,
    symbols and emoji are dropped.
    """

    name = "toy_text"
    Params = ToyTextParams

    def encode(self, queries: Sequence[str], *, dim: int, device: torch.device, dtype: torch.dtype):
        emb, mask = encode_words(queries, self.params.dim or dim, self.params.seed, self.params.drop_stopwords)
        return emb.to(device=device, dtype=dtype), mask.to(device)


@hookimpl
def arrcoc_register_plugins(register):
    register(ToyText)
