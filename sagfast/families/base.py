"""What every family of denoisers tells the guided denoiser. One subclass per family, one file each.

SAG's steps do not depend on the model being a UNet; what differs between families is small:
where the denoiser lives in the pipeline, which of its inputs is the latent, how its output is
wrapped, the batch layout of classifier-free guidance, and where the capture layer and its map are.
"""

from __future__ import annotations

import re

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.identity import identity_attention
from sagfast.attention.processors import SAGCaptureProcessor
from sagfast.core.schedule import check_scheduler


class Family:
    name: str = ""
    """How errors and docs name the family."""

    attribute: str = ""
    """The pipeline attribute that holds the denoiser ("unet" or "transformer")."""

    @property
    def attributes(self) -> tuple:
        """Every pipeline attribute that may hold a denoiser this family guides, `attribute` first (Wan
        2.2 adds "transformer_2"); those that are None in a pipeline are left out."""
        return (self.attribute,)

    pipelines: tuple = ()
    """Names of the pipeline classes (and their subclasses) whose batch layout this family knows."""

    def claims(self, pipeline_class: type) -> bool:
        """Whether `pipeline_class` is one of this family's pipelines (or a subclass of one)."""
        return any(cls.__name__ in self.pipelines for cls in pipeline_class.__mro__)

    model_class: str = ""
    """The class name of the denoiser this family knows (a subclass of it is accepted)."""

    def problems(self, pipe) -> list[str]:
        """Why this family cannot guide `pipe` as it is (empty when it can): by default, a denoiser
        that is not a `model_class` (a torch.compile'd one is checked through `_orig_mod`)."""
        model = getattr(pipe, self.attribute, None)
        model = getattr(model, "_orig_mod", model)
        if not any(cls.__name__ == self.model_class for cls in type(model).__mro__):
            return [f"its `{self.attribute}` is a {type(model).__name__}, not a {self.model_class}"]
        if getattr(model, "is_cache_enabled", False):
            # A cache (FirstBlockCache, FasterCache, MagCache, ...) reuses a previous call's activations
            # per cache context; sagfast's calls carry other rows (degraded, perturbed) and join a
            # pipeline's two CFG calls, so cached activations would belong to other rows.
            return [
                f"its `{self.attribute}` has diffusers' cache on ({type(model._cache_config).__name__}), which reuses "
                f"activations across model calls whose rows sagfast changes: call `pipe.{self.attribute}.disable_cache()` first"
            ]
        return []

    def check_scheduler(self, scheduler) -> None:
        """Raises when SAG cannot read this family's noise level from `scheduler`."""
        check_scheduler(scheduler)

    def cfg_chunks(self, pipe, arguments: dict) -> int:
        """2 when the pipeline's current call batches [uncond, cond], else 1: from the pipeline's
        `do_classifier_free_guidance` where it has one, else from the call's `guidance_scale > 1`
        (`arguments`: the call's arguments, defaults included), as the pipeline decides it."""
        if hasattr(type(pipe), "do_classifier_free_guidance"):
            return 2 if pipe.do_classifier_free_guidance else 1
        return 2 if arguments.get("guidance_scale", 1.0) > 1 else 1

    def sequential_cfg(self, pipe, attribute: str, arguments: dict):
        """For a pipeline that runs CFG as two model calls per step (cond, then uncond): the CFG scale its
        current call (`arguments`, defaults included) combines the denoiser `attribute`'s calls with when
        CFG is on, else None (the default: CFG, if any, is one [uncond, cond] batch)."""
        return None

    def guide_chunk(self, chunks: int) -> int:
        """Which chunk of the CFG batch is the guide branch (uncond with CFG, else cond): 0 for a
        [uncond, cond] batch."""
        return 0

    def cond_chunk(self, chunks: int) -> int:
        """Which chunk of the CFG batch is the conditional branch (what PAG perturbs, and what runs alone
        outside `cfg_interval`): the last chunk of [uncond, cond]."""
        return chunks - 1

    token_grid: str = "hw"
    """How an attention layer's tokens lie: "hw" (an image's grid) or "thw" (a video's frames)."""

    unselectable_layers: str | None = None
    """Why its attention layers cannot be chosen by identifiers (diffusers' `pag_applied_layers`
    matching), or None: they can."""

    blocks: str | None = None
    """The attribute of the transformer's block stack (what STG skips), or None: STG is refused."""

    block_outputs: tuple = ("hidden_states",)
    """The inputs a block's outputs stand for, in the order it returns them (STG's skipped rows get
    these inputs back)."""

    def self_attention_layers(self, model: torch.nn.Module) -> list[str]:
        """The names of the self-attention layers PAG may perturb: each block's `attn1` where the family
        names a block stack (`blocks`: the video transformers, whose attention modules are not all
        diffusers' `Attention`), else diffusers' non-cross `Attention` layers."""
        return stack_layers(model, self.blocks) if self.blocks is not None else self_attention_layers(model)

    def matching_layers(self, model: torch.nn.Module, identifiers: tuple, field: str) -> list:
        """The self-attention modules a term changes (PAG's, SEG's) for layer identifiers (the config
        `field`, named in errors), matched as diffusers' `PAGMixin` matches `pag_applied_layers`: a
        regular-expression search in each self-attention layer's name (`_fake_integral_match` aside)."""
        if self.unselectable_layers is not None:
            raise ValueError(f"{field} cannot choose attention layers on {self.name}: {self.unselectable_layers}")
        model = getattr(model, "_orig_mod", model)
        modules = dict(model.named_modules())
        names = self.self_attention_layers(model)
        found = []
        for identifier in identifiers:
            try:
                matched = [n for n in names if re.search(identifier, n) and not _fake_integral_match(identifier, n)]
            except re.error as e:
                raise ValueError(f"{field} entry {identifier!r} is not a valid regular expression ({e})") from None
            if not matched:
                raise ValueError(
                    f"{field} entry {identifier!r} matches no self-attention layer of this {type(model).__name__} "
                    f"(identifiers are searched in the layer names, as diffusers' pag_applied_layers). "
                    f"Its self-attention layers: {names or 'none'}"
                )
            found += [modules[n] for n in matched if modules[n] not in found]
        return found

    def skipped_blocks(self, model: torch.nn.Module, identifiers: tuple, field: str) -> list:
        """The transformer blocks of the block stack for identifiers (the config `field`, named in errors):
        a block index (as the STG pipelines' `stg_applied_layers_idx`), "mid" (the block in the middle,
        as SAG's "mid"), or a block's name ("blocks.8")."""
        model = getattr(model, "_orig_mod", model)
        if self.blocks is None:
            raise ValueError(f"{field}: sagfast knows no block stack in {self.name}'s {type(model).__name__}")
        stack = getattr(model, self.blocks)
        names = {f"{self.blocks}.{i}": block for i, block in enumerate(stack)}
        found = []
        for identifier in identifiers:
            if identifier == "mid":
                identifier = len(stack) // 2
            block = stack[identifier] if isinstance(identifier, int) and -len(stack) <= identifier < len(stack) else names.get(identifier)
            if block is None:
                raise ValueError(
                    f"{field} entry {identifier!r} is not a block of this {type(model).__name__}: give a block index "
                    f"0..{len(stack) - 1}, 'mid', or a block name ('{self.blocks}.0' ... '{self.blocks}.{len(stack) - 1}')"
                )
            if block not in found:
                found.append(block)
        return found

    def transformer_blocks(self, model: torch.nn.Module) -> dict:
        """Every transformer block of `model` by name, in the order its forward runs them (what a term
        that changes a block's input chooses from): the family's block stack (`blocks`) where it names
        one, else the model's `transformer_blocks` stack where it has one (DiT's and PixArt's blocks,
        SD3's joint blocks, Flux's double-stream blocks); a UNet's sit inside its down, mid and up
        blocks (UNetFamily). Empty where the family knows none."""
        model = getattr(model, "_orig_mod", model)
        stack = self.blocks or "transformer_blocks"
        blocks = getattr(model, stack, None)
        if not isinstance(blocks, torch.nn.ModuleList):
            return {}
        return {f"{stack}.{i}": block for i, block in enumerate(blocks)}

    def middle_block(self, model: torch.nn.Module) -> str | None:
        """The name of the block "mid" stands for among `transformer_blocks`: the one in the middle
        (index len // 2, as SAG's and STG's "mid"), or None where there are none."""
        names = list(self.transformer_blocks(model))
        return names[len(names) // 2] if names else None

    def chosen_blocks(self, model: torch.nn.Module, identifiers: tuple, field: str) -> list:
        """The transformer blocks (modules, in the order given, each once) for `identifiers` of the config
        `field` (named in errors): "mid" (`middle_block`) or a block's full name, one of
        `transformer_blocks`; a ValueError listing the blocks there are otherwise."""
        model = getattr(model, "_orig_mod", model)
        blocks = self.transformer_blocks(model)
        if not blocks:
            raise ValueError(
                f"{field} names transformer blocks, and sagfast knows none in {self.name}'s {type(model).__name__}: "
                f"use {field.split('_')[0]}_scale=0 with this model"
            )
        found = []
        for identifier in identifiers:
            block = blocks.get(self.middle_block(model) if identifier == "mid" else identifier) if isinstance(identifier, str) else None
            if block is None:
                raise ValueError(
                    f"{field} entry {identifier!r} is not a transformer block of this {type(model).__name__}: give 'mid' "
                    f"or a block's full name. Its transformer blocks: {block_listing(list(blocks))}"
                )
            if block not in found:
                found.append(block)
        return found

    def self_attention_of(self, block: torch.nn.Module) -> torch.nn.Module:
        """A block's self-attention (STG's "attention" mode perturbs it): its `attn1`."""
        return block.attn1

    perturbed_attention = staticmethod(identity_attention)
    """PAG's perturbed attention for this family's layers, with an attention processor's signature."""

    def resolve_layer(self, model: torch.nn.Module, layers: str):
        """(name, attention module, module whose 4-D input carries the map's (h, w), patch size: the
        map is that input's (h, w) over it) for `layers`."""
        raise NotImplementedError

    sample_argument: str = "sample"
    """The name of the model's latent input."""

    timestep_argument: str = "timestep"
    """The name of the model's timestep input."""

    def to_image(self, x: torch.Tensor, call: dict) -> torch.Tensor:
        """The model's input or output laid out as an image [B, C, H, W] (what blur and masks act on);
        the same object where the model already works on images."""
        return x

    def to_model_input(self, image: torch.Tensor, call: dict) -> torch.Tensor:
        """`to_image`'s inverse for a model input."""
        return image

    def map_size(self, call: dict):
        """The capture layer's (h, w) when the call's inputs tell it (Flux's `img_ids`), else None: the
        map hook reads it from the owner's 4-D input."""
        return None

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        """The processor that runs the capture layer in a guided main pass and records the mass."""
        return SAGCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out: torch.Tensor):
        """The model's `return_dict=True` output for the prediction `out`."""
        raise NotImplementedError


