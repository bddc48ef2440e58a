"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): the Qwen2-VL adapter plus DeepStack.

Everything Qwen2-VL has carries over (:class:`~.qwen2_vl.Qwen2VLAdapter`,
subclassed): the ``PatchMerger``'s 2x2-merged tokens already in the LLM's
space, each image on its own ``(h / 2, w / 2)`` grid (ragged batches), no
class token, and multimodal rotary positions from the model's own
``get_rope_index`` on the unshortened prompt, gathered for the kept tokens
(Qwen3's rotary embedding interleaves the t / h / w frequencies, which the
model does from the same ``[3, B, L]`` ids; a compact renumbering stays
refused).  Every block of the tower attends over each whole image (no
windows), so the attention each token receives is read in the LAST block.

**DeepStack.**  Besides the merged tokens, the tower gives one plane per
``deepstack_visual_indexes`` entry (three in the released checkpoints):
the output of that block through its own merger, ``[n_i, D_llm]`` per
image, in the same token order.  The text model adds plane ``j`` to the
hidden states at the visual positions after decoder layer ``j``
(``_deepstack_process``, with ``visual_pos_masks``).  So:

* before the LLM, each plane is a per_token field of the state
  (``deepstack@j``, :data:`PLANE`): every stage moves it with its token
  (``ops.keep`` gathers it with the kept index, ``ops.merge`` averages it
  with the tokens' own weights), and :meth:`Qwen3VLAdapter.assemble` hands
  the LLM each image's kept planes with its kept tokens
  (``mm_encoder_outputs`` with ``deepstack_features``);
* inside the LLM, a stage acting at a layer ``<= j`` removes tokens before
  plane ``j`` is added: while a Run lasts, ``_deepstack_process`` gets the
  visual mask of the sequence the layers now see and the planes of the
  tokens in it, gathered by each entry's original column
  (:meth:`Qwen3VLAdapter.llm_hooks`).  A token kept keeps its own plane; a
  token that an ``llm:`` stage merged there (sparsevlm_llm's recycled
  clusters) takes the plane of the token whose slot it holds (the hidden
  states inside the LLM carry no plane of their own).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from arrcoc.errors import ModelError
from arrcoc.state import TokenState

from .adapter import VisionOutput, register_adapter
from .qwen2_vl import Qwen2VLAdapter

#: The per_token field of DeepStack plane ``j`` (added after decoder layer ``j``).
PLANE = "deepstack@{}"


def realign_planes(visual_pos_masks: torch.Tensor, planes: torch.Tensor, index: torch.Tensor, visual: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepStack's ``(visual_pos_masks, plane)`` for a changed sequence.

    ``visual_pos_masks`` ``[B, L]`` and ``planes`` ``[V, D]`` (one row per True entry of the mask, row-major) are
    the model's own, over the sequence the LLM got; ``index`` ``[B, S]`` is each entry's column in it, ``visual``
    ``[B, S]`` which entries are visual tokens.  Returns the mask ``[B, S]`` and the rows of ``planes`` in its
    row-major order: each visual entry's own plane row.
    """
    mask = visual_pos_masks.to(index.device)
    rank = (mask.reshape(-1).long().cumsum(0) - 1).view(mask.shape)  # each visual column's row in ``planes``
    new_mask = visual & mask.gather(1, index)
    return new_mask, planes[rank.gather(1, index)[new_mask].to(planes.device)]


class _Restore:
    """A handle whose ``remove()`` puts back (or deletes) an instance attribute."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name
        self.had, self.previous = name in vars(owner), vars(owner).get(name)

    def remove(self) -> None:
        if self.had:
            setattr(self.owner, self.name, self.previous)
        else:
            vars(self.owner).pop(self.name, None)


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        # What assemble made of the last state: (the features, per plane their rows), for feature_kwargs.
        self._assembled: tuple[list[torch.Tensor], list[list[torch.Tensor]]] | None = None

    @property
    def deepstack_planes(self) -> int:
        """DeepStack planes the tower gives (plane ``j`` is added after decoder layer ``j``)."""
        return len(getattr(self.visual, "deepstack_visual_indexes", None) or ())

    @property
    def attention_received_layer(self) -> int | None:
        """The last block: every block of the Qwen3-VL tower attends over each whole image."""
        return self.num_vision_layers - 1

    def encode_images(self, pixel_values: torch.Tensor, image_inputs: dict[str, Any], keep_hidden: bool,
                      received: bool = False) -> VisionOutput:
        """Qwen2-VL's, plus the DeepStack planes of each image (``per_token``: ``deepstack@j`` -> per image
        ``[n_i, D]``), read from the same tower forward."""
        seen: dict[str, Any] = {}

        def grab(module: torch.nn.Module, args: tuple, output: Any) -> None:
            seen["planes"] = list(getattr(output, "deepstack_features", None) or ())  # [V, D] each, images packed

        handle = self.visual.register_forward_hook(grab)
        try:
            out = super().encode_images(pixel_values, image_inputs, keep_hidden, received=received)
        finally:
            handle.remove()
        planes = seen.get("planes", [])
        if len(planes) != self.deepstack_planes:
            raise ModelError(f"{self.family}: the tower gave {len(planes)} DeepStack planes, its config lists "
                             f"{self.deepstack_planes} (another transformers layout)")
        counts = [f.shape[0] for f in out.features]
        if not self.deepstack_planes:
            return out
        return out._replace(per_token={PLANE.format(j): list(p.split(counts)) for j, p in enumerate(planes)})

    def assemble(self, state: TokenState, image_inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's tokens (one state row each), and, for :meth:`feature_kwargs`, each plane's rows of the
        same tokens (the per_token fields every stage moved with them)."""
        features = super().assemble(state, image_inputs)
        names = [PLANE.format(j) for j in range(self.deepstack_planes)]
        missing = [name for name in names if name not in state.per_token]
        if missing:
            raise ModelError(
                f"{self.family}: the state handed to the LLM has no per_token {missing}: a stage built a new state "
                "without the fields of the one it got, so the DeepStack planes of its tokens are unknown; use a "
                "stage that moves tokens through arrcoc.ops (keep / merge)")
        planes = [[state.per_token[name][i, : f.shape[0]] for i, f in enumerate(features)] for name in names]
        self._assembled = (features, planes)
        return features

    def feature_kwargs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """``mm_encoder_outputs`` with the tokens and, per plane, the same tokens' rows (from :meth:`assemble`)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        assembled, self._assembled = self._assembled, None
        if assembled is None or len(assembled[0]) != len(features) or any(
                a is not b for a, b in zip(assembled[0], features)):
            raise ModelError(f"{self.family}: image features reach the model without their DeepStack planes (only "
                             "rows made by this adapter's assemble carry them)")
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=list(features), deepstack_features=assembled[1])}}

    def llm_hooks(self, sequence: Callable[[], Any]) -> list[Any]:
        """While a Run lasts, the text model's ``_deepstack_process`` adds each plane to the sequence its layers
        now see: the visual entries of ``sequence()`` (a segment the engine changed), each with the plane row of
        its original column (:func:`realign_planes`); the model's own sequence goes through unchanged."""
        lm = self.language_model
        process = getattr(lm, "_deepstack_process", None)
        if process is None:
            if self.deepstack_planes:
                raise ModelError(f"{self.family}: {type(lm).__name__} has no _deepstack_process (another "
                                 "transformers layout), so llm: stages cannot keep the DeepStack planes aligned")
            return []

        def aligned(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
            seg = sequence()
            if seg is not None:
                visual_pos_masks, visual_embeds = realign_planes(visual_pos_masks, visual_embeds, seg.index,
                                                                 seg.visual)
            return process(hidden_states, visual_pos_masks, visual_embeds)

        handle = _Restore(lm, "_deepstack_process")
        lm._deepstack_process = aligned
        return [handle]
