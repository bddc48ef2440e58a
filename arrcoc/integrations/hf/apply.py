"""``arrcoc.hf.apply(model, pipeline)``: run a pipeline inside a Hugging Face VLM.

::

    with arrcoc.hf.apply(model, "fastv") as run:
        out = model.generate(**inputs, max_new_tokens=32)
    print(run.report)

Inside the context:

* **pre-LLM stages** (``compress``, ``score``, ``allocate``) run on the
  model's own image features (the ``hf_vision`` encoder around the live tower), per image in a ragged batch; the prompt handed to
  the LLM carries as many placeholders per image as tokens were kept
  (left-padded), and ``generate`` returns the caller's prompt followed by
  the new tokens, as without arrcoc.  Stages declared ``stage = "vision"``
  run before the projector, the others after it (``projector="auto"``);
  ``"before"`` / ``"after"`` project before / after every stage.
  Query-aware stages get the prompt's text after the image, embedded by the
  LLM's input embeddings, as the query (after the projector it lives in the
  same space as the visual tokens).
* **in-LLM stages** (``llm:``) run between decoder layers (:mod:`.engine`);
  the text model's attention becomes ``arrcoc_<sdpa|eager>``, which records
  only the rows a stage needs and calls the original kernel.

Leaving the context removes every hook, restores the attention
implementation and ``generate``: the model computes exactly as before.
One Run per model at a time (see :func:`apply`).
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from arrcoc.errors import ActiveRunError, InputError, ModelError
from arrcoc.models import check_model_dir
from arrcoc.pipeline import Pipeline
from arrcoc.registry import get_registry
from arrcoc.plugin import LLMCompressor
from arrcoc.spec import PipelineSpec, resolve_spec
from arrcoc.state import TokenState
from arrcoc.timing import clock

from . import compat
from .adapter import Adapter, adapter_for
from .attention import scoring_implementation
from .engine import LLMEngine
from .prompt import (image_slots, pack_end, padding_mask, placeholder_mask, shrink_embeds, shrink_prompts,
                     source_cells, source_columns)
from .report import Report, layer_flops

PROJECTOR_CHOICES = ("auto", "before", "after")
#: The encoder plugin that wraps a live model's tower (``plugins/encoders/hf_vision.py``).
VISION_ENCODER = "hf_vision"
#: Encoder settings of a pipeline file that carry over to the model's own tower.
_ENCODER_OPTIONS = ("attention_layer", "extra_attention_layers", "cls_attention_heads")
#: The Run active on each model (one at a time, see ``apply``); the lock makes claiming a model atomic.
_ACTIVE_RUNS: "weakref.WeakKeyDictionary[Any, Run]" = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()
#: The attribute a KV cache carries when it holds a prompt shortened before the LLM: ``(the caller's prompt, the
#: short prompt's sequence-aligned kwargs, the model's position state)``; copies of the cache carry it too.
SHORTENED = "_arrcoc_shortened"
#: A generate whose first forward (which names the generate's cache) has not run yet.
_UNSET = object()


class Run:
    """One pipeline applied to one model; ``report`` describes the last call."""

    def __init__(self, model: Any, spec: PipelineSpec, projector: str = "auto") -> None:
        if projector not in PROJECTOR_CHOICES:
            raise InputError(f"arrcoc.hf.apply: projector must be one of {PROJECTOR_CHOICES}, got {projector!r}")
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        self.spec = spec
        if spec.encoder.params.get("in_blocks"):
            raise ModelError(
                f"{spec.source}: encoder.in_blocks (compression inside the ViT blocks) cannot run inside a "
                f"{self.adapter.family} model's tower; move the compressor to `compress:`"
            )
        options = {k: v for k, v in spec.encoder.params.items() if k in _ENCODER_OPTIONS}
        # The integration's own encoder, found like any plugin (the core imports no plugin module).
        self.encoder = get_registry().get("encoder", VISION_ENCODER).for_model(model, project=False, **options)
        device = next(model.parameters()).device
        # Inside a model the query is the prompt's own text in the LLM's input embeddings, so the file's
        # query encoder (e.g. hf_text on the shipped toy model, for standalone runs) is never built.
        self.pipeline = Pipeline(spec.model_copy(update={"query_encoder": None}), device=device, encoder=self.encoder)
        self.vision_stages, self.projector_stages = split_stages(self.pipeline.stages, projector)
        llm = []
        for label, plugin in self.pipeline.llm:
            if not isinstance(plugin, LLMCompressor):
                raise ModelError(f"{label} ({plugin.name}): not an LLMCompressor; it cannot run between decoder layers")
            llm.append((label, plugin))
        self.engine = LLMEngine(self.adapter, llm)
        self.report = Report()
        self.state: TokenState | None = None  # the pre-LLM output of the last call
        self._undo: list[Any] = []  # the undo of each step _enter took, run in reverse by _exit
        self._active = False
        self._thread = ""  # the name of the thread that entered, for the message of a second apply
        # One call at a time: the report, the pre-LLM record and the engine's per-call state belong to the Run.
        # A generate and the forwards it makes hold it in their thread; another thread's call waits for it.
        self._call_lock = threading.RLock()
        self._call_depth = threading.local()
        self._attn: str | None = None
        self._generate: Any = None  # the model's own generate, captured by _enter
        self._pre: dict[str, Any] = {}
        # cache -> (the caller's prompt, the shortened prompt's sequence-aligned kwargs) for each generate whose
        # prompt was shortened: a conversation going on from that cache must go on from the short prompt.
        # Kept ON the cache (the attribute SHORTENED): a copy.deepcopy of the cache, transformers' way of reusing a
        # prompt's cache, holds the short prompt too; a cache that takes no attribute is looked up here instead.
        self._shortened: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
        self._in_generate = False
        self._in_forward = False
        self._generate_cache: Any = _UNSET  # the cache the generate in progress decodes in (its own forwards carry it)
        # Model calls made in the middle of another in the same thread (a logits processor's forward or generate
        # inside generate): (the thread's call depth for it, the outer call's state), innermost last; see _nest.
        self._nested: list[tuple[int, str, Any]] = []
        # transformers 5's generate encodes the images (base_model.get_image_features) before the prefill
        # forward, outside the hooks that time it: timed here, or prefill_ms would leave out the vision tower.
        self._base = getattr(model, "base_model", model)
        self._image_features: Any = None
        self._outside_vision_ms = 0.0

    # ----------------------------------------------------------- lifecycle
    def _enter(self) -> "Run":
        model = self.model
        with _ACTIVE_LOCK:
            active = _ACTIVE_RUNS.get(model)
            if active is not None:
                # Stacked Runs would each capture and restore the other's patches: whichever left last would put
                # back a stale generate / attention implementation.  So the model is claimed before anything is read.
                raise ActiveRunError(
                    f"arrcoc.hf.apply: this {type(model).__name__} already runs pipeline {active.spec.name!r} "
                    f"(entered in thread {active._thread!r}); one pipeline per model at a time: leave that `with` "
                    "block first (nested apply on one model is not supported), or, to run both at once, apply the "
                    "second pipeline to a copy of the model made outside every apply block (twin = "
                    "copy.deepcopy(model) before entering: inside a block the model carries the Run's hooks and "
                    "cannot be copied)"
                )
            _ACTIVE_RUNS[model] = self
            self._thread = threading.current_thread().name
        self._undo.append(self._release_model)
        try:
            self._install()
        except BaseException:
            self._exit()  # undo the steps taken before the failure, and release the model
            raise
        self._active = True
        return self

    def _install(self) -> None:
        """Patch the model; each step records its undo as it is taken, so a failure half-way is undone exactly."""
        model = self.model
        if _fullgraph(vars(model).get("_compiled_call_impl")):
            # model.compile(fullgraph=True) compiles the call, hooks included: a forward would fail inside dynamo
            # before any hook could refuse it, so it is refused here.
            _refuse_fullgraph_forward(model)
        if self.engine.recorder.requests:
            cfg = self.adapter.text_config
            self._attn = cfg._attn_implementation
            scoring = scoring_implementation(self._attn)
            self._undo.append(lambda: model.set_attn_implementation({"text_config": self._attn}))
            model.set_attn_implementation({"text_config": scoring})
        self._undo.append(model.register_forward_pre_hook(self._pre_llm_hook, with_kwargs=True, prepend=True).remove)
        self._undo.append(self.engine.remove)
        self.engine.install()
        self._undo.append(model.register_forward_hook(self._post_hook, with_kwargs=True).remove)
        # The model's last hook, called when a forward raises too: it releases the call lock the pre-hook took.
        self._undo.append(model.register_forward_hook(self._forward_done, always_call=True).remove)
        self._generate = self._patch(model, "generate", self._wrapped_generate)
        compiled_call = getattr(model, "get_compiled_call", None)
        if compiled_call is not None:  # generate's auto-compile of the decoding steps, fullgraph refused
            def get_compiled_call(compile_config: Any = None, *args: Any, **kwargs: Any) -> Any:
                _refuse_fullgraph_compile_config(model, compile_config)
                return compiled_call(compile_config, *args, **kwargs)
            self._patch(model, "get_compiled_call", functools.wraps(compiled_call)(get_compiled_call))
        image_features = getattr(self._base, "get_image_features", None)
        if image_features is not None:
            self._image_features = image_features
            # Same signature as the original: generate picks the image kwargs it passes by inspecting it.
            timed = self._timed_image_features
            self._patch(self._base, "get_image_features",
                        functools.wraps(image_features)(lambda *args, **kwargs: timed(*args, **kwargs)))

    def _patch(self, owner: Any, name: str, value: Any) -> Any:
        """``owner.name = value`` until _exit (which restores the instance attribute, or its absence);
        returns what ``owner.name`` was."""
        own = vars(owner)
        had, previous, original = name in own, own.get(name), getattr(owner, name)

        def restore() -> None:
            if had:
                setattr(owner, name, previous)
            else:
                own.pop(name, None)

        self._undo.append(restore)
        setattr(owner, name, value)
        return original

    def _exit(self) -> None:
        """Undo every step of _enter in reverse, each one even if another fails (the first error is raised)."""
        error: BaseException | None = None
        with self._call_lock:  # a call in flight in another thread ends on the model it started on
            self._active = False
            while self._undo:
                try:
                    self._undo.pop()()
                except BaseException as exc:
                    error = error or exc
        if error is not None:
            raise error

    def _release_model(self) -> None:
        with _ACTIVE_LOCK:
            if _ACTIVE_RUNS.get(self.model) is self:
                del _ACTIVE_RUNS[self.model]

    def _begin_call(self) -> int:
        """Take the Run for this thread; returns how many holds the thread had before (for ``_end_call``)."""
        depth = getattr(self._call_depth, "n", 0)
        self._call_lock.acquire()
        self._call_depth.n = depth + 1
        return depth

    def _end_call(self, depth: int | None = None) -> None:
        """Give back one hold, or (``depth``) every hold this thread took beyond ``depth``: a forward interrupted by
        a BaseException (Ctrl-C) never reaches _forward_done, torch runs always_call hooks on Exception only."""
        n = getattr(self._call_depth, "n", 0)  # only what this thread took (a hook before ours may have raised)
        for _ in range(n - max(n - 1 if depth is None else depth, 0)):
            self._call_depth.n -= 1
            self._call_lock.release()

    def _forward_done(self, module: Any, args: tuple, output: Any) -> None:
        if self._nested and self._nested[-1][:2] == (getattr(self._call_depth, "n", 0), "forward"):
            self._unnest(len(self._nested) - 1)  # a nested forward ends: the outer call's state comes back
        else:
            self._in_forward = False
        self._end_call()

    # ------------------------------------------------------- nested calls
    #: The Run's part of one call's state (the engine keeps its own part, see LLMEngine.begin_nested_call).
    _CALL_STATE = ("report", "state", "_pre", "_in_generate", "_in_forward", "_outside_vision_ms", "_generate_cache")

    def _is_nested_forward(self, cache: Any) -> bool:
        """Whether a forward starting now is made in the middle of another call of this thread rather than being
        that call's own: made inside a forward (from a hook), or inside a generate with another cache than the
        generate's (a logits processor's forward: classifier-free guidance's unconditional one has its own cache,
        a plain ``model(**inputs)`` none).  A generate's first forward is its own and names its cache."""
        if self._in_forward:
            return True
        if not self._in_generate:
            return False
        if self._generate_cache is _UNSET:
            self._generate_cache = cache
            return False
        return cache is not self._generate_cache

    def _nest(self, kind: str) -> None:
        """Set the call in progress aside for a call made in the middle of it: the nested call runs as it would on
        its own in the block (its own pruning, prefill bookkeeping, report), the outer one keeps its own state."""
        saved = ({name: getattr(self, name) for name in self._CALL_STATE}, self.engine.begin_nested_call())
        self._nested.append((self._call_depth.n, kind, saved))
        self.state, self._pre, self._outside_vision_ms = None, {}, 0.0
        self._in_generate = self._in_forward = False
        self._generate_cache = _UNSET

    def _unnest(self, size: int) -> None:
        """Give back the state of each call set aside beyond the first ``size`` (innermost first): the report
        describes the outermost call."""
        while len(self._nested) > size:
            run, engine = self._nested.pop()[2]
            self.engine.end_nested_call(engine)
            for name, value in run.items():
                setattr(self, name, value)

    def _timed_image_features(self, *args: Any, **kwargs: Any) -> Any:
        start = clock(kwargs.get("pixel_values", args[0] if args else None))
        out = self._image_features(*args, **kwargs)
        if not self._in_forward:  # inside a forward, the forward's own time includes it
            self._outside_vision_ms += (clock(kwargs.get("pixel_values", args[0] if args else None)) - start) * 1e3
        return out

    # ------------------------------------------------------------ pre-LLM
    @property
    def has_pre_llm(self) -> bool:
        return bool(self.vision_stages or self.projector_stages)

    def _pre_llm_hook(self, module: Any, args: tuple, kwargs: dict):
        _refuse_fullgraph_forward(module)  # before the call lock: nothing to release
        depth = self._begin_call()  # released by _forward_done, also when the forward raises
        if not self._active:
            # The block was left while this call waited for the Run (torch read the hooks before _exit removed
            # them, so _forward_done will not run): the model computes on its own.
            self._end_call()
            return None
        if depth and not self._in_generate and not self._nested:
            # What an earlier forward of this thread kept when Ctrl-C stopped it (a forward made from inside a
            # forward outside generate, from a hook, cannot be told from it: it runs as a call of its own).
            self._end_call(1)
            self._in_forward = False
        if args:  # every input by name: positional pixel_values must not slip past the stages
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
            args = ()
        if self._is_nested_forward(compat.cache_of(kwargs)):
            self._nest("forward")  # given back by _forward_done, also when the forward raises
        self._in_forward = True
        if not self._in_generate:
            self._outside_vision_ms = 0.0
        pixels = kwargs.get("pixel_values")
        if not self.has_pre_llm or pixels is None:
            if not self._in_generate:  # a direct forward: the last pre-LLM record is not this call's
                self._pre = {}
                if self.has_pre_llm and kwargs.get("mm_encoder_outputs"):
                    # The model's own generate encodes the images before this forward: the stages were skipped.
                    raise InputError(
                        f"arrcoc.hf: a forward got image features computed outside pipeline {self.spec.name!r} "
                        "(mm_encoder_outputs, no pixel_values), so its pre-LLM stages cannot run: this is what a "
                        "generate bound before arrcoc.hf.apply was entered does (gen = model.generate, "
                        "functools.partial(model.generate, ...)); call model.generate inside the block, or give the "
                        "forward pixel_values"
                    )
            self._check_placeholders(kwargs.get("input_ids"), kwargs)
            return args, kwargs
        return args, self._compress(kwargs)

    def _image_inputs(self, kwargs: dict) -> dict:
        return {name: kwargs[name] for name in self.adapter.image_input_names if kwargs.get(name) is not None}

    def _encoding_overrides(self, kwargs: dict) -> dict:
        """The call's arguments that make the model encode its images otherwise than its config says (LLaVA's
        ``vision_feature_layer`` / ``vision_feature_select_strategy``)."""
        config = self.model.config
        return {name: kwargs[name] for name in self.adapter.config_only_inputs
                if kwargs.get(name) is not None and _as_list(kwargs[name]) != _as_list(getattr(config, name, None))}

    def _check_placeholders(self, ids: torch.Tensor | None, kwargs: dict) -> None:
        """Images and placeholders must match (the model itself would fail with a less helpful message).  A call
        encoding otherwise than the config is left to the model's own check: the counts here follow the config
        (a per-call select strategy 'full' gives each image one placeholder more)."""
        pixels = kwargs.get("pixel_values")
        if pixels is not None and ids is not None and not self._encoding_overrides(kwargs):
            counts = self.adapter.tokens_per_image(pixels, self._image_inputs(kwargs))
            image_slots(ids, self.adapter.image_token_id, counts)

    def _compress(self, kwargs: dict) -> dict:
        """Encode, run the pre-LLM stages, shrink the prompts; kwargs for the model's own forward."""
        original = dict(kwargs)
        kwargs = dict(kwargs)
        pixels = kwargs.pop("pixel_values")
        for name, given in self._encoding_overrides(kwargs).items():
            # The model would encode the images with the call's value; the stages run on the config's.
            configured = getattr(self.model.config, name, None)
            raise InputError(
                f"arrcoc.hf: this call gives {name}={given!r}, the model's config {configured!r}; pre-LLM stages "
                f"encode the images as the config says: set model.config.{name} = {given!r} before "
                "arrcoc.hf.apply instead of passing it to the call"
            )
        image_inputs = self._image_inputs(kwargs)
        for name in image_inputs:
            kwargs.pop(name)
        ids = kwargs.get("input_ids")
        # A forward may get the dict of 4-D masks generate prepares for a static cache or a compiled forward;
        # the shortened prompt gets a 2-D mask the model expands itself.
        cache = compat.cache_of(kwargs)
        attention_mask = padding_mask(kwargs.get("attention_mask"), 0 if cache is None else cache.get_seq_length())
        original["attention_mask"] = attention_mask
        # generate may get both: the embeddings are the prefill's prompt, the ids what it returns before the new tokens.
        embeds = kwargs.get("inputs_embeds")
        # A prompt given as embeddings: its image slots are where the image token's embedding is (as transformers).
        is_image = placeholder_mask(ids if embeds is None else None, embeds, self.adapter.image_token_id,
                                    self.adapter.embed)
        per_image = self.adapter.tokens_per_image(pixels, image_inputs)
        _, image_of, _ = image_slots(ids, self.adapter.image_token_id, per_image, placeholders=is_image)
        start = clock(pixels)
        with torch.inference_mode(torch.is_inference_mode_enabled()):
            state = self.encoder.encode_inputs(pixels, image_inputs)
            vision_ms = (clock(pixels) - start) * 1e3
            layout = self.adapter.view_layout(image_inputs)
            if layout is not None:
                state = state.with_meta(views=layout)
            if any("query" in p.requirements() for _, p in [*self.vision_stages, *self.projector_stages]):
                state = self._attach_prompt_query(state, ids, embeds, is_image, attention_mask, image_of, layout)
            state = self.pipeline.run_stages(state, self.vision_stages)
            state = self.encoder.project(state)
            state = self.pipeline.run_stages(state, self.projector_stages)
        features = self.adapter.assemble(state, image_inputs)
        counts = torch.tensor([f.shape[0] for f in features], device=is_image.device)
        if embeds is None:
            new_ids, new_mask, index, valid = shrink_prompts(ids, attention_mask, self.adapter.image_token_id,
                                                             self.adapter.pad_token_id, per_image, counts)
            kwargs.update(input_ids=new_ids)
        else:
            pad = self.adapter.embed(torch.tensor(self.adapter.pad_token_id, device=embeds.device))
            image = self.adapter.embed(torch.tensor(self.adapter.image_token_id, device=embeds.device))
            new_embeds, new_mask, index, valid = shrink_embeds(embeds, is_image, attention_mask, pad, per_image,
                                                               counts, image)
            kwargs.update(inputs_embeds=new_embeds)
            if ids is not None:  # the same columns, or generate's output would not line up with its prompt
                kwargs.update(input_ids=ids.gather(1, index).masked_fill(~valid, self.adapter.pad_token_id))
        kwargs.update(attention_mask=new_mask, **self.adapter.feature_kwargs(features))
        given = kwargs.get("position_ids")
        if given is not None:
            # The caller's numbering of the long prompt does not fit the short one: its real tokens are numbered
            # as generate does; the caller's masked columns keep the caller's numbers (generate numbers the next
            # token after the last column, padding on the right included), the padding added in front 0.
            numbered = new_mask.cumsum(1) - 1
            if given.ndim == 2 and given.shape == is_image.shape:
                padding = given.to(numbered.device).gather(1, index).masked_fill(~valid, 0)
            else:
                padding = torch.zeros_like(numbered)
            kwargs["position_ids"] = torch.where(new_mask.bool(), numbered, padding)
        if self.adapter.multimodal_rope and ids is None:
            # A prompt given as embeddings alone: the model numbers it as text (generate's own rule without ids),
            # the short one too; only each column's modality goes with it.
            mm = original.get("mm_token_type_ids")
            if mm is not None and mm.shape == is_image.shape:
                kwargs["mm_token_type_ids"] = mm.gather(1, index).masked_fill(~valid, 0)
        else:
            if self.adapter.multimodal_rope:
                # Each kept token takes the position of its own original cell, not of the j-th placeholder.
                grids = state.meta.get("grids") or [state.grid] * state.B
                cells = source_cells(state.positions, state.mask, grids)
                index = source_columns(ids, self.adapter.image_token_id, per_image, index, valid, cells)
            kwargs.update(self.adapter.shortened_kwargs({**original, **image_inputs}, index, valid))
        self.state = state
        self.engine.visual_state = state if state.B == is_image.shape[0] else None
        self._pre = {"vision_ms": vision_ms, "records": list(state.trace)}
        return kwargs

    def _attach_prompt_query(self, state: TokenState, ids: torch.Tensor | None, embeds: torch.Tensor | None,
                             is_image: torch.Tensor, attention_mask: torch.Tensor | None, image_of: torch.Tensor,
                             layout: list[tuple[int, int]] | None) -> TokenState:
        """Each image's query: the LLM input embeddings of its prompt's text after the last image token
        (``embeds``: the prompt given as embeddings, else ``ids``)."""
        B, L = is_image.shape
        device = is_image.device
        real = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(L, device=device).expand(B, L)
        last = torch.where(is_image, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
        text = real & ~is_image & (pos > last)
        index, valid = pack_end(text)
        if embeds is None:
            emb = self.adapter.embed(ids.gather(1, index))
        else:
            emb = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        emb = emb * valid[..., None]
        images = state.B if layout is None else len(layout)
        row_of_image = torch.zeros(images, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)[:, None].expand(B, L)
        row_of_image[image_of[is_image]] = rows[is_image]
        if layout is not None:  # every view of an image asks its image's question
            views = torch.tensor([1 + r * c for r, c in layout], device=device)
            row_of_image = row_of_image.repeat_interleave(views)
        if bool((~valid.any(1))[row_of_image].any()):
            raise InputError("arrcoc.hf: a query-aware stage needs text after the image in every prompt")
        return state.replace(query=emb[row_of_image].to(state.dtype), query_mask=valid[row_of_image])

    # ---------------------------------------------------------- generate
    def _wrapped_generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` inside the block, one call at a time per Run."""
        if not self._active:
            raise ModelError(
                f"arrcoc.hf: the Run of pipeline {self.spec.name!r} has ended (its `with` block was left), but its "
                "generate was kept and called: call model.generate, or enter arrcoc.hf.apply again"
            )
        depth = self._begin_call()
        if not self._active:
            # The block was left while this call waited for the Run: the model generates as it is now (its own
            # generate; the Run's hooks are gone), not with the pre-LLM stages and without the in-LLM ones.
            self._end_call(depth)
            return self.model.generate(*args, **kwargs)
        nested = len(self._nested)
        if depth and (self._in_generate or self._in_forward):  # called in the middle of another call of this thread
            self._nest("generate")
        try:
            return self._run_generate(*args, **kwargs)
        finally:
            self._unnest(nested)  # also what a nested forward stopped by Ctrl-C set aside
            self._end_call(depth)  # with what a forward stopped by Ctrl-C kept (it never reached _forward_done)

    def _run_generate(self, *args: Any, **kwargs: Any) -> Any:
        _refuse_fullgraph_forward(self.model)  # before the pre-LLM stages run
        kwargs = self._by_name(args, kwargs)
        original = kwargs.get("input_ids")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # as generate reads it: the call's generation config, or the model's
            use_cache = getattr(kwargs.get("generation_config") or self.model.generation_config, "use_cache", True)
        if self.engine.active and use_cache is False:
            raise InputError(
                "arrcoc.hf: generate(use_cache=False) recomputes the whole sequence at every step, so llm: stages "
                "would prune again at every step; llm: stages prune once, in prefill, and need the KV cache"
            )
        long_prompt = _prompt_length(kwargs)
        given = kwargs.get("past_key_values", kwargs.get("cache"))
        # A new prompt fills the cache (none, or emptied); what is no Cache is left to generate to refuse.
        fresh = not callable(getattr(given, "get_seq_length", None)) or not given.get_seq_length()
        if self.has_pre_llm and kwargs.get("pixel_values") is not None:
            if kwargs.get("attention_mask") is None and original is not None and kwargs.get("inputs_embeds") is None:
                # The prompt gets an explicit mask below: the one generate would infer from this prompt's pad ids
                # (given embeddings too, generate infers none from the ids: every column is real).
                kwargs["attention_mask"] = self._generate_mask(original, kwargs)
            kwargs = self._compress(kwargs)
        else:
            self._pre = {}
            self._check_placeholders(original, kwargs)
            kwargs = self._resume_shortened(kwargs)
        kwargs = self._keep_lengths(kwargs, long_prompt - _prompt_length(kwargs))
        if kwargs.get("streamer") is not None and original is not None and kwargs.get("input_ids") is not original:
            kwargs["streamer"] = _PromptStreamer(kwargs["streamer"], original)
        self._outside_vision_ms = 0.0
        self._in_forward = False  # a forward that raised earlier never reached its post hook
        self._in_generate = True
        self._generate_cache = _UNSET
        try:
            out = self._generate(**kwargs)
        finally:
            self._in_generate = False
        self._finish(new_tokens=True)
        cache = kwargs.get("past_key_values", kwargs.get("cache", getattr(out, "past_key_values", None)))
        if self.has_pre_llm and original is not None and cache is not None and "input_ids" in kwargs:
            aligned = ("input_ids", "attention_mask", "mm_token_type_ids")
            short = {k: kwargs[k] for k in aligned if kwargs.get(k) is not None}
            compat.mark(cache, SHORTENED, (original, short, self.adapter.position_state), self._shortened)
        elif fresh and cache is not None:  # a cache refilled with a prompt nothing shortened (reused, reset)
            compat.mark(cache, SHORTENED, None, self._shortened)
        if original is None or "input_ids" not in kwargs or kwargs["input_ids"] is original:
            return out
        # The caller's prompt, then the new tokens: exactly the layout of generate without arrcoc.
        cut = kwargs["input_ids"].shape[1]
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        # num_return_sequences / beams return several rows per prompt, in prompt order.
        prompts = original.repeat_interleave(sequences.shape[0] // original.shape[0], 0)
        if isinstance(out, torch.Tensor):
            return torch.cat([prompts, out[:, cut:]], 1)
        out.sequences = torch.cat([prompts, out.sequences[:, cut:]], 1)
        return out

    def _keep_lengths(self, kwargs: dict, dropped: int) -> dict:
        """``max_length`` / ``min_length`` count the caller's prompt: a prompt ``dropped`` columns shorter gets
        limits as many columns smaller, so that generate makes as many new tokens as it would without arrcoc
        (``max_new_tokens`` / ``min_new_tokens``, when set, take precedence in generate, as here)."""
        if dropped <= 0:
            return kwargs
        configs = [c for c in (kwargs.get("generation_config"), self.model.generation_config) if c is not None]

        def setting(name: str) -> Any:
            if kwargs.get(name) is not None:
                return kwargs[name]
            return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

        kwargs = dict(kwargs)
        max_length = setting("max_length")
        if setting("max_new_tokens") is None and max_length is not None:
            kwargs["max_length"] = max_length - dropped
        min_length = setting("min_length")
        if setting("min_new_tokens") is None and min_length:
            kwargs["min_length"] = max(min_length - dropped, 0)
        return kwargs

    def _by_name(self, args: tuple, kwargs: dict) -> dict:
        """``generate``'s arguments by name, as the model's own generate reads them: positional ones
        (``inputs``, ``generation_config``, ``logits_processor``, ...) are kept, and the prompt given as
        ``inputs`` (positionally or by name) is the ``input_ids`` the pre-LLM stages read and shorten."""
        if args:  # (too many of them: the TypeError generate itself raises)
            signature = inspect.signature(self._generate)
            if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
                if len(args) > 1:  # a wrapped generate that names nothing: only the prompt can be placed
                    raise InputError("arrcoc.hf: this model's generate takes *args; pass its arguments after the "
                                     "prompt by name")
                return dict(kwargs, input_ids=args[0])
            bound = signature.bind_partial(*args, **kwargs).arguments
            extra = next((bound.pop(p.name, {}) for p in signature.parameters.values()
                          if p.kind is inspect.Parameter.VAR_KEYWORD), {})
            kwargs = {**bound, **extra}
        name = getattr(self.model, "main_input_name", "input_ids")
        if kwargs.get("inputs") is not None and name == "input_ids" and kwargs.get("input_ids") is None:
            kwargs = dict(kwargs)
            kwargs["input_ids"] = kwargs.pop("inputs")
        return kwargs

    def _resume_shortened(self, kwargs: dict) -> dict:
        """A conversation going on from the cache of a prompt shortened before the LLM: the cache holds the short
        prompt, the caller's ids the long one it was given (``generate`` returned it), so ``generate`` gets the
        short prompt followed by what came after the long one (its positions go on from the cached ones)."""
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        ids = kwargs.get("input_ids")
        record = None if cache is None else compat.marked(cache, SHORTENED, self._shortened)
        if record is not None and not cache.get_seq_length():  # emptied (reset): a new conversation starts
            record = None
        if record is None or ids is None:
            return kwargs
        prompt, short, positions = record
        rows = ids.shape[0] // prompt.shape[0] if ids.shape[0] % prompt.shape[0] == 0 else 0
        L = prompt.shape[1]
        if not rows or ids.shape[1] < L or not torch.equal(ids[:, :L], prompt.repeat_interleave(rows, 0)):
            raise InputError(
                f"arrcoc.hf: past_key_values holds {prompt.shape[0]} prompt(s) of {L} tokens that pipeline "
                f"{self.spec.name!r} shortened before the LLM; continue them with the sequences generate returned "
                f"(those prompts, then the new tokens), got input_ids of shape {tuple(ids.shape)} that do not start "
                "with them"
            )
        # The numbering of THIS conversation's short prompt (Qwen's rope_deltas count its dropped tokens): another
        # generate since (other prompts, other sizes) left its own behind.
        self.adapter.position_state = positions
        kwargs = dict(kwargs)
        for name, head in short.items():
            tail = kwargs.get(name)
            if tail is None or tail.shape[-1] != ids.shape[1]:  # not given: the new columns are real text
                tail = torch.full_like(ids, 1 if name == "attention_mask" else 0, dtype=head.dtype)
            kwargs[name] = torch.cat([head.repeat_interleave(rows, 0), tail[:, L:].to(head.dtype)], 1)
        return kwargs

    def _generate_mask(self, ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The attention mask ``generate`` infers for ``ids`` when none is given: 0 on pad ids, unless the pad id
        is unset or is an end-of-sequence id (then every column is real)."""
        config = kwargs.get("generation_config") or self.model.generation_config
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = set() if eos is None else set(torch.as_tensor(eos).flatten().tolist())
        if pad is None or int(pad) in eos:
            return torch.ones_like(ids)
        return (ids != int(pad)).long()

    def _post_hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self._in_forward = False
        self._finish(new_tokens=False)

    def _finish(self, new_tokens: bool) -> None:
        t = self.engine.trace
        cfg = self.adapter.text_config
        pre = self._pre
        records = pre.get("records", [])  # the pre-LLM stages' trace (the encoder adds none here)
        stages_ms = sum(r.ms for r in records)
        vision_ms = pre.get("vision_ms", 0.0) + self._outside_vision_ms
        self.report = Report(
            batch=len(t.layers[0].tokens) if t.layers else 0,
            pre_llm=list(records),
            layer_tokens=[r.tokens for r in t.layers],
            layer_visual=[r.visual for r in t.layers],
            layer_flops=[sum(layer_flops(cfg, n) for n in r.tokens) for r in t.layers],
            kv_cache_bytes=t.kv_bytes,
            vision_ms=vision_ms,
            stages_ms=stages_ms,
            llm_prefill_ms=t.llm_prefill_ms,
            prefill_ms=t.prefill_ms + vision_ms + stages_ms,
            decode_ms=t.decode_ms,
            new_tokens=t.decode_steps + 1 if new_tokens else 0,
            llm_stage_ms=dict(t.stage_ms),
        )

    @property
    def llm_states(self) -> dict[str, TokenState]:
        """The visual tokens after each in-LLM stage of the last prefill, by ``"llm[i]@layer"``."""
        return dict(self.engine.trace.states)


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


_FULLGRAPH_HELP = ("arrcoc's hooks run Python between the model's layers (pipeline stages, prompt rebuilding, "
                   "timing) that cannot be traced into one graph.  Compile without fullgraph (the hooks become graph "
                   "breaks; outputs equal the uncompiled model's), or use a fullgraph-compiled model only outside "
                   "arrcoc.hf.apply")


def _fullgraph(compiled: Any) -> bool:
    """Whether ``compiled`` is a ``torch.compile(..., fullgraph=True)`` function (False for anything else)."""
    if getattr(compiled, "_torchdynamo_orig_callable", None) is None:
        return False
    # torch.compile's wrapper keeps its OptimizeContext (with the fullgraph flag) in its closure.
    try:
        context = inspect.getclosurevars(compiled).nonlocals.get("self")
    except (TypeError, ValueError):  # another wrapper: dynamo's own error, if any, will say what failed
        return False
    return getattr(context, "fullgraph", False) is True


class _PromptStreamer:
    """A ``generate`` streamer handed the caller's prompt where ``generate`` puts the one arrcoc shortened
    (its first ``put``): what it streams is what ``generate`` returns.  Everything else goes to ``streamer``."""

    def __init__(self, streamer: Any, prompt: torch.Tensor) -> None:
        self._streamer, self._prompt = streamer, prompt

    def put(self, value: torch.Tensor) -> None:
        if self._prompt is not None:
            value, self._prompt = self._prompt.to(value.device), None
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._streamer, name)


def _prompt_length(kwargs: dict) -> int:
    """Columns of the prompt a generate call got (its ids, else its embeddings; 0 for neither)."""
    prompt = kwargs.get("input_ids")
    prompt = kwargs.get("inputs_embeds") if prompt is None else prompt
    return 0 if prompt is None else int(prompt.shape[1])


def _refuse_fullgraph_forward(model: Any) -> None:
    """A forward compiled with ``fullgraph=True`` is refused before it runs: dynamo would trace arrcoc's hooks
    inside it (timing, ragged bookkeeping, pipeline stages) and fail there with an unrelated message.  Both
    ``torch.compile(model.forward, fullgraph=True)`` and ``model.compile(fullgraph=True)`` (which compiles the
    call, hooks included) are read.  Without ``fullgraph`` the hooks become graph breaks and the outputs are the
    model's own."""
    own = vars(model)
    for name, what in (("forward", f"{type(model).__name__}.forward is torch.compile(..., fullgraph=True)"),
                       ("_compiled_call_impl", f"this {type(model).__name__} was model.compile(fullgraph=True)")):
        if _fullgraph(own.get(name)):
            raise ModelError(f"arrcoc.hf: {what}; {_FULLGRAPH_HELP}")


def _refuse_fullgraph_compile_config(model: Any, compile_config: Any) -> None:
    """``generate`` compiles the model's call for its decoding steps (a static cache on a GPU, or a
    ``compile_config``) with ``compile_config``, or the model's default one: ``fullgraph=True`` is refused."""
    if compile_config is None:
        default = getattr(model, "_default_compile_config", None)
        compile_config = default() if callable(default) else None
    if getattr(compile_config, "fullgraph", False) is True:
        raise ModelError(f"arrcoc.hf: generate would compile the decoding steps of this {type(model).__name__} "
                         f"with compile_config fullgraph=True; {_FULLGRAPH_HELP} (pass "
                         "compile_config=CompileConfig(fullgraph=False), or disable_compile=True)")


def split_stages(stages: list, projector: str) -> tuple[list, list]:
    """A pipeline's ``(label, plugin)`` stages split into those before and after the model's projector
    (``projector``: ``"auto"`` by each stage's kind, ``"before"`` or ``"after"``); arrcoc.vllm uses it too."""
    if projector == "before":
        return [], list(stages)
    if projector == "after":
        return list(stages), []
    first = next((i for i, (_, p) in enumerate(stages) if p.stage != "vision"), len(stages))
    for label, plugin in stages[first:]:
        if plugin.stage == "vision":
            raise ModelError(
                f"{label} ({plugin.name}) runs on vision features, but an earlier stage ({stages[first][0]}) runs "
                "after the projector; reorder the stages or pass projector='before' / 'after'"
            )
    return list(stages[:first]), list(stages[first:])





@contextmanager
def apply(model: Any, pipeline: Any, *, projector: str = "auto") -> Iterator[Run]:
    """Run ``pipeline`` (a name, YAML path, dict or ``PipelineSpec``) inside ``model`` for the ``with`` block.

    One Run per model at a time: ``apply`` on a model that already runs a
    pipeline (a nested ``with``, or another thread's) raises
    :class:`~arrcoc.errors.ActiveRunError` naming that pipeline and thread,
    and touches nothing; to run two pipelines at once, apply them to two
    copies of the model.  Inside the block every call of the model, from any
    thread, goes through the Run, one call at a time (a second thread's call
    waits for the first to end).  Leaving the block, by an exception too,
    undoes each patch (hooks, attention implementation, ``generate``,
    ``get_image_features``) even if undoing another one fails, and frees
    the model; a failure while entering undoes what was done.  Contexts of
    different models may be left in any order.  A Run's ``generate`` kept
    past its block refuses to run.
    """
    run = Run(model, resolve_spec(pipeline), projector=projector)._enter()
    try:
        yield run
    finally:
        run._exit()


def load(path: str, device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` from a local directory, hub id or shipped model (``arrcoc:toyvqa``), through
    the ordinary ``from_pretrained``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = check_model_dir(path)  # a missing directory or tokenizer is named, not transformers' guess
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or "auto").eval()
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"arrcoc.hf.load: cannot load {path!r} ({type(exc).__name__}: {exc})") from None
    adapter_for(model)  # a clear error for an unsupported family, before any work
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # generation needs the last token last
    return (model.to(device) if device is not None else model), processor