def true_cfg(arguments: dict):
    """The true CFG scale of a call of a guidance-distilled pipeline (FluxPipeline's and
    HunyuanVideoPipeline's rule: `true_cfg_scale > 1` and a negative prompt), or None: no true CFG."""
    negative = arguments.get("negative_prompt") is not None or (
        arguments.get("negative_prompt_embeds") is not None and arguments.get("negative_pooled_prompt_embeds") is not None
    )
    scale = float(arguments.get("true_cfg_scale") or 1.0)
    return scale if scale > 1 and negative else None


def _fake_integral_match(identifier: str, name: str) -> bool:
    """diffusers' `is_fake_integral_match`, kept as it is for parity: an identifier and a layer name
    that both end in the same number do not match. (It does not keep "blocks.1" from finding
    "blocks.10.attn1": the search does find it, in diffusers too.)"""
    last_id, last_name = identifier.split(".")[-1], name.split(".")[-1]
    return last_id.isnumeric() and last_name.isnumeric() and last_id == last_name


def block_listing(names: list) -> str:
    """Block names for an error, each run of one stack's consecutive blocks as its first and last
    ("'blocks.0' ... 'blocks.29'"), so that a 30-block stack or a UNet's 70 blocks stay one readable line."""
    runs: list = []
    for name in names:
        stack, _, index = name.rpartition(".")
        if runs and index.isdigit() and runs[-1][0] == stack and runs[-1][2] == int(index) - 1:
            runs[-1][2] = int(index)
        else:
            runs.append([stack, int(index) if index.isdigit() else None, int(index) if index.isdigit() else None, name])
    parts = []
    for stack, first, last, name in runs:
        parts.append(repr(name) if first == last else f"'{stack}.{first}' ... '{stack}.{last}'")
    return ", ".join(parts)


