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


def without_rows(value, full: int, rows: slice):
    """`value` with the rows `rows` taken out of every tensor whose batch dim is `full`."""
    return gather_batch(value, full, [slice(0, rows.start), slice(rows.stop, full)])


def with_rows(rest, inserted, at: int):
    """The inverse of `without_rows` on an output (a tensor, or a tuple of them): `inserted` put back
    in front of row `at` of `rest`."""
    if isinstance(rest, tuple):
        return tuple(with_rows(r, i, at) for r, i in zip(rest, inserted))
    return torch.cat([rest[:at], inserted, rest[at:]])


def split_rows(rows: slice, plain, perturbed, attn, hidden_states, *args, **kwargs):
    """The attention layer's output on a batch whose rows `rows` are perturbed: `plain(attn, ...)` on
    the other rows (if any), `perturbed(attn, ...)` on `rows`, in batch order. Every batched argument
    (a tensor whose first dim is the batch) is cut along."""
    full = hidden_states.shape[0]
    start, stop, _ = rows.indices(full)
    inputs = (hidden_states, args, kwargs)
    ptb_hidden, ptb_args, ptb_kwargs = slice_batch(inputs, full, slice(start, stop))
    out = perturbed(attn, ptb_hidden, *ptb_args, **ptb_kwargs)
    if (start, stop) == (0, full):
        return out
    rest_hidden, rest_args, rest_kwargs = without_rows(inputs, full, slice(start, stop))
    return with_rows(plain(attn, rest_hidden, *rest_args, **rest_kwargs), out, start)
