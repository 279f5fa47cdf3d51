"""What CUDA-graph capture needs from the guided step, checked without a GPU.

Capture records device work only: a step that reads a value back on the host (`.item()`, `float(t)`,
`if t:`), or brings in a tensor made on the host (a Python scalar turned into a tensor, weights built
on the CPU and copied over), breaks capture or bakes one step's value into every replay. Running the
step on the meta device makes both visible on a CPU-only machine: meta tensors have no values, so a
read-back raises, and every crossing between host (CPU) and device (meta) tensors shows. The backends
run there are the PyTorch references (the Triton and C++ ops need real memory); their wrappers are
plain launches. The same watch checks abar, computed outside the graph once per step.

The graph key is checked on a real CPU run: one graph must serve every step of a call (the timestep
and abar enter as device tensors, never as Python numbers), and a re-run replays the same graphs.
`ModelWatch` is checked to see what else a graph bakes in (weight addresses, processors, offload
hooks). tests/test_gpu.py captures and replays the graphs for real on a GPU.
"""

import contextlib
import dataclasses
import warnings

import pytest
import torch
from components import CROSS_DIM, TOKENS, prompt_embeds, sd_pipeline, tiny_unet
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import sagfast
from sagfast.api import guided_call
from sagfast.core.schedule import alpha_bar, vp_noise
from sagfast.engine.cuda_graph import ModelWatch, StepGraphs
from sagfast.engine.denoiser import GuidedCall

# Ops that hand a device tensor's value (or a data-dependent size) back to the host.
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero"}


