"""Saving and loading the shipped digit-model weights (safetensors + json, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sagfast.digits.models import FLOW_SCHEDULER_CONFIG, SCHEDULER_CONFIG, ClassEmbedding, DigitClassifier

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

UNET_FILE = "digits_unet"
EMBED_FILE = "digits_class_embedding"
SCHEDULER_FILE = "digits_scheduler.json"
CLASSIFIER_FILE = "digits_classifier.safetensors"
TRAIN_LOG_FILE = "digits_train.json"

DIT_FILE = "digits_dit"  # .safetensors + .json (the DiTTransformer2DModel config)
DIT_SCHEDULER_FILE = "digits_dit_scheduler.json"
DIT_TRAIN_LOG_FILE = "digits_dit_train.json"


def _public_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _save_module(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def save_weights(
    out_dir, unet, class_embedding, classifier, scheduler_config: dict | None = None, dtype: torch.dtype = torch.float16
) -> None:
    """Write the files `load_pipeline` / `load_classifier` read. Floating tensors are stored as `dtype`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_module(unet, out / f"{UNET_FILE}.safetensors", dtype)
    (out / f"{UNET_FILE}.json").write_text(json.dumps(_public_config(unet.config), indent=1, default=list))
    _save_module(class_embedding, out / f"{EMBED_FILE}.safetensors", dtype)
    (out / f"{EMBED_FILE}.json").write_text(json.dumps(_public_config(class_embedding.config), indent=1))
    (out / SCHEDULER_FILE).write_text(json.dumps(scheduler_config or SCHEDULER_CONFIG, indent=1))
    _save_module(classifier, out / CLASSIFIER_FILE, dtype)


def _weights_dir(weights_dir, name: str = UNET_FILE) -> Path:
    d = Path(weights_dir or os.environ.get("SAGFAST_DIGITS_WEIGHTS", WEIGHTS_DIR))
    if not (d / f"{name}.safetensors").is_file():
        raise FileNotFoundError(
            f"no digit-model weights in {d}; they ship with the package (sagfast/weights/) or are made by `python -m sagfast.digits.train`"
        )
    return d


def _load_state(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    state = load_file(str(path))
    ref = module.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module


def load_unet(weights_dir=None):
    from diffusers import UNet2DConditionModel

    d = _weights_dir(weights_dir)
    config = json.loads((d / f"{UNET_FILE}.json").read_text())
    unet = UNet2DConditionModel.from_config(config)
    return _load_state(unet, d / f"{UNET_FILE}.safetensors").eval()


def load_class_embedding(weights_dir=None) -> ClassEmbedding:
    d = _weights_dir(weights_dir)
    config = json.loads((d / f"{EMBED_FILE}.json").read_text())
    return _load_state(ClassEmbedding(**config), d / f"{EMBED_FILE}.safetensors").eval()


def scheduler_config(weights_dir=None) -> dict:
    return json.loads((_weights_dir(weights_dir) / SCHEDULER_FILE).read_text())


def load_pipeline(scheduler=None, weights_dir=None, device="cpu", dtype=torch.float32, progress: bool = True):
    """The embedded digit model as a `DigitDiffusionPipeline` (fp32 by default; weights stored in fp16).

    `scheduler`: None (DDIM), a scheduler class (built from the shipped noise-schedule config), or an
    instance."""
    from diffusers import DDIMScheduler

    from sagfast.digits.pipeline import DigitDiffusionPipeline

    config = scheduler_config(weights_dir)
    if scheduler is None:
        scheduler = DDIMScheduler.from_config(config)
    elif isinstance(scheduler, type):
        scheduler = scheduler.from_config(config)
    pipe = DigitDiffusionPipeline(unet=load_unet(weights_dir), class_embedding=load_class_embedding(weights_dir), scheduler=scheduler)
    if torch.device(device) != torch.device("cpu") or dtype != torch.float32:
        pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def load_classifier(weights_dir=None, device="cpu") -> DigitClassifier:
    d = _weights_dir(weights_dir)
    return _load_state(DigitClassifier(), d / CLASSIFIER_FILE).to(device).eval()


# --- the digit transformer (DiT, flow matching) ---


def save_dit_weights(out_dir, transformer, scheduler_config: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write the files `load_dit_pipeline` reads. Floating tensors are stored as `dtype`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_module(transformer, out / f"{DIT_FILE}.safetensors", dtype)
    (out / f"{DIT_FILE}.json").write_text(json.dumps(_public_config(transformer.config), indent=1, default=list))
    (out / DIT_SCHEDULER_FILE).write_text(json.dumps(scheduler_config or FLOW_SCHEDULER_CONFIG, indent=1))


def load_dit_transformer(weights_dir=None):
    from diffusers import DiTTransformer2DModel

    d = _weights_dir(weights_dir, DIT_FILE)
    config = json.loads((d / f"{DIT_FILE}.json").read_text())
    model = DiTTransformer2DModel.from_config(config)
    for block in model.transformer_blocks:  # labels are never dropped at random, even in train mode
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return _load_state(model, d / f"{DIT_FILE}.safetensors").eval()


def dit_scheduler_config(weights_dir=None) -> dict:
    return json.loads((_weights_dir(weights_dir, DIT_FILE) / DIT_SCHEDULER_FILE).read_text())


def load_dit_pipeline(scheduler=None, weights_dir=None, device="cpu", dtype=torch.float32, progress: bool = True):
    """The embedded digit transformer as a `DigitDiTPipeline` (fp32 by default; weights stored in fp16).

    `scheduler`: None (FlowMatchEulerDiscreteScheduler from the shipped config), a flow-matching scheduler
    class (built from that config), or an instance."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sagfast.digits.dit_pipeline import DigitDiTPipeline

    config = dit_scheduler_config(weights_dir)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    elif isinstance(scheduler, type):
        scheduler = scheduler.from_config(config)
    pipe = DigitDiTPipeline(transformer=load_dit_transformer(weights_dir), scheduler=scheduler)
    if torch.device(device) != torch.device("cpu") or dtype != torch.float32:
        pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe
