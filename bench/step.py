"""Scenario "step": time per denoising step, sagfast against diffusers and against the floor.

Variants (all on one shared UNet with random weights, DDIM, guidance 7.5, batch B = --batch, default 1):
  (a) cfg          CFG only: the plain StableDiffusion(XL)Pipeline, one batch-2 model call per step
  (b) floor        CFG + one dummy batch-B model call per step: the practical floor for exact SAG
                   (exact SAG cannot avoid a second, dependent model call)
  cfg_graph, floor_graph  (a) and (b) with their model calls in a CUDA graph (CUDA only): the
                   baselines of the graphed sagfast variants
  (c) diffusers    diffusers' StableDiffusionSAGPipeline (SD 1.x/2.x only; none for SDXL)
  (d) exact        sagfast.enable(pipe, mode="exact")
  (e) batched      sagfast.enable(pipe, mode="batched")
  (g) pag          diffusers' PAG pipeline, pag_applied_layers=["mid"], pag_scale 3 (one batch-3B call)
  (h) interval     sagfast exact SAG with sag_interval=(0, 0.5): no degraded pass in the second half
  (i) sagfast PAG  sagfast.enable(pipe, scale=0, pag_scale=3): PAG alone, as (g)
  (j) (k)          sagfast SAG+PAG exact: [u, c, ptb] then [deg] (j), or [u, c] then [deg, ptb] (k)
  (l)              sagfast SAG+PAG batched: one call of [u, c, ptb, deg] (4B)
  *+graph          every sagfast variant with CUDA graphs (cuda_graph=True), on CUDA only
  (m)-(p)          sagfast SEG, APG, CFG-Zero*, SAG+PAG+SEG batched
  (f2)-(f4)        sagfast SAG with term refresh: exact with sag_refresh 2 and 3, batched with 2 (the
                   degraded rows every 2nd / 3rd step, the last difference reused between)
  (t1)-(t3)        sagfast TCFG, MAMBO-G, FDG: CFG rules, the combine only (2B rows, ~CFG's time)
  (z) (z2)         sagfast TPG alone (B more rows, in the main call), and SAG+PAG+TPG batched: one call
                   of [u, c, deg, ptb, tpg] (5B); TPG refuses CUDA graphs (a new permutation every step)
  (q) (r)          4 images with mixed settings in one call, and one call per image
  (s)-(y)          SDXL-shaped models only (tiny_xl, sdxl): diffusers' modular SDXL pipeline with a CFG,
                   PAG or sagfast SAG guider, its loop as diffusers runs it (one model call per
                   condition) and with `sagfast.modular.batch_guidance` ("joined"); the step is marked
                   at the scheduler's step (modular pipelines take no step callback)

Method: each variant runs the whole pipeline for `steps` steps with output_type="latent" (no VAE
decode). A step-end callback marks the time (perf_counter on CPU; a CUDA event on GPU, read after one
synchronize). The step time is the mean of the steady-state steps (steps 2..n: it leaves out step 1,
which carries the pipeline's set-up and, for the batched mode, its warm-start); with steps=1 it is
step 1. Variants are interleaved, a b c d e g a b c ..., over `rounds` rounds after warm-up; ratios
and differences are computed round by round and their median reported.
"""

from __future__ import annotations

import inspect
import statistics

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import sagfast
from bench import common, models
from sagfast.core.batch import slice_batch
from sagfast.engine.cuda_graph import graphs_of

