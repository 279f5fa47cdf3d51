"""Scenario "overhead": what SAG adds outside the model calls, per backend, against the model calls.

Per model, one forward pass records the capture layer's real input (the mid block's first
self-attention, [2B, N, C] under CFG) and the map's (h, w). Then, on exactly the shapes one exact-SAG
step produces (batch B = 1, CFG on), these are timed, all interleaved round by round:

  capture   the capture layer called with sagfast's SAGCaptureProcessor(backend) minus the same layer
            with its stock processor (the extra: SDPA's log-sum-exp + attention mass of the guide rows);
            attention_mass alone is listed too
  x0/eps    sagfast.core.schedule.x0_eps (plain PyTorch; no backends)
  mask      sagfast.ops.sag_mask_ref (threshold + reshape; no backends)
  degrade   sagfast.ops.degrade(backend): blur, mask, blend, re-noise
  combine   sagfast.ops.combine(backend)
  model     the UNet's main call (batch 2B) and degraded call (batch B)

Backends: "torch", "cpp", "triton" — each as an explicit `backend=` (which never falls back); a
backend that refuses the inputs or is not built is listed as skipped with its reason. Each op sample
repeats the op back to back for >= min_sample_s and divides (CUDA events + synchronize on GPU).
"""

from __future__ import annotations

import statistics

import torch

from bench import common, models

BACKENDS = ("torch", "cpp", "triton")


def _capture_inputs(unet, spec, size, device, dtype):
    from sagfast.families.unet import UNetFamily

    name, attn, owner, _ = UNetFamily().resolve_layer(unet, "mid")
    seen = {}

    def on_attn(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def on_owner(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen["hw"] = tuple(h.shape[-2:])

    lat = size // 8
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    call = dict(models.prompt_kwargs(spec, device, dtype))
    enc = torch.cat([call["negative_prompt_embeds"], call["prompt_embeds"]])
    kw = {}
    if spec.xl:
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.cat([call["negative_pooled_prompt_embeds"], call["pooled_prompt_embeds"]]),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype),
        }
    h1 = attn.register_forward_pre_hook(on_attn, with_kwargs=True)
    h2 = owner.register_forward_pre_hook(on_owner, with_kwargs=True)
    try:
        with torch.inference_mode():
            unet(sample, 500, encoder_hidden_states=enc, **kw)
    finally:
        h1.remove()
        h2.remove()
    model_main = lambda: unet(sample, 500, encoder_hidden_states=enc, **kw)  # noqa: E731
    kw1 = {k: {kk: vv[:1] for kk, vv in v.items()} for k, v in kw.items()}
    model_deg = lambda: unet(sample[:1], 500, encoder_hidden_states=enc[:1], **kw1)  # noqa: E731
    return name, attn, seen["hidden"], seen["hw"], model_main, model_deg


def _probe(fn):
    try:
        with torch.inference_mode():
            fn()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def plan(opts, device):
    cuda = device.type == "cuda"
    names = models.default_names(opts, cuda)
    out = []
    for n in names:
        spec = models.MODELS[n]
        size = opts.size or (spec.default_size if (cuda or n == "tiny") else (256 if n == "sd15" else 512))
        rounds = opts.rounds or (5 if opts.quick else 7)
        out.append((n, size, rounds))
    return out


