"""What a guidance term is: rows of a model call beside the main batch, and its part of the combine.

A term (one class per file in this folder) adds `+ s * (o[source] - o_term)` to every image's
prediction, where `o_term` is the model's output on the term's own rows and `o[source]` the main
pass's output on the rows those were derived from: the guide branch (SAG: uncond under CFG) or the
cond branch (PAG, SEG). The engine (sagfast.engine.denoiser) plans each step from the terms the
config asks for and names none of them:

- exact mode: the main batch with the rows of every term that does not need the main pass (PAG,
  SEG) in one call, then the rows of the terms that do (SAG: its input is built from the main pass's
  prediction) in a second call;
- batched mode: every term's rows in the main call, when each term that needs the main pass can build
  its rows from the previous step instead (`ready`).

A term says which of its rows' attention layers run differently (an `AttentionRule`: PAG's identity,
SEG's blurred queries), which transformer blocks they skip (a `SkipRule`: STG), or which blocks they
enter with a changed input (an `InputRule`); the capture switch and block hooks
(sagfast.attention.capture) run those rows through the rule and every other row as the model would,
so one call holds them all.

Terms are made per guided call (`Term(call)`): what they keep between steps lives in the call.
"""

from __future__ import annotations

import dataclasses

import torch

from sagfast.core.settings import refresh


@dataclasses.dataclass
class Rows:
    """A term's rows in one model call."""

    sample: torch.Tensor
    """Their latent, in the model's input layout."""
    conditioning: slice | torch.Tensor
    """The rows of the step's batch whose other inputs (text embeddings, added conditions, a per-row
    timestep) they take."""
    rule: AttentionRule | SkipRule | InputRule | None = None
    """How they run through some attention layers or blocks, or None: every layer as it is."""


class AttentionRule:
    """A term's rows through some attention layers: `layers` (the modules) and `fn(own, attn,
    hidden_states, *args, **kwargs)`, where `own(attn, hidden_states, *args, **kwargs)` runs the layer's
    own processor (a rule may call it on changed inputs, or not at all)."""

    kind = "attention"
    """Which switch or hook of sagfast.attention.capture applies it."""

    def __init__(self, layers, fn):
        self.layers = frozenset(layers)
        self.fn = fn

    def __call__(self, own, attn, *args, **kwargs):
        return self.fn(own, attn, *args, **kwargs)

    @classmethod
    def replacing(cls, layers, attention) -> AttentionRule:
        """A rule that runs `attention(attn, hidden_states, ...)` in place of the layers' own processor
        (PAG's and STG-A's perturbed attention)."""
        return cls(layers, lambda own, attn, *args, **kwargs: attention(attn, *args, **kwargs))


class SkipRule:
    """A term's rows skip whole transformer blocks (`layers`): each block gives those rows its inputs
    back as its outputs (`outputs`: the inputs its outputs stand for, in order; the block hook in
    sagfast.attention.capture)."""

    kind = "skip"

    def __init__(self, layers, outputs: tuple):
        self.layers = frozenset(layers)
        self.outputs = outputs


class InputRule:
    """A term's rows enter some transformer blocks (`layers`) with one input changed: the block's
    input `argument` (by default `hidden_states`, the image or video tokens; on joint-attention
    families the text stream is `encoder_hidden_states`, left as it is) is `transform(x)` for those
    rows, where `x` is that input's [rows, ...] slice; `transform` returns a tensor of x's shape. The
    rest of the block runs as it is, on every row (the block pre-hook in sagfast.attention.capture,
    `BlockInputHook`)."""

    kind = "input"

    def __init__(self, layers, transform, argument: str = "hidden_states"):
        self.layers = frozenset(layers)
        self.transform = transform
        self.argument = argument


TERMS: list = []
"""Every guidance term, in the order their rows join a model call (`Term.order`): each subclass of Term
registers itself when its module is imported (sagfast.terms imports every module of this folder)."""


def on(scale) -> bool:
    """Whether a scale (a number or one per image) is above 0 for any image."""
    return max(scale) > 0 if isinstance(scale, tuple) else scale > 0


