"""Every call of the README's "Use" section, on a tiny pipeline built offline (random weights), in
place of `StableDiffusionPipeline.from_pretrained(...)`.

    python examples/use.py
"""

import torch
from offline_pipeline import tiny_stable_diffusion

import sagfast

pipe = tiny_stable_diffusion()  # README: StableDiffusionPipeline.from_pretrained(...)
sagfast.enable(pipe, scale=0.75)  # pipe.unet stays your UNet; pipe's calls are guided
image = pipe("a photo of a cat").images[0]
sagfast.disable(pipe)  # the pipeline and its UNet exactly as before

with sagfast.guided(pipe, scale=0.5, mode="batched"):  # only inside the block
    image = pipe("a photo of a cat").images[0]

if torch.cuda.is_available():  # one CUDA graph launch a step
    sagfast.enable(pipe.to("cuda", torch.float16), mode="batched", cuda_graph=True)
    image = pipe("a photo of a cat").images[0]

# SAG + PAG in one model call of 4B per step, CFG only on the first 60% of the steps:
sagfast.enable(pipe, scale=0.75, pag_scale=3.0, mode="batched", cfg_interval=(0.0, 0.6))
sagfast.enable(pipe, scale=0, pag_scale=3.0, pag_layers=["mid"])  # PAG alone = StableDiffusionPAGPipeline
sagfast.drop_graphs(pipe)  # after set_adapters(...): forget the captured graphs

# SEG (infinite query blur) and APG in the same engine; SAG + PAG + SEG batched is one call of 5B:
sagfast.enable(pipe, scale=0, seg_scale=3.0, cfg_rule="apg", apg_eta=0.0)
image = pipe("a photo of a cat").images[0]
# Per-image settings, one model call for all three images (one value per image of the call):
sagfast.enable(pipe, scale=[0.0, 0.5, 1.0], cfg_scale=[1.0, 3.0, 7.5], pag_scale=[0.0, 3.0, 1.0])
images = pipe(["a cat", "a dog", "a fox"], guidance_scale=7.5).images  # guidance_scale > 1: CFG batch
assert len(images) == 3

# diffusers' StableDiffusionSAGPipeline, same components and call, any scheduler:
pipe = sagfast.StableDiffusionSAGPipeline.from_pipe(pipe)
image = pipe("a photo of a cat", sag_scale=0.75).images[0]
print("every call of the README's Use section ran")