def run(opts, record: dict, log=common.log) -> dict:
    from sagfast import ops
    from sagfast.attention.lse import sdpa_with_lse
    from sagfast.attention.processors import SAGCaptureProcessor
    from sagfast.core.schedule import vp_noise, x0_eps

    device, dtype = opts.device, opts.dtype
    min_sample = 0.01 if opts.quick else 0.05
    warmup = opts.warmup if opts.warmup is not None else 1
    rows, notes, raw = [], [], {}
    for name, size, rounds in plan(opts, device):
        spec = models.MODELS[name]
        log(f"overhead: building {name} ...")
        unet = models.build_unet(spec, device, dtype)
        layer, attn, hidden, hw, model_main, model_deg = _capture_inputs(unet, spec, size, device, dtype)
        b = 1
        lat = size // 8
        g = torch.Generator().manual_seed(2)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        x, o_full, o_deg = rnd(b, 4, lat, lat), rnd(2 * b, 4, lat, lat), rnd(b, 4, lat, lat)
        abar = torch.full((b,), 0.5, device=device)
        x0, eps = x0_eps(x, o_full[:b], vp_noise(abar), "epsilon")
        x0, eps = x0.to(dtype), eps.to(dtype)
        heads = attn.heads
        guide = hidden[:b]
        q = attn.to_q(guide).view(b, -1, heads, attn.to_q.out_features // heads).transpose(1, 2).contiguous()
        k = attn.to_k(guide).view(b, -1, heads, attn.to_k.out_features // heads).transpose(1, 2).contiguous()
        with torch.inference_mode():
            _, lse = sdpa_with_lse(q, k, k, attn.scale)
        n_tokens = q.shape[2]
        mass = ops.attention_mass_ref(q, k, lse, attn.scale)
        mask = ops.sag_mask_ref(mass, 1.0, hw)
        stock = attn.processor

        def attn_with(processor):
            def fn():
                attn.set_processor(processor)
                try:
                    return attn(hidden)
                finally:
                    attn.set_processor(stock)

            return fn

        variants = {
            "model_main": common.timed(model_main, device, number=1),
            "model_degraded": common.timed(model_deg, device, number=1),
            "attn_stock": common.timed(attn_with(stock), device, None, min_sample),
            "x0_eps": common.timed(lambda: x0_eps(x, o_full[:b], vp_noise(abar), "epsilon"), device, None, min_sample),
            "mask": common.timed(lambda: ops.sag_mask_ref(mass, 1.0, hw), device, None, min_sample),
        }
        skipped = {}
        for be in BACKENDS:
            cands = {
                f"attn_capture[{be}]": attn_with(SAGCaptureProcessor(b, be)),
                f"attention_mass[{be}]": lambda be=be: ops.attention_mass(q, k, lse, attn.scale, backend=be),
                f"degrade[{be}]": lambda be=be: ops.degrade(x0, mask, eps, abar, 9, 1.0, backend=be),
                f"combine[{be}]": lambda be=be: ops.combine(o_full, o_full[:b], o_deg, 0.75, backend=be),
            }
            for key, fn in cands.items():
                why = _probe(fn)
                if why:
                    skipped[key] = why
                else:
                    variants[key] = common.timed(fn, device, None, min_sample)
        log(f"overhead: {name} {size}x{size}, capture layer {layer} N={n_tokens} ({hw[0]}x{hw[1]}), {rounds} rounds")
        with torch.inference_mode():
            samples = common.interleave(variants, rounds, warmup, None)
        raw[name] = {"samples_s": samples, "skipped": skipped, "capture_layer": layer, "tokens": n_tokens, "map_hw": hw}
        ok = lambda k: isinstance(samples.get(k), list)  # noqa: E731
        med = lambda k: statistics.median(samples[k]) * 1e3 if ok(k) else None  # noqa: E731
        model_ms = None
        if ok("model_main") and ok("model_degraded"):
            model_ms = med("model_main") + med("model_degraded")
        base = {"model": name, "image": f"{size}x{size}", "capture_N": n_tokens}

        def add(backend, part, ms, status="ok", spread=None):
            row = dict(base, backend=backend, part=part, ms=ms, status=status)
            if spread:
                row.update(p25_ms=spread["p25"], p75_ms=spread["p75"], min_ms=spread["min"])
            if ms is not None and model_ms:
                row["pct_of_model_calls"] = 100.0 * ms / model_ms
            rows.append(row)

        for key, part in (("model_main", "model call, main (batch 2B)"), ("model_degraded", "model call, degraded (batch B)")):
            add(
                "-",
                part,
                med(key),
                "ok" if ok(key) else f"error: {samples[key]['error']}",
                common.summarize(samples[key]) if ok(key) else None,
            )
        shared = {"x0_eps": med("x0_eps"), "mask": med("mask")}
        add("- (torch)", "x0/eps", shared["x0_eps"], spread=common.summarize(samples["x0_eps"]) if ok("x0_eps") else None)
        add("- (torch)", "mask", shared["mask"], spread=common.summarize(samples["mask"]) if ok("mask") else None)
        for be in BACKENDS:
            parts, mins = {}, {}
            cap = f"attn_capture[{be}]"
            mine = [cap] + [f"{k}[{be}]" for k in ("attention_mass", "degrade", "combine")]
            if all(k in skipped for k in mine):
                reasons = list(dict.fromkeys(skipped[k].split("cannot run these inputs: ", 1)[-1] for k in mine))
                add(be, "all parts", None, "skipped: " + " | ".join(reasons))
                continue
            if ok(cap) and ok("attn_stock"):
                n = min(len(samples[cap]), len(samples["attn_stock"]))
                parts["capture"] = statistics.median([(samples[cap][i] - samples["attn_stock"][i]) * 1e3 for i in range(n)])
                add(be, "capture (extra over stock attention layer)", parts["capture"])
                rows[-1]["min_ms"] = mins["capture"] = (min(samples[cap]) - min(samples["attn_stock"])) * 1e3
            else:
                add(
                    be,
                    "capture (extra over stock attention layer)",
                    None,
                    "skipped: " + str(skipped.get(cap) or samples.get(cap, {}).get("error")),
                )
            for key, part in (("attention_mass", "  of which attention_mass"), ("degrade", "degrade"), ("combine", "combine")):
                full = f"{key}[{be}]"
                if ok(full):
                    add(be, part, med(full), spread=common.summarize(samples[full]))
                    if key != "attention_mass":
                        parts[key] = med(full)
                        mins[key] = min(samples[full]) * 1e3
                else:
                    add(be, part, None, "skipped: " + str(skipped.get(full) or samples.get(full, {}).get("error")))
            if len(parts) == 3 and None not in shared.values():
                add(be, "TOTAL outside the model (capture + x0/eps + mask + degrade + combine)", sum(parts.values()) + sum(shared.values()))
                if len(mins) == 3 and ok("x0_eps") and ok("mask"):
                    rows[-1]["min_ms"] = sum(mins.values()) + (min(samples["x0_eps"]) + min(samples["mask"])) * 1e3
        del unet
    notes += [
        "ms: median over interleaved rounds; each op sample is a back-to-back loop divided by its length.",
        "min: fastest round (for capture: fastest capture layer - fastest stock layer; TOTAL: sum of the parts' minima), "
        "less hit by a shared machine; a negative median difference means the capture cost is below the noise.",
        "capture: per-round difference (capture processor) - (stock processor) on the capture layer's real input.",
        "% of model calls: against main + degraded model call of the same run.",
        "Python overhead of the guided denoiser itself (hooks, argument binding, slicing) is not in these parts: "
        "the step scenario's 'over floor' column has everything together.",
    ]
    return {
        "title": "Overhead outside the model calls, per backend",
        "rows": rows,
        "notes": notes,
        "raw": raw,
        "columns": [
            ("model", "model"),
            ("image", "image"),
            ("capture_N", "N"),
            ("backend", "backend"),
            ("part", "part"),
            ("ms", "ms (median)"),
            ("min_ms", "min"),
            ("pct_of_model_calls", "% of model calls"),
            ("status", "status"),
        ],
    }