class HostWatch(TorchDispatchMode):
    """Records every op that crosses between the host and the device (meta): a read-back of a device
    tensor, a device op fed a host tensor, or a host tensor turned into a device one. Work that stays
    on the host (reading the scheduler's sigmas) is not a crossing."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        devices = {t.device.type for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        if name in HOST_READS and "meta" in devices:
            self.found.append(f"{name} (a read-back to the host)")
            raise RuntimeError(f"host read-back {name} inside the step")
        out = func(*args, **kwargs)
        out_devices = {t.device.type for t in pytree.tree_leaves(out) if torch.is_tensor(t)}
        if "meta" in devices and devices != {"meta"}:
            self.found.append(f"{name} mixes host and device tensors")
        elif devices == {"meta"} and "cpu" in out_devices:
            self.found.append(f"{name} copies a device tensor to the host")
        elif devices == {"cpu"} and "meta" in out_devices:
            self.found.append(f"{name} brings a host tensor to the device")
        return out


class HostDataWatch(TorchFunctionMode):
    """`torch.tensor(x, device=...)` and its kin put host data on the device without any op the
    dispatch watch sees."""

    FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(func is f for f in self.FACTORIES) and torch.is_tensor(out) and out.device.type == "meta":
            if not (args and torch.is_tensor(args[0]) and args[0].device.type == "meta"):
                self.found.append(f"torch.{func.__name__} puts host data on the device")
        return out


@contextlib.contextmanager
def host_watch():
    watch = HostWatch()
    with HostDataWatch(watch.found), watch:
        yield watch


@contextlib.contextmanager
def meta_call(pipe):
    """A guided call of `pipe` (its steps run by hand), with the UNet moved to the meta device."""
    pipe.unet.to("meta")
    with guided_call(pipe, sagfast.api.config_of(pipe)) as call:
        yield call


def meta_step(call, cfg_on: bool, b: int = 2, pag_scale=None):
    """A step as `GuidedCall.step` plans it, on the meta device (`pag_scale`: PAG's scale at this step)."""
    full = 2 * b if cfg_on else b
    sample = torch.randn(full, 4, 12, 10, device="meta")
    kwargs = dict(
        timestep=torch.tensor(501, device="meta"),
        encoder_hidden_states=torch.randn(full, TOKENS, CROSS_DIM, device="meta"),
    )
    step = call.plan(sample, kwargs, 2 if cfg_on else 1)
    scales = dict(step.scales, **({} if pag_scale is None else {"pag": pag_scale}))
    return dataclasses.replace(step, noise=vp_noise(torch.rand(b, device="meta")), scales=scales)


def sag_state(call) -> dict:
    """The SAG term's batched-mode state of the call (state key -> eps and mask)."""
    return next(t for t in call.terms if t.name == "sag").previous


def watched(call, variant, step):
    """The step's ops after a warm-up run (CUDA-graph capture also follows a warm-up: what a first run
    caches, such as the dispatch choice and the blur weights on the device, is allowed)."""
    call.run_step(variant, step)
    with host_watch() as watch:
        try:
            out = call.run_step(variant, step)
        except RuntimeError:
            out = None
    return out, watch.found


@pytest.mark.parametrize("mode", ["exact", "batched"])
@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("prediction_type, mask", [("epsilon", "attention"), ("v_prediction", "attention"), ("epsilon", "global")])
def test_guided_step_stays_on_the_device(mode, cfg_on, prediction_type, mask):
    pipe = sagfast.enable(sd_pipeline(prediction_type=prediction_type), mode=mode, mask=mask, backend="torch")
    with meta_call(pipe) as call:
        step = meta_step(call, cfg_on)
        if mode == "batched":
            call.run_step("exact", step)  # the first step of a call leaves eps and mask
            assert step.state_key in sag_state(call)
        out, found = watched(call, mode, step)
    assert found == []
    assert out.shape == step.sample.shape and out.device.type == "meta"


@pytest.mark.parametrize("mode, layout", [("exact", "main"), ("exact", "degraded"), ("batched", "main")])
@pytest.mark.parametrize("adaptive", [False, True], ids=["const", "adaptive"])
def test_a_sag_plus_pag_step_stays_on_the_device(mode, layout, adaptive):
    # An adaptive PAG scale enters a graphed step as a device tensor (graph_inputs): one graph serves
    # every step's scale.
    pipe = sagfast.enable(sd_pipeline(), mode=mode, pag_scale=3.0, exact_pag_pass=layout, backend="torch")
    with meta_call(pipe) as call:
        step = meta_step(call, cfg_on=True, pag_scale=torch.tensor(2.5, device="meta") if adaptive else 3.0)
        if mode == "batched":
            call.run_step("exact", step)
        out, found = watched(call, mode, step)
    assert found == []
    assert out.shape == step.sample.shape and out.device.type == "meta"


@pytest.mark.parametrize(
    "config",
    [
        dict(scale=0.0, seg_scale=2.0),
        dict(scale=0.0, seg_scale=2.0, seg_blur_sigma=1.0),
        dict(mode="batched", pag_scale=2.0, seg_scale=2.0),
        dict(scale=[0.0, 0.5], cfg_scale=[1.0, 4.0], pag_scale=[1.0, 0.0]),
        dict(scale=0.0, cfg_rule="apg"),
        dict(cfg_rule="cfg_zero_star", zero_init_steps=0),
    ],
    ids=["seg", "seg-sigma-1", "sag-pag-seg-batched", "per-image", "apg", "cfg-zero-star"],
)
def test_the_engines_terms_and_cfg_rules_stay_on_the_device(config):
    # Per-image scales and the CFG rules enter the step as device tensors made once per call; SEG's
    # blur and the rules' projections run on the device.
    pipe = sagfast.enable(sd_pipeline(), backend="torch", **config)
    with meta_call(pipe) as call:
        step = meta_step(call, cfg_on=True)
        if config.get("mode") == "batched":
            call.run_step("exact", step)
        out, found = watched(call, config.get("mode", "exact"), step)
    assert found == []
    assert out.shape == step.sample.shape and out.device.type == "meta"


@pytest.mark.parametrize("scheduler_cls", [None, EulerDiscreteScheduler, DPMSolverMultistepScheduler], ids=["ddim", "euler", "dpm"])
def test_alpha_bar_of_a_device_timestep_waits_for_nothing(scheduler_cls):
    # Outside the graph, but once per step: a read-back or a copy from host memory here would make the
    # host wait for the GPU every step, so it could never queue the next replay ahead.
    pipe = sd_pipeline(**({} if scheduler_cls is None else {"scheduler_cls": scheduler_cls}))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(5)
    t = scheduler.timesteps[2].to("meta")
    if hasattr(scheduler, "sigmas"):
        scheduler._step_index = 2  # as the pipeline's scale_model_input leaves it
    alpha_bar(scheduler, t, 3, "meta")  # the first call may copy the schedule to the device, once
    with host_watch() as watch:
        abar = alpha_bar(scheduler, t, 3, "meta")
    assert watch.found == []
    assert abar.shape == (3,) and abar.dtype == torch.float32 and abar.device.type == "meta"
    # The same numbers as the host computation.
    host = alpha_bar(scheduler, scheduler.timesteps[2], 3, "cpu")
    sigma = getattr(scheduler, "sigmas", None)
    expected = 1 / (1 + sigma[2].double() ** 2) if sigma is not None else scheduler.alphas_cumprod[scheduler.timesteps[2]]
    torch.testing.assert_close(host, expected.float().expand(3), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, expected",
    [
        (lambda m, a, o: o.sum().item() and None, "aten._local_scalar_dense (a read-back to the host)"),
        (lambda m, a, o: o * torch.tensor(0.5), "aten.mul mixes host and device tensors"),
        (lambda m, a, o: o * torch.tensor([0.5]).to(o.device), "aten._to_copy brings a host tensor to the device"),
        (lambda m, a, o: o * torch.tensor(0.5, device=o.device), "torch.tensor puts host data on the device"),
    ],
    ids=["item", "host-scalar", "host-copy", "host-data"],
)
def test_the_watch_catches_a_host_read_and_a_host_tensor(bad, expected):
    pipe = sagfast.enable(sd_pipeline(), backend="torch")
    pipe.unet.mid_block.register_forward_hook(bad)
    with meta_call(pipe) as call, host_watch() as watch:
        try:
            call.run_step("exact", meta_step(call, cfg_on=True))
        except RuntimeError:
            pass
    assert expected in watch.found


def graph_keys(pipe, monkeypatch, n=1, steps=3):
    """The CUDA-graph key of every guided step of one pipeline call (computed as `_graphed` does)."""
    keys = []
    run_step = GuidedCall.run_step

    def recording(self, variant, step):
        keys.append(StepGraphs.key(self.graph_variant(variant, step), self.graph_inputs(step)[0]))
        return run_step(self, variant, step)

    with monkeypatch.context() as m:
        m.setattr(GuidedCall, "run_step", recording)
        pe, ne = prompt_embeds(n)
        pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            height=48,
            width=40,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    return keys


@pytest.mark.parametrize("scheduler_cls", [None, EulerDiscreteScheduler], ids=["ddim", "euler"])
@pytest.mark.parametrize("mode, graphs", [("exact", 1), ("batched", 2)])
def test_one_graph_serves_every_step_and_every_rerun(scheduler_cls, mode, graphs, monkeypatch):
    pipe = sd_pipeline(**({} if scheduler_cls is None else {"scheduler_cls": scheduler_cls}))
    sagfast.enable(pipe, mode=mode)
    keys = graph_keys(pipe, monkeypatch)
    assert len(keys) == 3 and len(set(keys)) == graphs
    if mode == "batched":
        assert keys[0][0][0] == "exact" and {k[0][0] for k in keys[1:]} == {"batched"}
    assert graph_keys(pipe, monkeypatch) == keys  # a re-run replays the same graphs
    assert not set(graph_keys(pipe, monkeypatch, n=2)) & set(keys)  # another batch size captures its own


@pytest.mark.parametrize("mode, graphs", [("exact", 1), ("batched", 2)])
def test_one_graph_serves_every_step_of_adaptive_sag_plus_pag(mode, graphs, monkeypatch):
    # The adaptive PAG scale changes every step (0.001: still > 0 at the last step); it is an input of
    # the graph, not part of its key.
    pipe = sagfast.enable(sd_pipeline(), mode=mode, pag_scale=3.0, pag_adaptive_scale=0.001)
    keys = graph_keys(pipe, monkeypatch)
    assert len(keys) == 3 and len(set(keys)) == graphs
    both = (("sag", "pag"), ("sag", "pag"), False, False)  # (terms with rows, terms watching the main pass, ...)
    assert {k[0][1] for k in keys} == {both}  # every step runs both terms
    # Outside a term's interval the step is another graph (other rows), the same one at every such step.
    sagfast.enable(pipe, mode="exact", pag_scale=3.0, pag_interval=(0.0, 0.5))
    keys = graph_keys(pipe, monkeypatch, steps=4)
    sag_only = (("sag",), ("sag",), False, False)
    assert [k[0][1] for k in keys] == [both] * 2 + [sag_only] * 2 and len(set(keys)) == 2


def test_model_watch_sees_what_a_graph_bakes_in():
    unet = tiny_unet()
    watch = ModelWatch(unet)
    before = watch.fingerprint()
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, TOKENS, CROSS_DIM))
    assert watch.fingerprint() == before  # a forward changes nothing a graph reads
    unet.to(torch.float64)  # the weights move: every graph would read freed memory
    moved = watch.fingerprint()
    assert moved != before
    unet.set_attn_processor(AttnProcessor())  # other processors: the graphs would run the old ones
    assert watch.fingerprint() != moved
    assert watch.refusals() == []


