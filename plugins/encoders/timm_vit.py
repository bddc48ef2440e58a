"""``timm_vit``: any timm Vision Transformer as the pipeline's encoder.

It runs the model's own modules in its own loop over ``blocks`` so that it can

* stop at a chosen block and hand on its hidden states (``layer: -2``, as
  LLaVA takes ``hidden_states[-2]``), optionally through the final norm
  (``layer: -1, norm: true`` equals timm's ``forward_features``);
* expose the head-mean CLS attention (``per_token["cls_attn"]``) and the
  head-mean keys (``per_token["keys"]``) of a layer, computed only when a
  later stage needs them (``cls_attention_heads: single``: one head over the
  full width and the concatenated keys instead, as PruMerge computes them);
* run a compressor inside every block, between attention and MLP, with
  proportional attention ``+ log(size)`` (ToMe's ``tome.patch.timm``).

Blocks that need none of this run as ``blk(x)``, untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from arrcoc.errors import ModelError, did_you_mean
from arrcoc.hookspecs import hookimpl
from arrcoc.plugin import Encoder, Params, PluginRef, nested_plugin
from arrcoc.state import TokenState

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TimmViTParams(Params):
    model: str = Field("vit_base_patch16_224", description="Any timm ViT name (timm.list_models('vit*')).")
    pretrained: bool = Field(False, description="Load timm's pretrained weights (needs the hub or a local cache).")
    checkpoint: str | None = Field(None, description="Local weights file (.pth / .safetensors) loaded into the model.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra timm.create_model kwargs, e.g. {depth: 2, img_size: 64}."
    )
    layer: int = Field(-2, description="Block whose output is handed on; -2 like LLaVA, -1 the last.")
    norm: bool = Field(False, description="Apply the model's final norm (true + layer -1 == forward_features).")
    attention_layer: int | None = Field(
        None,
        description="Block whose CLS attention (per_token 'cls_attn') and keys ('keys') are exposed; default "
        "`layer`. May be the block after `layer`: its attention over the handed-on tokens (PruMerge).",
    )
    extra_attention_layers: list[int] = Field(
        default_factory=list,
        description="More blocks whose CLS attention is exposed, as per_token 'cls_attn@<block index>'.",
    )
    cls_attention_heads: Literal["mean", "single"] = Field(
        "mean",
        description="How the exposed CLS attention and keys treat heads: 'mean' = head-mean of the per-head "
        "softmax(q k^T / sqrt(head_dim)) and head-mean keys; 'single' = one head over the full width, "
        "softmax(q k^T / sqrt(C)) from the concatenated q and k, and the concatenated keys (PruMerge's "
        "attention from the q_proj / k_proj outputs).",
    )
    in_blocks: nested_plugin("compressor") | None = Field(  # type: ignore[valid-type]
        None, description="Compressor run inside every block after attention, e.g. {use: tome, r: 8}."
    )
    proportional_attention: bool = Field(
        True, description="Add log(size) to attention logits once tokens were merged (ToMe Eq. 1)."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = Field(0, description="Seed for the random initialisation when no weights are loaded.")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import timm

        if not timm.is_model(name):
            hint = did_you_mean(name, timm.list_models("*vit*"))
            raise ValueError(f"unknown timm model {name!r}{hint}")
        return name

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"checkpoint file {path!r} does not exist")
        return path


class TimmViT(Encoder):
    """Any timm ViT: hidden states of a chosen layer, CLS attention, keys, in-block compression."""

    name = "timm_vit"
    Params = TimmViTParams

    def __init__(self, params: TimmViTParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        import timm

        p = self.params
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed)
                model = timm.create_model(p.model, pretrained=p.pretrained, **p.model_kwargs)
        except Exception as exc:  # network, unknown kwargs, hub errors
            raise ModelError(f"timm_vit: cannot create {p.model!r} ({type(exc).__name__}: {exc})") from None
        if p.checkpoint is not None:
            from timm.models import load_checkpoint

            try:
                load_checkpoint(model, str(Path(p.checkpoint).expanduser()), strict=True)
            except Exception as exc:
                raise ModelError(f"timm_vit: cannot load checkpoint {p.checkpoint!r} into {p.model!r}: {exc}") from None
        for attr in ("patch_embed", "blocks", "_pos_embed", "norm"):
            if not hasattr(model, attr):
                raise ModelError(f"timm_vit: {p.model!r} is not a ViT with `{attr}` (got {type(model).__name__})")
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        if self.prefix > 1:
            raise ModelError(
                f"timm_vit: {p.model!r} has {self.prefix} prefix tokens (registers / distillation); "
                "only models with one class token or none are supported"
            )
        self.model = model.eval().to(DTYPES[p.dtype])
        self.num_layers = len(model.blocks)
        self.last = self._layer_index(p.layer, "layer")
        self.attn_layer = self.last if p.attention_layer is None else self._layer_index(p.attention_layer, "attention_layer")
        self.extra_attn_layers = sorted({self._layer_index(i, "extra_attention_layers") for i in p.extra_attention_layers})
        for index in [self.attn_layer, *self.extra_attn_layers]:
            if index > self.last + 1:
                raise ModelError(
                    f"timm_vit: attention of block {index} is asked for, but the encoder stops after block "
                    f"{self.last} (layer={p.layer}); at most the next block ({self.last + 1}) can be read"
                )
        self.in_blocks = p.in_blocks.build("compressor") if isinstance(p.in_blocks, PluginRef) else None
        if self.in_blocks is not None:
            # Inside a block only the block's own keys exist (per_token "block_keys", read as "keys").
            missing = sorted(self.in_blocks.requirements() - {"keys"})
            if missing:
                raise ModelError(
                    f"timm_vit: in_blocks {self.in_blocks.name!r} needs {missing}, which is not available inside "
                    "the blocks (only each block's keys are); run it after the encoder, under `compress:`"
                )
            self._check_block_schedules(self.in_blocks)
        self.provides = frozenset(
            {"keys", "cls_attention", "cls", "attention_maps", "tower_features"} if self.prefix == 1
            else {"keys", "attention_maps", "tower_features"}
        )
        self.outputs: frozenset[str] = frozenset()
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)

    def _check_block_schedules(self, compressor: Any) -> None:
        """A per-block schedule (ToMe's ``r: [...]``) has at most one entry per block that runs."""
        runs = self.last + 1
        for field, schedule in compressor.block_schedules().items():
            if len(schedule) > runs:
                of = "" if runs == self.num_layers else (
                    f" of its {self.num_layers} (layer={self.params.layer} stops after block {self.last})"
                )
                raise ModelError(
                    f"timm_vit: in_blocks {compressor.name!r}: {field} has {len(schedule)} entries, one per block, "
                    f"but {self.params.model!r} runs {runs} blocks{of}; the entries past the first {runs} would "
                    "never apply"
                )

    def _layer_index(self, layer: int, field: str) -> int:
        if not -self.num_layers <= layer < self.num_layers:
            raise ModelError(
                f"timm_vit: {field}={layer} is out of range for {self.params.model!r} with "
                f"{self.num_layers} blocks (valid: {-self.num_layers}..{self.num_layers - 1})"
            )
        return layer % self.num_layers

    # ------------------------------------------------------------- properties
    def how_to_provide(self, need: str) -> str:
        if need == "cls_attention" and self.prefix == 0:
            return f"; {self.params.model!r} has no class token, so it has no CLS attention: choose a model with one"
        return ""

    def configure(self, outputs: frozenset[str]) -> None:
        if "attention_maps" in outputs and self.in_blocks is not None:
            raise ModelError(
                "timm_vit: attention_maps (every block's attention, e.g. for rollout) cannot be combined with "
                "in_blocks compression: the token sets of the blocks differ"
            )
        self.outputs = outputs & self.provides

    def to(self, device: torch.device | str) -> "TimmViT":
        self.model.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.model.patch_embed.img_size)  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.model.patch_embed.grid_size)  # type: ignore[return-value]

    def input_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + self.prefix

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        x = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        return x.to(DTYPES[self.params.dtype])

    # ---------------------------------------------------------------- forward
    def encode(self, pixels: torch.Tensor) -> TokenState:
        model, P = self.model, self.prefix
        x = model.patch_embed(pixels)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        state: TokenState | None = None  # the patches' bookkeeping once a block compresses
        per_token: dict[str, torch.Tensor] = {}
        want_maps = "attention_maps" in self.outputs
        maps: list[torch.Tensor] = []
        for i in range(self.last + 1):
            blk = model.blocks[i]
            attn_name = self._attention_name(i)
            want_keys = self.in_blocks is not None or (i == self.attn_layer and "keys" in self.outputs)
            if attn_name is None and not want_keys and not want_maps:
                x = blk(x)
                continue
            _check_block(blk, self.params.model)
            bias, h = self._key_bias(x, state), blk.norm1(x)  # h: the attention's input
            attn_out, keys, weights = _attention(blk.attn, h, bias, self._want_weights(attn_name) or want_maps)
            x = x + blk.drop_path1(blk.ls1(attn_out))
            if want_maps:
                maps.append(weights.mean(1))
            per_token.update(self._exposed(i, keys, weights, blk.attn, h, bias))
            if self.in_blocks is not None:
                if state is None:
                    state = TokenState.from_patches(x[:, P:], self.grid, cls_token=x[:, 0] if P else None)
                state = state.replace(tokens=x[:, P:], cls=x[:, 0] if P else None,
                                      per_token={**per_token, "block_keys": keys[:, P:]})
                state = self.in_blocks.in_block(state, i, self.num_layers)
                x = torch.cat([x[:, :P], state.tokens], 1)
                per_token = {k: state.per_token[k] for k in per_token}
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        nxt = self.last + 1
        if nxt < self.num_layers and (self._attention_name(nxt) or (nxt == self.attn_layer and "keys" in self.outputs)):
            # The next block's attention over the handed-on tokens (PruMerge reads layer 23 on hidden_states[-2]).
            blk = model.blocks[nxt]
            _check_block(blk, self.params.model)
            bias, h = self._key_bias(x, state), blk.norm1(x)
            _, keys, weights = _attention(blk.attn, h, bias, self._want_weights(self._attention_name(nxt)))
            per_token.update(self._exposed(nxt, keys, weights, blk.attn, h, bias))
        if self.params.norm:
            x = model.norm(x)
        cls_token = x[:, 0] if P else None
        meta = {"num_heads": int(model.blocks[0].attn.num_heads)} if hasattr(model.blocks[0], "attn") else {}
        if want_maps:
            # Head-mean attention [B, N, N] of every block run, prefix tokens first (rollout: Abnar & Zuidema 2020).
            meta.update(attention_maps=tuple(maps), num_prefix_tokens=P)
        if state is None:
            out = TokenState.from_patches(x[:, P:], self.grid, cls_token=cls_token, per_token=per_token)
        else:
            out = state.replace(tokens=x[:, P:], cls=cls_token, per_token=per_token)
        if "tower_features" in self.outputs:  # no projector here: the tower's features are the tokens
            out = out.replace(per_token={**out.per_token, "tower_features": out.tokens})
        return out.with_meta(**meta)

    def _attention_name(self, block: int) -> str | None:
        """per_token name of the CLS attention exposed at ``block``, if any."""
        if "cls_attention" not in self.outputs:
            return None
        if block == self.attn_layer:
            return "cls_attn"
        return f"cls_attn@{block}" if block in self.extra_attn_layers else None

    def _want_weights(self, attn_name: str | None) -> bool:
        """Whether the per-head attention weights are needed for the exposed CLS attention."""
        return attn_name is not None and self.params.cls_attention_heads == "mean"

    def _exposed(
        self, block: int, keys: torch.Tensor, weights: torch.Tensor | None,
        attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        out = {}
        name = self._attention_name(block)
        want_keys = block == self.attn_layer and "keys" in self.outputs
        if self.params.cls_attention_heads == "single" and (name is not None or want_keys):
            q_full, k_full = _full_width_qk(attn, x)
            if name is not None:
                # One head over the full width C (PruMerge: softmax(q k^T * C ** -0.5)), CLS row only.
                logits = (q_full[:, :1] * q_full.shape[-1] ** -0.5) @ k_full.transpose(-2, -1)
                if bias is not None:
                    logits = logits + bias[:, None, :]
                out[name] = logits.softmax(dim=-1)[:, 0, self.prefix:]
            if want_keys:
                out["keys"] = k_full[:, self.prefix:]
        else:
            if name is not None and weights is not None:
                out[name] = weights[:, :, 0, self.prefix:].mean(1)  # head-mean CLS row over the patches
            if want_keys:
                out["keys"] = keys[:, self.prefix:]
        if name == "cls_attn" and name in out and block in self.extra_attn_layers:
            out[f"cls_attn@{block}"] = out[name]  # also asked for by block index (e.g. layer 0 of a 2-block model)
        return out

    def _key_bias(self, x: torch.Tensor, state: TokenState | None) -> torch.Tensor | None:
        """Additive attention bias over keys: log(size) (proportional attention), -inf on padding."""
        if state is None:
            return None
        size = torch.cat([torch.ones(x.shape[0], self.prefix, device=x.device), state.size], 1)
        if self.params.proportional_attention:
            bias = size.log()  # padded slots have size 0 -> -inf: masked
        else:
            bias = torch.zeros_like(size).masked_fill(size == 0, float("-inf"))
        return bias.to(x.dtype)


def _check_block(blk: torch.nn.Module, model_name: str) -> None:
    from timm.layers import Attention

    needed = ("attn", "norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if not all(hasattr(blk, a) for a in needed) or not isinstance(blk.attn, Attention):
        raise ModelError(
            f"timm_vit: {model_name!r} uses {type(blk).__name__} blocks; in-block compression and "
            "attention outputs need timm's standard pre-norm Block with Attention"
        )


def _full_width_qk(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ``[B, N, C]`` with the heads concatenated (the q_proj / k_proj outputs of a CLIP layer)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return q.transpose(1, 2).reshape(B, N, -1), k.transpose(1, 2).reshape(B, N, -1)


def _attention(
    attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None, want_weights: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm ``Attention.forward`` with an additive key bias ``[B, N]``, also
    returning the head-mean keys ``[B, N, head_dim]`` (ToMe's metric) and,
    when asked, the softmaxed attention weights ``[B, heads, N, N]``."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if bias is None else bias[:, None, None, :]
    weights = None
    if want_weights:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        weights = logits.softmax(dim=-1)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(B, N, -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(1), weights


@hookimpl
def arrcoc_register_plugins(register):
    register(TimmViT)
