"""The noise level of a step, and x0 / eps of a model output, from a diffusers scheduler.

One parametrization for every family: the model input is `x = a * x0 + b * eps` (`Noise`).

- Variance preserving (DDPM-type schedules): `a = sqrt(abar)`, `b = sqrt(1 - abar)`. Every such
  diffusers scheduler hands the model that input; sigma-based schedulers (Euler, Heun, LMS, DPM-Solver,
  UniPC, DEIS) get there by dividing by sqrt(sigma^2 + 1), so `abar = 1 / (1 + sigma^2)` with sigma the
  one their `scale_model_input` used. Schedulers without sigmas (DDIM, PNDM, DDPM) use
  `alphas_cumprod[t]`.
- Flow matching (FlowMatchEulerDiscreteScheduler and kin, `use_flow_sigmas=True`): `a = 1 - sigma`,
  `b = sigma`, and the model predicts the velocity `v = eps - x0`, so `x0 = x - b * v` and
  `eps = x + a * v` (a + b = 1).

The ops take the variance-preserving form (`abar`); a flow input is that form scaled by
`r = sqrt(a^2 + b^2)` with `abar = a^2 / r^2` (`Noise.abar`, `Noise.scale`), exact and division free.
"""

from __future__ import annotations

import dataclasses

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = (None, "flow_prediction")
"""What a flow-matching scheduler's `prediction_type` may be: FlowMatch* schedulers have none, the
flow variants of DPM-Solver and UniPC say "flow_prediction"; both mean the velocity `eps - x0`."""


def is_flow(scheduler) -> bool:
    """Whether `scheduler` runs a flow-matching (rectified flow) schedule."""
    return type(scheduler).__name__.startswith("FlowMatch") or bool(getattr(scheduler.config, "use_flow_sigmas", False))


def prediction_of(scheduler) -> str:
    """What the model predicts: "flow" (the velocity) or the scheduler's VP prediction type."""
    return "flow" if is_flow(scheduler) else scheduler.config.prediction_type


@dataclasses.dataclass
class Noise:
    """x = a * x0 + b * eps, per sample: [B] fp32 tensors on the model's device."""

    a: torch.Tensor
    b: torch.Tensor
    abar: torch.Tensor
    """a^2 / (a^2 + b^2): the variance-preserving noise level the ops take."""
    scale: torch.Tensor | None
    """sqrt(a^2 + b^2), by which the ops' output is scaled; None where it is 1 (VP)."""


def schedule_problems(scheduler) -> list:
    """Reasons this scheduler gives SAG no usable noise schedule (empty if fine)."""
    name = type(scheduler).__name__
    pred = getattr(scheduler.config, "prediction_type", None)
    if is_flow(scheduler):
        problems = []
        if getattr(scheduler, "sigmas", None) is None or not hasattr(scheduler, "index_for_timestep"):
            problems.append(f"{name} has no sigmas to read the step's noise level from")
        if pred not in FLOW_PREDICTION_TYPES:
            problems.append(
                f"{name} is a flow-matching schedule with prediction_type={pred!r}; accepted: the velocity (no prediction_type, or 'flow_prediction')"
            )
        return problems
    problems = []
    if getattr(scheduler, "alphas_cumprod", None) is None:
        problems.append(
            f"{name} has no alphas_cumprod and is not a flow-matching schedule (accepted: DDPM-type schedules and FlowMatch* schedulers)"
        )
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


def evaluation_index(scheduler, timestep) -> int:
    """Where this model evaluation is in `scheduler.timesteps`: the scheduler's own `step_index` where it
    keeps one (a Heun-type scheduler lists both evaluations of a step, `scheduler.order` = 2), else
    the position of `timestep` in the schedule (DDIM, DDPM: one entry per step)."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    if index is not None:
        return int(index)
    t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
    return int((scheduler.timesteps.detach().to("cpu", torch.float64) - t).abs().argmin())


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


def noise_of(scheduler, timestep, batch: int, device) -> Noise:
    """The (a, b) of this step for `scheduler`'s kind of schedule."""
    if is_flow(scheduler):
        sigma = _current_sigma(scheduler, timestep)
        s = torch.full((batch,), float(sigma), dtype=torch.float32, device=device)
        a, b = 1 - s, s
        r2 = a * a + b * b
        return Noise(a, b, a * a / r2, r2.sqrt())
    return vp_noise(alpha_bar(scheduler, timestep, batch, device))


def vp_noise(abar: torch.Tensor) -> Noise:
    """The variance-preserving (a, b) = (sqrt(abar), sqrt(1 - abar))."""
    abar = abar.float()
    return Noise(abar.sqrt(), (1 - abar).sqrt(), abar, None)


def x0_eps(x: torch.Tensor, out: torch.Tensor, noise: Noise, prediction_type: str):
    """x0 and eps of the model output `out` at input `x` (no clipping), in fp32."""
    view = (-1, *([1] * (x.dim() - 1)))
    sa, sb = noise.a.float().view(view), noise.b.float().view(view)
    x, out = x.float(), out.float()
    if prediction_type == "flow":
        return x - sb * out, x + sa * out
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sb * x + sa * out
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    raise ValueError(f"prediction_type must be 'flow' or one of {PREDICTION_TYPES}; got {prediction_type!r}")