SAGFAST = {
    "sagfast_exact": ("(d) sagfast exact", dict(mode="exact")),
    "sagfast_batched": ("(e) sagfast batched", dict(mode="batched")),
    "sagfast_sag_interval": ("(h) sagfast exact, sag_interval (0, 0.5)", dict(mode="exact", sag_interval=(0.0, 0.5))),
    "sagfast_pag": ("(i) sagfast PAG", dict(scale=0, pag_scale=3.0)),
    "sagfast_sag_pag_exact": ("(j) sagfast SAG+PAG exact [u,c,ptb]+[deg]", dict(mode="exact", pag_scale=3.0)),
    "sagfast_sag_pag_exact_degraded": (
        "(k) sagfast SAG+PAG exact [u,c]+[deg,ptb]",
        dict(mode="exact", pag_scale=3.0, exact_pag_pass="degraded"),
    ),
    "sagfast_sag_pag_batched": ("(l) sagfast SAG+PAG batched [u,c,deg,ptb]", dict(mode="batched", pag_scale=3.0)),
    "sagfast_seg": ("(m) sagfast SEG, infinite blur [u,c,seg]", dict(scale=0, seg_scale=3.0)),
    "sagfast_apg": ("(n) sagfast APG [u,c]", dict(scale=0, cfg_rule="apg", apg_eta=0.0)),
    "sagfast_cfg_zero_star": ("(o) sagfast CFG-Zero* [u,c]", dict(scale=0, cfg_rule="cfg_zero_star")),
    "sagfast_sag_pag_seg_batched": (
        "(p) sagfast SAG+PAG+SEG batched [u,c,deg,ptb,seg]",
        dict(mode="batched", pag_scale=3.0, seg_scale=3.0),
    ),
    "sagfast_sag_refresh2": ("(f2) sagfast exact, sag_refresh 2", dict(mode="exact", sag_refresh=2)),
    "sagfast_sag_refresh3": ("(f3) sagfast exact, sag_refresh 3", dict(mode="exact", sag_refresh=3)),
    "sagfast_batched_refresh2": ("(f4) sagfast batched, sag_refresh 2", dict(mode="batched", sag_refresh=2)),
    "sagfast_tcfg": ("(t1) sagfast TCFG [u,c]", dict(scale=0, cfg_rule="tcfg")),
    "sagfast_mambo": ("(t2) sagfast MAMBO-G [u,c]", dict(scale=0, cfg_rule="mambo")),
    "sagfast_fdg": ("(t3) sagfast FDG [u,c]", dict(scale=0, cfg_rule="fdg")),
    "sagfast_tpg": ("(z) sagfast TPG, mid block [u,c,tpg]", dict(scale=0, tpg_scale=3.0)),
    "sagfast_sag_pag_tpg_batched": (
        "(z2) sagfast SAG+PAG+TPG batched [u,c,deg,ptb,tpg]",
        dict(mode="batched", pag_scale=3.0, tpg_scale=3.0),
    ),
}
"""sagfast variants: (label, SAGConfig fields; SAG scale 0.75 unless given)."""

MIXED = 4
MIXED_SETTINGS = dict(cfg_scale=[1.0, 3.0, 5.0, 7.5], scale=[0.0, 0.5, 0.75, 1.0], pag_scale=[0.0, 1.0, 2.0, 3.0])
"""The per-image rows: MIXED images whose settings all differ (image 0 without any guidance), one
call with per-image fields vs one call per image with that image's scalars (exact mode)."""

MODULAR = {
    "modular_cfg": "(s) modular SDXL, CFG guider [c]+[u]",
    "modular_cfg_joined": "(t) modular SDXL, CFG guider, batch_guidance [c,u]",
    "modular_pag": "(u) modular SDXL, PAG guider [c]+[u]+[ptb]",
    "modular_pag_joined": "(v) modular SDXL, PAG guider, batch_guidance [c,u,ptb]",
    "modular_sag": "(w) modular SDXL, SAG guider exact [c]+[u]+[deg]",
    "modular_sag_joined": "(x) modular SDXL, SAG guider exact, batch_guidance [c,u]+[deg]",
    "modular_sag_batched_mode_joined": "(y) modular SDXL, SAG guider batched, batch_guidance [c,u,deg]",
}
"""The modular rows; a name without "_joined" runs diffusers' loop as it is."""

LABELS = {
    "cfg": "(a) CFG only",
    "floor": "(b) CFG + dummy batch-B call (floor)",
    "cfg_graph": "(a) CFG only + CUDA graph",
    "floor_graph": "(b) floor + CUDA graph",
    "diffusers_sag": "(c) diffusers SAG pipeline",
    "pag": "(g) diffusers PAG (mid)",
    "mixed_one_call": f"(q) {MIXED} images, mixed settings, one sagfast call",
    "mixed_separate": f"(r) {MIXED} images, the same settings, one call each",
    **{name: label for name, (label, _) in SAGFAST.items()},
    **{name + "_graph": label + " + CUDA graph" for name, (label, _) in SAGFAST.items()},
    **MODULAR,
}