class Term:
    """A guidance term. Subclasses set the class attributes and override the steps they need."""

    name: str = ""
    """The key of its rows' output in a step."""

    order: int = 0
    """Where its rows go in a model call, among the terms' (ascending)."""

    settings: tuple = ()
    """Its fields of the configuration (sagfast.core.settings.Setting): its scale, interval, layers and
    knobs, with their defaults, checks and documentation."""

    scale_field: str = ""
    """Its SAGConfig scale (a number or one per image; 0 is off)."""

    interval_field: str = ""
    """Its SAGConfig guidance interval."""

    layers_field: str | None = None
    """Its SAGConfig layer identifiers, if its rule acts on chosen layers."""

    layers_kind: str = "attention"
    """What its layer identifiers name: "attention" layers (matched as diffusers' `pag_applied_layers`)
    or transformer "block"s."""

    source: str = "cond"
    """Which branch its rows derive from and its term subtracts from: "cond" or "guide"."""

    needs_main: bool = False
    """Whether its rows' input is built from the same step's main pass (exact mode: a second call)."""

    refresh_field: str = ""
    """Its SAGConfig refresh interval `<name>_refresh`, which every term gets from its name (below)."""

    refresh: int = 1
    """Its refresh interval in this call: its rows run every `refresh`-th step of its interval, and the steps
    between add its kept difference (`keep`, `kept`)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Every term has a refresh setting, declared once here from its name.
        cls.refresh_field = f"{cls.name}_refresh"
        if all(setting.name != cls.refresh_field for setting in cls.settings):
            cls.settings = (*cls.settings, refresh(cls.name))
        TERMS.append(cls)
        TERMS.sort(key=lambda term: term.order)

    def __init__(self, call):
        self.call = call
        self.config = call.config
        self.layers = self.layers_of(call.family, call.model, call.config) if self.layers_field else []
        self.refresh = getattr(self.config, self.refresh_field, 1)
        self.difference = None
        """Term refresh: (key, step index, d) of the last step whose rows ran, d = o_source - o_term per image."""

    @classmethod
    def requested(cls, config) -> bool:
        """Whether the config turns this term on for any image."""
        return on(getattr(config, cls.scale_field))

    @classmethod
    def unsupported(cls, family) -> str | None:
        """Why `family` cannot run this term, from the capabilities it declares, or None. A term whose
        rule acts on attention layers chosen by identifier needs a family that can select them."""
        if cls.layers_field and cls.layers_kind == "attention" and family.unselectable_layers is not None:
            return f"{cls.layers_field} cannot choose attention layers on {family.name}: {family.unselectable_layers}"
        return None

    @classmethod
    def check_family(cls, family) -> None:
        """Raises when `family` cannot run this term (checked when a pipeline is enabled with it)."""
        why = cls.unsupported(family)
        if why is not None:
            raise ValueError(
                f"sagfast does not run {cls.name.upper()} on {family.name}: {why}. Use {cls.scale_field}=0 with {family.name}."
            )

    @classmethod
    def layers_of(cls, family, model, config) -> list:
        """The attention modules its rule changes (they get the capture switch when a pipeline is enabled)."""
        return family.matching_layers(model, getattr(config, cls.layers_field), cls.layers_field) if cls.layers_field else []

    def plan(self, fraction: float) -> str | None:
        """ "on" when this step runs its rows (`fraction`: i / N of the call's steps), else None. A term may
        answer "track": no rows, but it watches the main pass (SAG before its interval, batched)."""
        start, stop = getattr(self.config, self.interval_field)
        return "on" if start <= fraction < stop else None

    def scale(self, timestep):
        """Its scale at this step (`timestep`: the model call's): a number, or a tuple with one per image."""
        return getattr(self.config, self.scale_field)

    def reuses(self, index: int, key) -> bool:
        """Term refresh: whether at step `index` (planned on) it adds its kept difference instead of running
        its rows: within `refresh` steps of the last step whose rows ran (both evaluations of a Heun-type
        step are that step), for the same images (`key`: `refresh_key`)."""
        if self.refresh == 1 or self.difference is None or self.difference[0] != key:
            return False
        return 0 < index - self.difference[1] < self.refresh

    @staticmethod
    def refresh_key(state_key: tuple, branches: tuple) -> tuple:
        """What a kept difference is valid for: the step's images (`Step.state_key`: their count, shapes,
        dtype, device) and each one's guide branch (`Step.branches`)."""
        return state_key, branches

    def keep(self, step, difference: torch.Tensor) -> None:
        """Term refresh: the difference `o_source - o_term` (per image) of a step whose rows ran."""
        self.difference = (self.refresh_key(step.state_key, step.branches), step.index, difference)

    def kept(self) -> torch.Tensor:
        """Term refresh: the kept difference, what a step that reuses it adds times the term's scale."""
        return self.difference[2]

    def watches_between(self) -> bool:
        """Term refresh: whether it still watches the main pass at the steps that reuse its difference
        (SAG in batched mode records eps and mask there, so that its next rows are batched)."""
        return False

    def note_step(self, step) -> None:
        """Every step of the call, planned, whether or not the term runs in it."""

    def ready(self, step) -> tuple:
        """Batched mode: the images (indices) whose rows it can build before this step's main pass; a
        term that needs the main pass builds the others' from it, in a second call."""
        return () if self.needs_main else tuple(range(step.b))

    def before_main(self, step) -> None:
        """Right before the main pass (the capture is being armed for it)."""

    def after_main(self, step, o: torch.Tensor) -> None:
        """Right after the main pass, with its output `o`."""

    def rows(self, step, images: tuple | None = None) -> Rows:
        """Its rows for every image; a term that needs the main pass is also asked for some `images`
        only (their indices, in order): batched mode where its rows of the others are built later."""
        raise NotImplementedError

    def graph_state(self, step) -> tuple:
        """Persistent tensors a CUDA graph of this step reads and writes in place (batched-mode state)."""
        return ()

    def graph_refusals(self, step) -> list[str]:
        """Why a step with this term cannot be captured in a CUDA graph (empty when it can)."""
        return []
