"""What every family of denoisers tells the guided denoiser. One subclass per family, one file each.

SAG's steps do not depend on the model being a UNet; what differs between families is small:
where the denoiser lives in the pipeline, which of its inputs is the latent, how its output is
wrapped, the batch layout of classifier-free guidance, and where the capture layer and its map are.
"""

from __future__ import annotations

import torch

from sagfast.schedule import check_scheduler


class Family:
    name: str = ""
    """How errors and docs name the family."""

    attribute: str = ""
    """The pipeline attribute that holds the denoiser ("unet" or "transformer")."""

    pipelines: tuple = ()
    """Names of the pipeline classes (and their subclasses) whose batch layout this family knows."""

    def claims(self, pipeline_class: type) -> bool:
        """Whether `pipeline_class` is one of this family's pipelines (or a subclass of one)."""
        return any(cls.__name__ in self.pipelines for cls in pipeline_class.__mro__)

    def problems(self, pipe) -> list[str]:
        """Why this family cannot guide `pipe` as it is (empty when it can)."""
        return []

    def check_scheduler(self, scheduler) -> None:
        """Raises when SAG cannot read this family's noise level from `scheduler`."""
        check_scheduler(scheduler)

    def cfg_chunks(self, pipe) -> int:
        """2 when the pipeline's current call batches [uncond, cond], else 1."""
        return 2 if pipe.do_classifier_free_guidance else 1

    def resolve_layer(self, model: torch.nn.Module, layers: str):
        """(name, attention module, module whose 4-D input carries the map's (h, w)) for `layers`."""
        raise NotImplementedError

    sample_argument: str = "sample"
    """The name of the model's latent input."""

    def wrap_output(self, out: torch.Tensor):
        """The model's `return_dict=True` output for the prediction `out`."""
        raise NotImplementedError