class BaselineUNet(torch.nn.Module):
    """The baselines in place of the pipeline's UNet. `extra_call`: variant (b), the pipeline's own model
    call, then one more call on the first B rows (the guide branch) whose output is thrown away: what
    exact SAG costs if everything outside the model is free. `graphed`: (a) or (b) captured in a CUDA
    graph per input shape (sagfast's graph cache), so that graphed SAG is compared with graphed CFG
    rather than with an eager step's launch overhead."""

    def __init__(self, unet, extra_call: bool, graphed: bool = False):
        super().__init__()
        self.unet = unet
        self.extra_call = extra_call
        self.graphed = graphed
        self._signature = inspect.signature(unet.forward)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def _step(self, call: dict) -> torch.Tensor:
        call = dict(call)
        sample = call.pop("sample")
        out = self.unet(sample, **call, return_dict=False)[0]
        if self.extra_call:
            full = sample.shape[0]
            b = full // 2 if full % 2 == 0 else full
            self.unet(sample[:b], **slice_batch(call, full, slice(0, b)), return_dict=False)
        return out

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {})
        return_dict = call.pop("return_dict", True)
        out = None
        if self.graphed:
            device = call["sample"].device
            call["timestep"] = torch.as_tensor(call["timestep"], device=device)  # one graph for every step
            out = graphs_of(self.unet).run(("baseline", self.extra_call), self._step, call)
        if out is None:
            out = self._step(call)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def graph_supported(device) -> tuple[bool, str]:
    """Whether CUDA-graph variants can run on `device` (and why not)."""
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device (no CUDA here)"
    return True, ""


class PipelineRunner:
    """Calls a pipeline for `steps` steps and returns the steady-state seconds per step."""

    def __init__(self, pipe, kwargs: dict, steps: int, device, old_callback: bool):
        self.pipe = pipe
        self.kwargs = kwargs
        self.steps = steps
        self.device = device
        self.old_callback = old_callback
        self.first_steps = []
        self.peak_bytes = []  # CUDA only: torch.cuda.max_memory_allocated over each call

    def __call__(self) -> float:
        clock = common.StepClock(self.device)
        kw = dict(self.kwargs)
        if self.old_callback:  # diffusers' deprecated SAG pipeline: callback(step, t, latents)
            kw.update(callback=lambda *a: clock.mark(), callback_steps=1)
        else:

            def on_step_end(pipe, i, t, cb_kwargs):
                clock.mark()
                return cb_kwargs

            kw.update(callback_on_step_end=on_step_end)
        kw["generator"] = torch.Generator(device=self.device).manual_seed(0)
        common.sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        clock.mark()
        with torch.inference_mode():
            self.pipe(num_inference_steps=self.steps, output_type="latent", **kw)
        if self.device.type == "cuda":
            self.peak_bytes.append(torch.cuda.max_memory_allocated(self.device))
        return self.steady(clock)

    def steady(self, clock) -> float:
        """The mean of the call's steady-state steps (steps 2..n) from its step marks."""
        steps = clock.intervals()
        if len(steps) != self.steps:
            raise RuntimeError(f"expected {self.steps} step marks, got {len(steps)}")
        self.first_steps.append(steps[0])
        steady = steps[1:] or steps
        return sum(steady) / len(steady)


class ModularRunner(PipelineRunner):
    """Calls a modular pipeline for `steps` steps; the step is marked when its scheduler steps (a
    modular pipeline takes no step-end callback)."""

    def __call__(self) -> float:
        clock = common.StepClock(self.device)
        scheduler = self.pipe.scheduler

        def step(*args, **kwargs):
            out = type(scheduler).step(scheduler, *args, **kwargs)
            clock.mark()
            return out

        scheduler.step = step  # an instance attribute for this call only: the class's method stays
        common.sync(self.device)
        clock.mark()
        try:
            with torch.inference_mode():
                self.pipe(num_inference_steps=self.steps, output="latents", **self.kwargs)
        finally:
            del scheduler.step
        return self.steady(clock)


def modular_guider(name: str, pipe):
    """The guider of a modular row (guidance 7.5 as the other rows; PAG 3 and SAG 0.75 on "mid")."""
    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig

    from sagfast.guiders import SelfAttentionGuidance

    if name.startswith("modular_cfg"):
        return ClassifierFreeGuidance(guidance_scale=7.5)
    if name.startswith("modular_pag"):
        mid = LayerSkipConfig(
            indices=[0], fqn="mid_block.attentions.0.transformer_blocks", skip_attention=False, skip_attention_scores=True
        )
        return PerturbedAttentionGuidance(
            guidance_scale=7.5,
            perturbed_guidance_scale=3.0,
            perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0,
            perturbed_guidance_config=mid,
        )
    mode = "batched" if "batched_mode" in name else "exact"
    return SelfAttentionGuidance(guidance_scale=7.5, sag_scale=0.75, mode=mode).bind(pipe)


