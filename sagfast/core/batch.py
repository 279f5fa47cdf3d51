"""The batch layout of a model call's inputs: cutting rows out of every batched input and joining them.

A model call carries its batch in many places (the latent, `encoder_hidden_states`, SDXL's
`added_cond_kwargs`, ControlNet residuals, IP-Adapter embeddings, a per-row timestep). Every tensor
whose first dim is the call's batch size follows the rows; everything else (scalars, unbatched
tensors) rides along as it is.
"""

from __future__ import annotations

import torch


def map_batched(value, full: int, fn):
    """`value` (tensors in nested dicts, lists, tuples) with `fn` applied to every tensor whose batch
    dim is `full`; everything else as it is."""
    if torch.is_tensor(value):
        return fn(value) if value.dim() >= 1 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: map_batched(v, full, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_batched(v, full, fn) for v in value)
    return value


def slice_batch(value, full: int, rows: slice):
    """`value` with every tensor whose batch dim is `full` cut to its rows `rows`."""
    return map_batched(value, full, lambda t: t[rows])


def gather_batch(value, full: int, parts: list):
    """`value` with every tensor whose batch dim is `full` replaced by its rows `parts[0]`, then
    `parts[1]`, ... joined (slice(None) for all rows); `value` itself for one part of all rows."""
    if parts == [slice(None)]:
        return value
    return map_batched(value, full, lambda t: torch.cat([t[p] for p in parts]))


def join_calls(first, second, rows: int, name: str = "input"):
    """Two model calls' inputs of `rows` rows each as one call: every tensor whose batch dim is `rows`
    is `first`'s rows then `second`'s; everything else is `second`'s, and must be `first`'s too (a
    ValueError names the input that differs)."""
    if isinstance(second, dict):
        return {k: join_calls(first.get(k), v, rows, k) for k, v in second.items()}
    if isinstance(second, (list, tuple)) and len(first or ()) == len(second):
        return type(second)(join_calls(a, v, rows, name) for a, v in zip(first, second))
    batched = torch.is_tensor(second) and second.dim() >= 1 and second.shape[0] == rows
    if batched and torch.is_tensor(first) and first.shape == second.shape:
        return torch.cat([first, second])
    if not batched and same_inputs(first, second):
        return second
    shapes = [tuple(x.shape) if torch.is_tensor(x) else type(x).__name__ for x in (first, second)]
    raise ValueError(
        f"sagfast joins the pipeline's uncond and cond model calls of a step into one batch, and their `{name}` "
        f"differ where one batch cannot hold both ({shapes[0]} and {shapes[1]}): give the negative prompt's "
        "embeddings the prompt's length (pad both to one max_sequence_length), and both calls the same "
        "unbatched inputs"
    )


def snapshot(value):
    """`value` with its dicts, lists and tuples copied (tensors and other leaves as they are): what a
    caller may go on editing in place no longer changes it."""
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def same_inputs(a, b) -> bool:
    """Whether two model inputs (tensors in nested dicts, lists, tuples) hold the same values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_inputs(x, y) for x, y in zip(a, b))
    try:
        return bool(a is b or a == b)
    except Exception:  # an array's elementwise ==: not known to be the same
        return False


def split_rows(rules: list, plain, own, attn, hidden_states, *args, **kwargs):
    """An attention layer's output on a batch some of whose rows run through a rule: `rules` are
    (rows, rule) pairs (contiguous slices, in batch order), each called as `rule(own, attn, ...)` on
    its rows; the first rows before any rule (the main batch) go through `plain(attn, ...)`, rows
    between rules through `own(attn, ...)` (the layer's processor); outputs in batch order. Every
    batched argument (a tensor whose first dim is the batch) is cut along."""
    full = hidden_states.shape[0]
    inputs = (hidden_states, args, kwargs)
    segments, at = [], 0
    for rows, rule in sorted(rules, key=lambda r: r[0].start):
        start, stop, _ = rows.indices(full)
        if start > at:
            segments.append((slice(at, start), plain if at == 0 else own))
        segments.append((slice(start, stop), lambda a, *x, rule=rule, **k: rule(own, a, *x, **k)))
        at = stop
    if at < full:
        segments.append((slice(at, full), plain if at == 0 else own))
    outputs = []
    for rows, fn in segments:
        part_hidden, part_args, part_kwargs = slice_batch(inputs, full, rows) if len(segments) > 1 else inputs
        outputs.append(fn(attn, part_hidden, *part_args, **part_kwargs))
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)