def test_model_watch_sees_through_the_capture_switch():
    # The drop-in pipeline and `sagfast.guided` blocks put the capture switch on for their calls and
    # take it off after: its graphs must survive that (the processor it wraps is what they bake in).
    from sagfast.attention import capture

    pipe = sd_pipeline()
    watch = ModelWatch(pipe.unet)
    before = watch.fingerprint()
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    capture.install(attn, pipe.unet.mid_block.attentions[0])
    assert watch.fingerprint() == before
    capture.uninstall(pipe.unet)
    capture.install(attn, pipe.unet.mid_block.attentions[0])
    assert watch.fingerprint() == before
    attn.processor.inner = AttnProcessor()  # another processor under the switch: a graph would be stale
    assert watch.fingerprint() != before


def test_graphs_refuse_an_offloaded_model_once_with_the_reason():
    unet = tiny_unet()
    unet.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    graphs = StepGraphs(unet)
    never = lambda inputs: pytest.fail("a refused step must not be captured")  # noqa: E731
    with pytest.warns(RuntimeWarning, match="without a CUDA graph: the model has accelerate/diffusers hooks"):
        assert graphs.run(("exact",), never, {"sample": torch.zeros(1)}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not every step
        assert graphs.run(("exact",), never, {"sample": torch.zeros(1)}) is None