def modular_pipeline(name: str, spec, unet, device, dtype, vae: str):
    """diffusers' modular SDXL pipeline (its text-encoder, IP-adapter and decode blocks dropped: it takes
    embeddings and returns latents) on the bench's UNet, with the row's guider."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from sagfast.modular import batch_guidance

    blocks = StableDiffusionXLAutoBlocks()
    for block in ("text_encoder", "ip_adapter", "decode"):
        blocks.sub_blocks.pop(block)
    pipe = blocks.init_pipeline()
    pipe.update_components(unet=unet, vae=models.build_vae(vae, device, dtype), scheduler=models.scheduler())
    pipe.update_components(guider=modular_guider(name, pipe))
    pipe.set_progress_bar_config(disable=True)
    return batch_guidance(pipe) if name.endswith("_joined") else pipe


class SeparateCalls:
    """One pipeline call per image, one after another: the seconds of one step of all of them."""

    def __init__(self, runners: list):
        self.runners = runners
        self.first_steps = []
        self.peak_bytes = []

    def __call__(self) -> float:
        total = sum(runner() for runner in self.runners)
        self.first_steps.append(sum(r.first_steps[-1] for r in self.runners))
        self.peak_bytes += [max(r.peak_bytes) for r in self.runners if r.peak_bytes][:1]
        return total


def build_variants(
    spec, size: int, steps: int, device, dtype, wanted: list | None, log, vae: str = "stub", batch: int = 1
) -> tuple[dict, dict, dict]:
    """(runners, skipped {name: reason}, info). `vae`: "stub" (never decoded) or "sd" (bench.models)."""
    classes = models.sd_pipeline_classes(spec)
    log(f"building {spec.name} UNet ({device}, {dtype}) ...")
    unet = models.build_unet(spec, device, dtype)
    info = {"unet_params_M": round(models.count_params(unet) / 1e6, 1)}
    call = dict(models.prompt_kwargs(spec, device, dtype), height=size, width=size, guidance_scale=7.5, num_images_per_prompt=batch)
    runners, skipped = {}, {}
    want = lambda n: wanted is None or n in wanted  # noqa: E731

    def pipe_of(cls, **extra):
        pipe = cls(**models.components(spec, device, dtype, vae=vae, unet=unet), **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    gok, gwhy = graph_supported(device)
    if want("cfg"):
        runners["cfg"] = PipelineRunner(pipe_of(classes["base"]), call, steps, device, False)
    for name, extra_call, graphed in (("floor", True, False), ("cfg_graph", False, True), ("floor_graph", True, True)):
        if not want(name):
            continue
        if graphed and not gok:
            skipped[name] = gwhy
            continue
        pipe = pipe_of(classes["base"])
        pipe.__dict__["unet"] = BaselineUNet(unet, extra_call, graphed)  # as sagfast.enable does: leave pipe.config alone
        runners[name] = PipelineRunner(pipe, call, steps, device, False)
    if want("diffusers_sag"):
        if classes["sag"] is None:
            skipped["diffusers_sag"] = "diffusers' SAG pipeline supports SD 1.x/2.x only"
        else:
            runners["diffusers_sag"] = PipelineRunner(pipe_of(classes["sag"]), dict(call, sag_scale=0.75), steps, device, True)
    modes = [(name, config) for name, (_, config) in SAGFAST.items()]
    for name, cfg in list(modes):
        if gok:
            modes.append((name + "_graph", dict(cfg, cuda_graph=True)))
        elif want(name + "_graph"):
            skipped[name + "_graph"] = gwhy
    for name, cfg in modes:
        if not want(name):
            continue
        pipe = pipe_of(classes["base"])
        try:
            sagfast.enable(pipe, **dict(dict(scale=0.75), **cfg))
        except Exception as exc:
            skipped[name] = f"error: sagfast.enable failed: {type(exc).__name__}: {exc}"
            continue
        runners[name] = PipelineRunner(pipe, call, steps, device, False)
    if want("mixed_one_call"):
        pipe = pipe_of(classes["base"])
        sagfast.enable(pipe, **MIXED_SETTINGS)
        runners["mixed_one_call"] = PipelineRunner(pipe, dict(call, num_images_per_prompt=MIXED), steps, device, False)
    if want("mixed_separate"):
        separate = []
        for i in range(MIXED):
            pipe = pipe_of(classes["base"])
            sagfast.enable(pipe, scale=MIXED_SETTINGS["scale"][i], pag_scale=MIXED_SETTINGS["pag_scale"][i])
            one = dict(call, num_images_per_prompt=1, guidance_scale=MIXED_SETTINGS["cfg_scale"][i])
            separate.append(PipelineRunner(pipe, one, steps, device, False))
        runners["mixed_separate"] = SeparateCalls(separate)
    for name in MODULAR:
        if not want(name):
            continue
        if not spec.xl:
            if wanted is not None:
                skipped[name] = f"the modular SDXL pipeline needs an SDXL-shaped UNet (--models tiny_xl or sdxl), not {spec.name}"
            continue
        pipe = modular_pipeline(name, spec, unet, device, dtype, vae)
        modular_call = {k: v for k, v in call.items() if k != "guidance_scale"}  # the guider holds the scale
        runners[name] = ModularRunner(pipe, modular_call, steps, device, False)
    if want("pag"):
        runners["pag"] = PipelineRunner(
            pipe_of(classes["pag"], pag_applied_layers=["mid"]), dict(call, pag_scale=3.0), steps, device, False
        )
    return runners, skipped, info


def _median_diff(a, b):
    n = min(len(a), len(b))
    return statistics.median([(a[i] - b[i]) * 1e3 for i in range(n)]) if n else None


def plan(opts, device) -> list:
    """[(model name, image size, steps, rounds)] for this run."""
    cuda = device.type == "cuda"
    names = models.default_names(opts, cuda)
    if not opts.models:  # the modular rows' SDXL-shaped model, next to the tiny one
        names = [*names[:1], "tiny_xl", *names[1:]]
    out = []
    for name in names:
        spec = models.MODELS[name]
        if name in ("tiny", "tiny_xl"):
            size, steps, rounds = spec.default_size, 5, (7 if opts.quick else 11)
        elif name == "sd15":
            size, steps, rounds = (512, 10, 5) if cuda else (256, 2, 5)
        else:
            size, steps, rounds = (1024, 10, 5) if cuda else (512, 2, 2)
        size = opts.size or size
        steps = opts.steps or steps
        rounds = opts.rounds or rounds
        if cuda and name in ("tiny", "tiny_xl"):
            steps = opts.steps or 10
        out.append((name, size, steps, rounds))
    return out


def run(opts, record: dict, log=common.log) -> dict:
    device, dtype = opts.device, opts.dtype
    rows, notes, raw = [], [], {}
    warmup = opts.warmup if opts.warmup is not None else (2 if device.type == "cuda" else 1)
    for name, size, steps, rounds in plan(opts, device):
        spec = models.MODELS[name]
        # The tiny SDXL-shaped model is there for the modular rows (and CFG, their baseline).
        wanted = opts.variants or (["cfg", *MODULAR] if name == "tiny_xl" else None)
        runners, skipped, info = build_variants(spec, size, steps, device, dtype, wanted, log, batch=opts.batch)
        log(f"step: {name} {size}x{size}, {steps} steps, {rounds} rounds + {warmup} warm-up: {list(runners)}")
        samples = common.interleave(runners, rounds, warmup, log)
        raw[name] = {
            "samples_s": samples,
            "first_step_s": {k: r.first_steps for k, r in runners.items()},
            "peak_bytes": {k: r.peak_bytes for k, r in runners.items()},
            **info,
        }
        for key in LABELS:
            # A graphed variant's baselines are the graphed CFG and floor when they ran.
            graphed = key.endswith("_graph") and isinstance(samples.get("cfg_graph"), list)
            base = samples.get("cfg_graph" if graphed else "cfg")
            base = base if isinstance(base, list) else None
            floor = samples.get("floor_graph" if key.endswith("_graph") else "floor")
            floor = floor if isinstance(floor, list) else None
            row = {
                "model": name,
                "batch": opts.batch,
                "image": f"{size}x{size}",
                "latent": f"{size // 8}x{size // 8}",
                "steps": steps,
                "variant": LABELS[key],
                "key": key,
            }
            row, summ = common.variant_status(row, key, samples, skipped)
            if summ is None:
                rows.extend([row] if row is not None else [])
                continue
            s = samples[key]
            row.update(
                ms_per_step=summ["median"],
                p25_ms=summ["p25"],
                p75_ms=summ["p75"],
                min_ms=summ["min"],
                max_ms=summ["max"],
                rounds=summ["n"],
                first_step_ms=statistics.median(runners[key].first_steps[-len(s) :]) * 1e3,
                status="ok",
            )
            if runners[key].peak_bytes:
                row.update(peak_MiB=max(runners[key].peak_bytes) / 2**20)
            if base:
                r = common.paired_ratio(s, base)
                row.update(x_cfg=r["median"], x_cfg_min=r["min"], x_cfg_max=r["max"])
            if key == "mixed_one_call" and isinstance(samples.get("mixed_separate"), list):
                row.update(x_separate=common.paired_ratio(s, samples["mixed_separate"])["median"])
            unjoined = samples.get(key.replace("_batched_mode", "").removesuffix("_joined"))
            if key.endswith("_joined") and isinstance(unjoined, list):
                row.update(x_separate=common.paired_ratio(s, unjoined)["median"])
            if floor and key.startswith("sagfast"):
                row.update(
                    over_floor_ms=_median_diff(s, floor),
                    x_floor=common.paired_ratio(s, floor)["median"],
                )
            rows.append(row)
        del runners
    notes += [
        "ms/step: median over interleaved rounds of the mean steady-state step (steps 2..n of one pipeline call, "
        "output_type='latent'); p25-p75 is the spread over rounds.",
        "x CFG: median of per-round ratios to (a) in the same run; over floor: median of per-round differences "
        "to (b), i.e. what sagfast exact adds outside the model calls (Python, capture, mask, degrade, combine); "
        "(b) is the floor of exact SAG only: batched mode makes one larger call per step and can go below it.",
        "A '+ CUDA graph' variant's x CFG and over floor are to (a) and (b) + CUDA graph of the same run.",
        f"Random weights, DDIM, guidance 7.5, batch {opts.batch}, dtype {str(dtype).replace('torch.', '')}.",
        f"(q)/(r): {MIXED} images with per-image settings {MIXED_SETTINGS} (image 0: no CFG, no SAG, no PAG); "
        "(q) is one call with per-image fields, (r) one call per image with its scalars, timed as the sum of their "
        "steps; x separate: median per-round ratio (q)/(r). Their x CFG is to (a) at the run's batch.",
        "Modular rows (SDXL-shaped models): x CFG is to (a), the standard pipeline's one [u, c] call; a joined row's "
        "x separate is its ratio to the same guider without batch_guidance ((y): to (w), exact SAG unjoined).",
    ]
    return {
        "title": "Step time per mode",
        "rows": rows,
        "notes": notes,
        "raw": raw,
        "columns": [
            ("model", "model"),
            ("image", "image"),
            ("variant", "variant"),
            ("ms_per_step", "ms/step (median)"),
            ("p25_ms", "p25"),
            ("p75_ms", "p75"),
            ("min_ms", "min"),
            ("x_cfg", "x CFG"),
            ("over_floor_ms", "over floor (ms)"),
            ("x_separate", "x separate"),
            ("status", "status"),
        ],
        "plots": [("step.png", lambda plt: _plot(plt, rows))],
    }


def _plot(plt, rows):
    ok = [r for r in rows if r.get("status") == "ok"]
    model_names = list(dict.fromkeys(r["model"] for r in ok))
    fig, axes = plt.subplots(1, max(1, len(model_names)), figsize=(5 * max(1, len(model_names)), 4), squeeze=False)
    for ax, m in zip(axes[0], model_names):
        rs = [r for r in ok if r["model"] == m]
        labels = [r["variant"] for r in rs]
        med = [r["ms_per_step"] for r in rs]
        err = [[r["ms_per_step"] - r["p25_ms"] for r in rs], [r["p75_ms"] - r["ms_per_step"] for r in rs]]
        ax.barh(range(len(rs)), med, xerr=err, color="tab:blue")
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (median, p25-p75)")
        ax.set_title(f"{m} {rs[0]['image']}")
    return fig
