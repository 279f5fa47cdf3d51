"""The noise level of a step, and x0 / eps of a model output, from a diffusers scheduler.

Every diffusers scheduler hands the model a variance-preserving input
`x = sqrt(abar) * x0 + sqrt(1 - abar) * eps`; sigma-based schedulers (Euler, Heun, LMS, DPM-Solver,
UniPC, DEIS) get there by dividing by sqrt(sigma^2 + 1), so `abar = 1 / (1 + sigma^2)` with sigma the
one their `scale_model_input` used. Schedulers without sigmas (DDIM, PNDM, DDPM) use
`alphas_cumprod[t]`.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def schedule_problems(scheduler) -> list:
    """Reasons this scheduler gives SAG no usable variance-preserving noise schedule (empty if fine)."""
    name = type(scheduler).__name__
    problems = []
    if getattr(scheduler, "alphas_cumprod", None) is None:
        problems.append(f"{name} has no alphas_cumprod (not a variance-preserving DDPM-type schedule)")
    if getattr(scheduler.config, "use_flow_sigmas", False):
        problems.append(f"{name} is configured with use_flow_sigmas=True (a flow-matching schedule)")
    pred = getattr(scheduler.config, "prediction_type", None)
    if pred not in PREDICTION_TYPES:
        problems.append(f"{name} has prediction_type={pred!r}; accepted: {PREDICTION_TYPES}")
    return problems


def check_scheduler(scheduler) -> None:
    problems = schedule_problems(scheduler)
    if problems:
        raise ValueError("SAG needs a scheduler with a usable noise schedule: " + "; ".join(problems))


def _current_sigma(scheduler, timestep):
    """The sigma scale_model_input used for this call, or None for schedulers without sigmas."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or not hasattr(scheduler, "index_for_timestep"):
        return None
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    if index is None:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.reshape(-1)[0].to(scheduler.timesteps.device)
        index = scheduler.index_for_timestep(t)
    # KDPM2's second-order evaluations run at the interpolated sigma (Heun's sigmas are interleaved).
    if getattr(scheduler, "state_in_first_order", True) is False and hasattr(scheduler, "sigmas_interpol"):
        sigmas = scheduler.sigmas_interpol
    return sigmas[index]


# (id of an alphas_cumprod, device) -> (that tensor, its copy on the device). Holding the tensor keeps
# its id from being reused; a few entries serve pipelines that alternate without copying every step.
_DEVICE_TABLES: dict = {}


def _table_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (id(table), device)
    cached = _DEVICE_TABLES.get(key)
    if cached is None:
        if len(_DEVICE_TABLES) >= 8:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))
        cached = _DEVICE_TABLES[key] = (table, table.to(device))
    return cached[1]


def alpha_bar(scheduler, timestep, batch: int, device) -> torch.Tensor:
    """abar of this step as a [batch] fp32 tensor on `device`.

    Nothing here waits for the GPU: sigmas are read on the host (diffusers keeps them there) and the
    value is written with a fill, not copied from host memory (a synchronizing copy); a timestep on
    the GPU indexes a copy of `alphas_cumprod` on the GPU instead of being read back.
    """
    device = torch.device(device)
    sigma = _current_sigma(scheduler, timestep)
    if sigma is not None:
        abar = 1.0 / (1.0 + sigma.double() ** 2)
    else:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        table = scheduler.alphas_cumprod
        # index_select, not table[t]: indexing with a 0-d tensor reads it back as a Python int.
        abar = _table_on(table, t.device).index_select(0, t.reshape(-1)[:1].long())
    if abar.device.type == "cpu" and device.type != "cpu":
        return torch.full((batch,), abar.item(), dtype=torch.float32, device=device)
    return abar.to(device=device, dtype=torch.float32).reshape(1).expand(batch).contiguous()


def x0_eps(x: torch.Tensor, out: torch.Tensor, abar: torch.Tensor, prediction_type: str):
    """x0 and eps of the model output `out` at input `x` (no clipping), in fp32."""
    a = abar.float().view(-1, *([1] * (x.dim() - 1)))
    sa, sb = a.sqrt(), (1 - a).sqrt()
    x, out = x.float(), out.float()
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sb * x + sa * out
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
