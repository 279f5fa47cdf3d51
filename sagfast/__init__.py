"""sagfast: Self-Attention Guidance for diffusers pipelines, fast enough to leave on."""

from sagfast.api import disable, drop_graphs, enable, guided, is_enabled
from sagfast.config import SAGConfig
from sagfast.pipeline_sag import StableDiffusionSAGPipeline

__version__ = "0.1.0"

__all__ = ["SAGConfig", "StableDiffusionSAGPipeline", "disable", "drop_graphs", "enable", "guided", "is_enabled", "__version__"]