def self_attention_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]


def layer_error(model: torch.nn.Module, where: str, name: str) -> ValueError:
    found = self_attention_layers(model)
    return ValueError(
        f"SAG needs a self-attention layer at {where} ({name}), and this {type(model).__name__} has none "
        f"there. Self-attention layers it has: {found[:8] or 'none'}" + (" ..." if len(found) > 8 else "")
    )


def stack_layers(model: torch.nn.Module, stack: str, attention: str = "attn1") -> list[str]:
    """The names of `attention` in every block of `model.<stack>` (a video transformer's self-attention layers)."""
    return [f"{stack}.{i}.{attention}" for i in range(len(getattr(model, stack)))]


def transformer_block_layer(
    model: torch.nn.Module, layers: str, attention: str = "attn1", stack: str = "transformer_blocks", module_class: str | None = None
):
    """(name, attention module) for a transformer stack: "mid" is `attention` of the block in the
    middle of `model.<stack>` (index len // 2: for an even count, the first block of the second half),
    else a module name ("transformer_blocks.3.attn1") or a block ("transformer_blocks.3").
    `module_class`: the class name of the stack's attention modules where they are not diffusers'
    `Attention` (LTX-Video's, Wan's); the error then lists the stack's `attention` layers."""
    model = getattr(model, "_orig_mod", model)
    modules = dict(model.named_modules())

    def is_attention(module) -> bool:
        return type(module).__name__ == module_class if module_class else isinstance(module, Attention)

    blocks = getattr(model, stack)
    if layers == "mid":
        name = f"{stack}.{len(blocks) // 2}.{attention}"
        where = "the middle transformer block"
    else:
        name = f"{layers}.{attention}" if layers in modules and not is_attention(modules[layers]) else layers
        where = repr(layers)
    attn = modules.get(name)
    if module_class is None:
        if not isinstance(attn, Attention) or attn.is_cross_attention:
            raise layer_error(model, where, name)
    elif not is_attention(attn) or not name.endswith(attention):
        found = stack_layers(model, stack, attention)
        raise ValueError(
            f"SAG needs a self-attention layer at {where} ({name}), and this {type(model).__name__} has none there. "
            f"Its self-attention layers: {found[:8]}" + (" ..." if len(found) > 8 else "")
        )
    return name, attn


class PatchTransformerFamily(Family):
    """A transformer on the latent image ([B, C, H, W] `hidden_states`, patchified inside): DiT,
    PixArt. Capture layer "mid": `attn1` of transformer_blocks[N // 2]; the map is the latent's
    (h, w) over the patch size, read from the transformer's own 4-D input."""

    attribute = "transformer"
    sample_argument = "hidden_states"

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers)
        original = getattr(model, "_orig_mod", model)
        return name, attn, original, original.config.patch_size

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
