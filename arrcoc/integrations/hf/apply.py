"""``arrcoc.hf.apply(model, pipeline)``: run a pipeline inside a Hugging Face VLM.

::

    with arrcoc.hf.apply(model, "fastv") as run:
        out = model.generate(**inputs, max_new_tokens=32)
    print(run.report)

Inside the context every call of the model (a ``forward``, or a ``generate``
and the forwards it makes) is one :class:`~.call.Call`, which the
:class:`Run` opens and closes; in between:

* **pre-LLM stages** (``compress``, ``score``, ``allocate``) run on the
  model's own image features and shorten the prompt (:mod:`.shorten`);
  ``generate`` returns the caller's prompt followed by the new tokens, as
  without arrcoc (:mod:`.generation`);
* **in-LLM stages** (``llm:``) run between decoder layers (:mod:`.engine`);
  the text model's attention becomes ``arrcoc_<sdpa|eager>``, which records
  only the rows a stage needs and calls the original kernel
  (:mod:`.attention`);
* :meth:`Report.from_call <.report.Report.from_call>` summarises the call
  once it ends: ``run.report``.

The Run owns the hooks of the model (a forward pre-hook that opens the
call, one that hands the LLM's inputs to the engine after every other
pre-hook, a post-hook, and the hook that releases the call when a forward
raises) and the timing hooks of its language model; the engine owns only
the decoder layers' pre-hooks.  Leaving the context removes every hook,
restores the attention implementation and ``generate``: the model computes
exactly as before.  One Run per model at a time (see :func:`apply`).
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
from arrcoc.plugin import LLMCompressor
from arrcoc.spec import PipelineSpec, resolve_spec
from arrcoc.state import StageRecord, TokenState
from arrcoc.timing import clock

from . import compat, generation
from .adapter import Adapter, adapter_for
from .attention import scoring_implementation
from .call import UNSET, Call
from .engine import LLMEngine
from .report import Report, cache_bytes
from .shorten import PROJECTOR_CHOICES, PreLLM
from .vision import VisionTower, tower_options

#: The Run active on each model (one at a time, see ``apply``); the lock makes claiming a model atomic.
_ACTIVE_RUNS: "weakref.WeakKeyDictionary[Any, Run]" = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()
#: The attribute a KV cache carries when it holds a prompt shortened before the LLM: ``(the caller's prompt, the
#: short prompt's sequence-aligned kwargs, the model's position state)``; copies of the cache carry it too.
SHORTENED = "_arrcoc_shortened"


class Run:
    """One pipeline applied to one model; ``report`` and ``state`` describe the last call."""

    def __init__(self, model: Any, spec: PipelineSpec, projector: str = "auto", tokenizer: Any = None) -> None:
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
        # The model's own tower; the pipeline file's tower settings that carry over to it (attention layers).
        self.encoder = VisionTower.for_model(model, project=False, **tower_options(spec.encoder.params))
        device = next(model.parameters()).device
        # Inside a model the query is the prompt's own text in the LLM's input embeddings, so the file's
        # query encoder (e.g. hf_text on the shipped toy model, for standalone runs) is never built.
        self.pipeline = Pipeline(spec.model_copy(update={"query_encoder": None}), device=device, encoder=self.encoder)
        self.pre_llm = PreLLM(model, self.adapter, self.pipeline, self.encoder, projector, tokenizer)
        llm = []
        for label, plugin in self.pipeline.llm:
            if not isinstance(plugin, LLMCompressor):
                raise ModelError(f"{label} ({plugin.name}): not an LLMCompressor; it cannot run between decoder layers")
            llm.append((label, plugin))
        run = weakref.ref(self)  # the engine reads the Call in progress; it does not keep the Run alive
        self.engine = LLMEngine(self.adapter, llm, current=lambda: run().call, registry=self.pipeline.registry)
        #: The call in progress, or the last one.
        self.call = Call()
        #: The summary of the last call (built once, when it ended).
        self.report = Report()
        self._undo: list[Any] = []  # the undo of each step _enter took, run in reverse by _exit
        self._active = False
        self._thread = ""  # the name of the thread that entered, for the message of a second apply
        # One call at a time: the Call and the report belong to the Run.  A generate and the forwards it makes
        # hold it in their thread; another thread's call waits for it.
        self._call_lock = threading.RLock()
        self._call_depth = threading.local()
        self._opening = threading.local()  # .n: forwards of the thread between _pre_hook and _inputs_hook
        self._attn: str | None = None
        self._generate: Any = None  # the model's own generate, captured by _enter
        # cache -> (the caller's prompt, the shortened prompt's sequence-aligned kwargs) for each generate whose
        # prompt was shortened: a conversation going on from that cache must go on from the short prompt.
        # Kept ON the cache (the attribute SHORTENED): a copy.deepcopy of the cache, transformers' way of reusing a
        # prompt's cache, holds the short prompt too; a cache that takes no attribute is looked up here instead.
        self._shortened: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
        # Model calls made in the middle of another in the same thread (a logits processor's forward or generate
        # inside generate): (the thread's call depth for it, its kind, the outer Call, the outer report), innermost
        # last; see _nest.
        self._nested: list[tuple[int, str, Call, Report]] = []
        # transformers 5's generate encodes the images (base_model.get_image_features) before the prefill
        # forward, outside the hooks that time it: timed here, or prefill_ms would leave out the vision tower.
        self._base = getattr(model, "base_model", model)
        self._image_features: Any = None

    # -------------------------------------------------------------- results
    @property
    def state(self) -> TokenState | None:
        """The visual tokens after the pre-LLM stages of the last call (None without pre-LLM stages); its
        ``trace`` is :attr:`trace`, every stage of that call, the in-LLM ones included (their tokens:
        :attr:`llm_states`)."""
        return self.call.state

    @property
    def trace(self) -> tuple[StageRecord, ...]:
        """One :class:`~arrcoc.state.StageRecord` per stage of the last call, in the order they ran: the pre-LLM
        stages, then the ``llm:`` stages by decoder layer (``"llm[i]@layer"``)."""
        return self.call.trace

    @property
    def llm_states(self) -> dict[str, TokenState]:
        """The visual tokens after each in-LLM stage of the last prefill, by ``"llm[i]@layer"``."""
        return dict(self.call.llm_states)

    @property
    def has_pre_llm(self) -> bool:
        return self.pre_llm.active

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
        if self.engine.scoring:
            cfg = self.adapter.text_config
            self._attn = cfg._attn_implementation
            scoring = scoring_implementation(self._attn)
            self._undo.append(lambda: model.set_attn_implementation({"text_config": self._attn}))
            model.set_attn_implementation({"text_config": scoring})
        self._undo.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True).remove)
        # The LLM's inputs are read after every other pre-hook of the model (one registered before apply may pad
        # or move them): the Run's last pre-hook hands them to the engine.
        self._undo.append(model.register_forward_pre_hook(self._inputs_hook, with_kwargs=True).remove)
        self._undo.append(self.engine.remove)
        self.engine.install()
        lm = self.adapter.language_model
        self._undo.append(lm.register_forward_pre_hook(self._llm_pre_hook, with_kwargs=True).remove)
        self._undo.append(lm.register_forward_hook(self._llm_post_hook).remove)
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

    # --------------------------------------------------- one call at a time
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

    def _finish(self) -> None:
        """The call ends: its report, built once."""
        self.report = Report.from_call(self.call, self.adapter.text_config)

    # ------------------------------------------------------- nested calls
    def _is_nested_forward(self, cache: Any) -> bool:
        """Whether a forward starting now is made in the middle of another call of this thread rather than being
        that call's own: made inside a forward (from a hook), or inside a generate with another cache than the
        generate's (a logits processor's forward: classifier-free guidance's unconditional one has its own cache,
        a plain ``model(**inputs)`` none).  A generate's first forward is its own and names its cache."""
        call = self.call
        if call.in_forward:
            return True
        if not call.generating:
            return False
        if call.generate_cache is UNSET:
            call.generate_cache = cache
            return False
        return cache is not call.generate_cache

    def _nest(self, kind: str) -> None:
        """Set the call in progress aside for a call made in the middle of it: the nested call runs as it would on
        its own in the block (its own pruning, prefill bookkeeping, report), the outer one keeps its own Call."""
        self._nested.append((self._call_depth.n, kind, self.call, self.report))
        self.call = Call(kind=kind)

    def _unnest(self, size: int) -> None:
        """Give back the Call of each call set aside beyond the first ``size`` (innermost first): the report
        describes the outermost call."""
        while len(self._nested) > size:
            _, _, self.call, self.report = self._nested.pop()

    def _timed_image_features(self, *args: Any, **kwargs: Any) -> Any:
        start = clock(kwargs.get("pixel_values", args[0] if args else None))
        out = self._image_features(*args, **kwargs)
        if not self.call.in_forward:  # inside a forward, the forward's own time includes it
            self.call.outside_vision_ms += (clock(kwargs.get("pixel_values", args[0] if args else None)) - start) * 1e3
        return out

    # ------------------------------------------------------- forward hooks
    def _pre_hook(self, module: Any, args: tuple, kwargs: dict):
        """A forward starts: its Call (the generate's own, or a new one), the pre-LLM stages, the engine."""
        _refuse_fullgraph_forward(module)  # before the call lock: nothing to release
        depth = self._begin_call()  # released by _forward_done, also when the forward raises
        if not self._active:
            # The block was left while this call waited for the Run (torch read the hooks before _exit removed
            # them, so _forward_done will not run): the model computes on its own.
            self._end_call()
            return None
        if depth and not self.call.generating and not self._nested and not getattr(self._opening, "n", 0):
            # What an earlier forward of this thread kept when Ctrl-C stopped it (a forward made from inside a
            # forward outside generate, from a hook, cannot be told from it: it runs as a call of its own).
            self._end_call(1)
            self.call.in_forward = False
            self._opening.n = 0
        if args:  # every input by name: positional pixel_values must not slip past the stages
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
            args = ()
        cache = compat.cache_of(kwargs)
        if self._is_nested_forward(cache):
            self._nest("forward")  # given back by _forward_done, also when the forward raises
        elif not self.call.generating and not (self.call.continues(cache) and cache.get_seq_length()):
            # A forward on its own is a call of its own; a decoding step in the cache of the last call's prefill
            # goes on with that call (a decoding loop written by hand, a generate bound before the block).
            self.call = Call(kind="forward")
        call = self.call
        call.in_forward = True
        if self.pre_llm.active and kwargs.get("pixel_values") is not None:
            kwargs = self.pre_llm.shorten(call, kwargs)
        else:
            if not call.generating and self.pre_llm.active and kwargs.get("mm_encoder_outputs"):
                # The model's own generate encodes the images before this forward: the stages were skipped.
                raise InputError(
                    f"arrcoc.hf: a forward got image features computed outside pipeline {self.spec.name!r} "
                    "(mm_encoder_outputs, no pixel_values), so its pre-LLM stages cannot run: this is what a "
                    "generate bound before arrcoc.hf.apply was entered does (gen = model.generate, "
                    "functools.partial(model.generate, ...)); call model.generate inside the block, or give the "
                    "forward pixel_values"
                )
            self.pre_llm.check_placeholders(kwargs.get("input_ids"), kwargs)
        self._opening.n = getattr(self._opening, "n", 0) + 1
        return args, kwargs

    def _inputs_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        """The model's last pre-hook: the inputs the LLM gets, to the engine; the forward's clock starts."""
        if not self._active or not getattr(self._opening, "n", 0):  # a forward the Run let through (see _pre_hook)
            return None
        self._opening.n -= 1
        if args:
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
        ids = kwargs.get("input_ids")
        self.engine.begin_forward(self.call, ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask"),
                                  compat.cache_of(kwargs), inputs=kwargs)
        self.call.forward_start = clock(ids)
        return None

    def _llm_pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.call.llm_start = clock(kwargs.get("inputs_embeds"))

    def _llm_post_hook(self, module: Any, args: tuple, output: Any) -> None:
        call = self.call
        if call.prefill:
            call.llm_prefill_ms = (clock(getattr(output, "last_hidden_state", None)) - call.llm_start) * 1e3

    def _post_hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """A forward ended: its time and KV bytes; a forward on its own ends its call."""
        call = self.call
        ms = (clock(getattr(output, "logits", None)) - call.forward_start) * 1e3
        cache = compat.output_cache(output)
        if call.prefill:
            call.prefill_ms = ms
            call.filled = _weak(cache)
        else:
            call.decode_ms += ms
            call.decode_steps += 1
        if call.prefill or not call.forwards:  # the cache after the call's first forward (its prompt)
            call.kv_bytes = cache_bytes(cache)
        call.forwards += 1
        self.engine.end_forward(call, cache)
        call.in_forward = False
        if not call.generating:
            self._finish()

    def _forward_done(self, module: Any, args: tuple, output: Any) -> None:
        call = self.call
        if call.in_forward and not call.generating:  # the forward raised before _post_hook: its call ends here
            call.in_forward = False
            try:
                self._finish()
            except Exception:
                pass  # the forward's own exception is the one to see
        if self._nested and self._nested[-1][:2] == (getattr(self._call_depth, "n", 0), "forward"):
            self._unnest(len(self._nested) - 1)  # a nested forward ends: the outer call comes back
        else:
            self.call.in_forward = False
        self._end_call()
        if not getattr(self._call_depth, "n", 0):  # the thread's outermost forward ended (a pre-hook may have raised)
            self._opening.n = 0

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
        if depth and not self.call.generating and not self._nested:
            # What a forward of this thread stopped by Ctrl-C kept (as in _pre_hook: a generate made from a hook
            # in the middle of a forward outside generate cannot be told from it, and runs as a call of its own).
            self._end_call(1)
            self.call.in_forward = False
            depth = 0
        nested = len(self._nested)
        inside = bool(depth and (self.call.generating or self.call.in_forward))  # in another call of this thread
        if inside:
            self._nest("generate")
        try:
            return self._run_generate(*args, **kwargs)
        finally:
            try:
                self._unnest(nested)  # also what a nested forward stopped by Ctrl-C set aside
                if not inside:
                    self._finish()  # also for a generate that raised or was stopped: the report says how far it got
            finally:
                self._end_call(depth)  # with what a forward stopped by Ctrl-C kept (it never reached _forward_done)

    def _run_generate(self, *args: Any, **kwargs: Any) -> Any:
        _refuse_fullgraph_forward(self.model)  # before the pre-LLM stages run
        call = self.call = Call(kind="generate")
        kwargs = generation.arguments_by_name(self._generate, self.model, args, kwargs)
        original = kwargs.get("input_ids")
        if self.engine.active and not generation.uses_cache(self.model, kwargs):
            raise InputError(
                "arrcoc.hf: generate(use_cache=False) recomputes the whole sequence at every step, so llm: stages "
                "would prune again at every step; llm: stages prune once, in prefill, and need the KV cache"
            )
        long_prompt = generation.prompt_length(kwargs)
        given = kwargs.get("past_key_values", kwargs.get("cache"))
        # A new prompt fills the cache (none, or emptied); what is no Cache is left to generate to refuse.
        fresh = not callable(getattr(given, "get_seq_length", None)) or not given.get_seq_length()
        if self.pre_llm.active and kwargs.get("pixel_values") is not None:
            if kwargs.get("attention_mask") is None and original is not None and kwargs.get("inputs_embeds") is None:
                # The prompt gets an explicit mask below: the one generate would infer from this prompt's pad ids
                # (given embeddings too, generate infers none from the ids: every column is real).
                kwargs["attention_mask"] = generation.inferred_mask(self.model, original, kwargs)
            kwargs = self.pre_llm.shorten(call, kwargs)
        else:
            self.pre_llm.check_placeholders(original, kwargs)
            kwargs = self._resume_shortened(kwargs)
        kwargs = generation.keep_lengths(self.model, kwargs, long_prompt - generation.prompt_length(kwargs))
        if kwargs.get("streamer") is not None and original is not None and kwargs.get("input_ids") is not original:
            kwargs["streamer"] = generation.PromptStreamer(kwargs["streamer"], original)
        call.outside_vision_ms = 0.0
        call.generating = True
        try:
            out = self._generate(**kwargs)
        finally:
            call.generating = call.in_forward = False  # (a forward that raised never reached its post hook)
        cache = kwargs.get("past_key_values", kwargs.get("cache", getattr(out, "past_key_values", None)))
        if self.pre_llm.active and original is not None and cache is not None and "input_ids" in kwargs:
            aligned = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
            short = {k: kwargs[k] for k in aligned if kwargs.get(k) is not None}
            compat.mark(cache, SHORTENED, (original, short, self.adapter.position_state), self._shortened)
        elif fresh and cache is not None:  # a cache refilled with a prompt nothing shortened (reused, reset)
            compat.mark(cache, SHORTENED, None, self._shortened)
        if original is None or "input_ids" not in kwargs or kwargs["input_ids"] is original:
            return out
        return generation.with_caller_prompt(out, original, kwargs["input_ids"].shape[1])

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


def _weak(cache: Any) -> Any:
    """A weak reference to ``cache`` (None for no cache, or one that takes none): the Run keeps no cache alive."""
    try:
        return None if cache is None else weakref.ref(cache)
    except TypeError:
        return None


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


@contextmanager
def apply(model: Any, pipeline: Any, *, projector: str = "auto", tokenizer: Any = None) -> Iterator[Run]:
    """Run ``pipeline`` (a name, YAML path, dict or ``PipelineSpec``) inside ``model`` for the ``with`` block.

    ``tokenizer`` (the model's, e.g. ``processor.tokenizer``): stages that read the question as text
    (``query_text``, e.g. cdpruner's ``clip``) get each prompt's text after the image, decoded with it.

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
    run = Run(model, resolve_spec(pipeline), projector=projector, tokenizer=tokenizer)._enter()
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
