"""Records every call of a UNet (inputs and outputs) and the capture layer's input, with hooks."""

from __future__ import annotations

import contextlib


class UNetRecorder:
    def __init__(self, unet, attn, scheduler):
        self.calls = []
        self.attn_inputs = []
        self.scheduler = scheduler
        self.scaled = None  # (input, output) of the scheduler's latest scale_model_input
        original = scheduler.scale_model_input

        def scale_model_input(sample, *args, **kwargs):
            out = original(sample, *args, **kwargs)
            self.scaled = (sample, out)
            return out

        scheduler.scale_model_input = scale_model_input  # observed, not changed; removed by remove()
        self.handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.register_forward_hook(self._post, with_kwargs=True),
            attn.register_forward_pre_hook(self._attn, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        sched = self.scheduler
        index = getattr(sched, "step_index", None)
        if index is None:
            index = 0  # multistep schedulers set step_index in their first step(); text-to-image starts at 0
        sigma = sched.sigmas[index].item() if getattr(sched, "sigmas", None) is not None else None
        # The sigma the input was really scaled with, from what scale_model_input did to it
        # (x / sqrt(sigma^2 + 1)): right for schedulers that interpolate sigmas (KDPM2) too. Schedulers
        # that keep x in variance-preserving form (DPM-Solver) return it unscaled: then the step's sigma.
        input_sigma = sigma
        if sigma is not None and self.scaled is not None and self.scaled[1] is not self.scaled[0]:
            ratio = self.scaled[0].double().abs().mean() / self.scaled[1].double().abs().mean()
            input_sigma = max(ratio.item() ** 2 - 1, 0.0) ** 0.5
        self.calls.append({"sample": sample.detach().clone(), "kwargs": kwargs, "sigma": sigma, "input_sigma": input_sigma})

    def _post(self, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls[-1]["out"] = out.detach().clone()

    def _attn(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.attn_inputs.append(hidden.detach().clone())

    def remove(self):
        for h in self.handles:
            h.remove()
        del self.scheduler.scale_model_input


@contextlib.contextmanager
def recording(pipe):
    """Record the calls of an enabled pipeline's UNet (and its capture layer's inputs) inside the block."""
    inner = pipe.unet
    rec = UNetRecorder(inner, inner.mid_block.attentions[0].transformer_blocks[0].attn1, pipe.scheduler)
    try:
        yield rec
    finally:
        rec.remove()


def check_joined_cfg(pipe, run, images: int, w: float, s: float, mode: str, steps: int) -> None:
    """A pipeline that runs CFG as two calls per step (cond, then uncond), enabled with SAG scale `s`:
    whatever sagfast hands each call, the prediction the scheduler receives at every step must be
    u + w * (c - u) + s * (u - o_deg), from the rows of the joined [uncond, cond] call (and its
    degraded rows: the next call in exact mode, the call's last rows in batched mode). `run()` makes
    the pipeline call; `images` per branch."""
    outs, predictions = [], []
    handle = pipe.transformer.register_forward_hook(lambda m, a, k, out: outs.append(out[0].clone()), with_kwargs=True)
    step = pipe.scheduler.step

    def record(noise_pred, *args, **kwargs):
        predictions.append(noise_pred.clone())
        return step(noise_pred, *args, **kwargs)

    pipe.scheduler.step = record
    try:
        run()
    finally:
        handle.remove()
        del pipe.scheduler.step
    sizes = [o.shape[0] // images for o in outs]
    # Step 1: the cond call alone, the joined batch, its degraded rows; then the joined step only.
    assert sizes == [1, 2, 1] + ([2, 1] if mode == "exact" else [3]) * (steps - 1)
    joined = [1] + [3 + (2 if mode == "exact" else 1) * i for i in range(steps - 1)]
    seen = 0.0
    for i, at in enumerate(joined):
        u, c = outs[at][:images].double(), outs[at][images : 2 * images].double()
        degraded = (outs[at + 1] if sizes[at] == 2 else outs[at][2 * images :]).double()
        want = u + w * (c - u) + s * (u - degraded)
        assert (predictions[i].double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        seen = max(seen, (want - (u + w * (c - u))).abs().max().item())
    assert seen > 1e-3  # SAG's term is there (at sigma = 1 the degraded input is x itself: none)
