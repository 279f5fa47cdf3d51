"""The `sagfast` command.

    sagfast demo [--out sag_demo.png] [--steps 15] [--pag-scale S] [--cfg-rule RULE] ...
        The two embedded digit models, one panel each (the UNet, then the flow-matching DiT): a
        labelled grid, rows the digits 0-9, columns no guidance, CFG, CFG + SAG (exact), CFG + SAG
        (batched), then where SAG acts: the mask SAG blurs at the middle step (red, over the exact
        column's digit) and |CFG+SAG - CFG| amplified 4x. Every column starts from the same noise; the
        time of each column is printed. Every per-image setting of sagfast's terms has a flag (its
        name in a server request: --pag-scale, --seg-scale, ...), and --cfg-rule picks the CFG rule:
        they go into the CFG + SAG columns; a term the model cannot run is refused before any work.

    sagfast demo --model DIR --prompt "a photo of a cat" [--prompt ...]
        The same with a local diffusers Stable Diffusion folder (SD 1.x / 2.x / XL, local files only):
        rows the prompts, columns CFG, CFG + SAG (exact) and CFG + SAG (batched).

    sagfast serve [--host 127.0.0.1] [--port 8000] [--model NAME=PATH_OR_REPO ...] [--replicas 1]
                  [--gpus-per-replica 0] [--max-batch-size 8] [--batch-wait-ms 10] [--max-queue 64]
                  [--max-steps 50] [--max-size 1024] [--group-by shape|settings] [--address RAY_ADDRESS]
        The embedded digit models ("digits-unet", "digits-dit") and any diffusers pipeline sagfast
        guides, on Ray Serve (`pip install "sagfast[serve]"`): POST /v1/images, GET /v1/models, GET
        /health, GET /docs. Requests that share the model, steps, size and SAG mode share one guided
        pipeline call, whatever their guidance settings. Prints the URL when ready; Ctrl-C stops it.

The pictures are drawn by sagfast.demo (its docstring gives the digit grid's geometry: 636 x 2128 for
one sample per cell). This module parses and checks the options and dispatches.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

from sagfast import demo
from sagfast.demo import SCHEDULERS, Refused, demo_scheduler_classes

__all__ = ["SCHEDULERS", "demo_scheduler_classes", "main", "parser"]


def _demo(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif (os.cpu_count() or 1) <= 2:
        # On a small shared machine two OpenMP threads spin-wait on each other while other processes
        # hold the cores: one thread is many times faster there.
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.model:
        demo.demo_sd(
            args.model,
            args.prompt,
            args.out,
            steps=25 if args.steps is None else args.steps,
            guidance=7.5 if args.guidance is None else args.guidance,
            sag_scale=args.sag_scale,
            seed=args.seed,
            height=args.height,
            width=args.width,
            negative_prompt=args.negative_prompt,
            scheduler=args.scheduler,
            settings=_settings(args),
        )
    else:
        demo.demo_digits(
            args.out,
            steps=15 if args.steps is None else args.steps,
            samples=args.samples,
            guidance=3.0 if args.guidance is None else args.guidance,
            sag_scale=args.sag_scale,
            seed=args.seed,
            scheduler=args.scheduler or "ddim",
            settings=_settings(args),
        )
    print(f"total {time.perf_counter() - t0:.1f} s")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text}")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite number >= 0 expected, got {text}")
    return value


def _pixels(text: str) -> int:
    value = _positive(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"a multiple of 8 expected, got {text}")
    return value


def _scheduler(text: str) -> str:
    if text in SCHEDULERS:
        return text
    accepted = demo_scheduler_classes()
    if text in accepted:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not one of {', '.join(SCHEDULERS)} nor of the diffusers schedulers the demo's UNets run with ({', '.join(accepted)})"
    )


SEED_LIMIT = 2**63


def _seed(text: str) -> int:
    # torch's manual_seed takes 64 bits; the SD demo seeds prompt i with seed + i, so below 2**63.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer 0 <= seed < 2**63 expected, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"an integer 0 <= seed < 2**63 expected, got {text}")
    return value


def _summary(doc: str) -> str:
    """A setting's documentation cut to a help line: its first sentence, up to its first colon."""
    sentence = re.split(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s", doc.strip(), maxsplit=1)[0].rstrip(".")
    return sentence.split(": ")[0].replace("%", "%%")


def _setting_value(setting):
    """argparse's type for a per-image setting's flag: one number, checked by the setting's own check
    (SAGConfig's)."""

    def parse(text: str):
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
        value, problem = setting.check(setting.public, number)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


OWN_FLAGS = {"guidance_scale": "--guidance", "sag_scale": "--sag-scale"}
"""The per-image settings (by public name) that the demo has flags of its own for: the pipeline's
guidance_scale (the CFG scale, cfg_scale None: the pipeline's CFG line applies it) and SAG's scale."""


def _add_setting_flags(d: argparse.ArgumentParser) -> None:
    """A flag for every per-image setting of the registry (`--<public name>`), but those the demo has
    under its own names (--guidance, --sag-scale), and --cfg-rule with every registered CFG rule; the
    fields they set are listed in the namespace's `config_fields`."""
    from sagfast.config import CFG_RULES, FIELDS, PER_IMAGE
    from sagfast.terms.cfg import CFGRule

    group = d.add_argument_group(
        "guidance settings",
        "sagfast's registry of settings (help(sagfast.SAGConfig) documents each); they go into the CFG + SAG columns",
    )
    fields = []
    for name in PER_IMAGE:
        setting = FIELDS[name]
        if setting.public in OWN_FLAGS:
            continue
        flag = "--" + setting.public.replace("_", "-")
        default = f"{setting.default:g}" if isinstance(setting.default, float) else setting.default
        text = f"{_summary(setting.doc)} (one number for every image; default {default})"
        group.add_argument(flag, dest=name, type=_setting_value(setting), metavar="S", help=text)
        fields.append(name)
    rule = FIELDS[CFGRule.rule_field]
    group.add_argument(
        "--" + rule.public.replace("_", "-"),
        dest=rule.name,
        choices=tuple(CFG_RULES),
        help=f"{_summary(rule.doc)}: {', '.join(CFG_RULES)} (default {rule.default})",
    )
    fields.append(rule.name)
    d.set_defaults(config_fields=tuple(fields))


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser whose `extend(parser)`, where set, adds options when it first parses or
    formats its help: `sagfast demo`'s registry flags, as reading the registry imports torch, which
    `sagfast --help` and `sagfast serve` are not to wait for."""

    extend = None

    def _extend(self) -> None:
        extend, self.extend = self.extend, None
        if extend is not None:
            extend(self)

    def parse_known_args(self, args=None, namespace=None):
        self._extend()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._extend()
        return super().format_usage()

    def format_help(self) -> str:
        self._extend()
        return super().format_help()


def _settings(args) -> dict:
    """The SAGConfig fields the registry's flags set (those given)."""
    return {name: getattr(args, name) for name in getattr(args, "config_fields", ()) if getattr(args, name) is not None}


def _check(p: argparse.ArgumentParser, args) -> None:
    """What the options say together, and the paths, before any work is done."""
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        p.error(f"argument --out: the folder {folder} does not exist")
    if not args.out.lower().endswith(".png"):
        p.error(f"argument --out: a .png path expected, got {args.out}")
    if args.model:
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            p.error(f"argument --model: {args.model} is not a local diffusers pipeline folder (no model_index.json there)")
        if not args.prompt:
            p.error("argument --model: needs at least one --prompt")
        if args.samples != 1:
            p.error("argument --samples: only for the digit demo (without --model)")
    else:
        if args.prompt:
            p.error("argument --prompt: needs --model DIR (the digit model takes no prompt)")
        for name in ("negative_prompt", "height", "width"):
            if getattr(args, name) is not None:
                p.error(f"argument --{name.replace('_', '-')}: only with --model DIR")
    from sagfast.config import SAGConfig

    try:
        SAGConfig(scale=args.sag_scale, **_settings(args))  # the guided columns' config, checked as a whole
    except ValueError as exc:
        p.error(" ".join(str(exc).split()))


def _model_spec(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"NAME=PATH_OR_REPO expected (e.g. sd=./my-sd-folder), got {text!r}")
    return name, source


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number >= 0 expected, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"a number >= 0 expected, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port 1..65535 expected, got {text}")
    return value


def _serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve guided pipelines over HTTP on Ray Serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    s.add_argument(
        "--model", type=_model_spec, action="append", default=[], help="NAME=PATH_OR_REPO: a diffusers pipeline to serve too (repeat)"
    )
    s.add_argument("--no-digits", action="store_true", help="do not serve the embedded digit models")
    s.add_argument("--replicas", type=_positive, default=1, help="replicas of the deployment (default 1)")
    s.add_argument("--gpus-per-replica", type=_fraction, default=0.0, help="GPUs per replica; > 0 runs the models on CUDA (default 0: CPU)")
    s.add_argument("--max-batch-size", type=_positive, default=8, help="requests per model call at most (default 8; 1: no batching)")
    s.add_argument("--batch-wait-ms", type=_fraction, default=10.0, help="how long a batch waits for more requests (default 10 ms)")
    s.add_argument("--max-queue", type=_positive, default=64, help="requests a replica holds before answering 503 (default 64)")
    s.add_argument("--max-steps", type=_positive, default=50, help="largest `steps` a request may ask (default 50)")
    s.add_argument("--max-size", type=_pixels, default=1024, help="largest image side in pixels (default 1024)")
    s.add_argument(
        "--group-by",
        choices=("shape", "settings"),
        default="shape",
        help="shape: any guidance settings share a call (default); settings: only identical ones",
    )
    s.add_argument("--address", help="join the Ray cluster at this address (e.g. auto, or HEAD_IP:6379) instead of starting one")


def _serve(args) -> int:
    import signal
    import threading

    from sagfast.serving import DEFAULT_MODELS, StartupError, start, stop
    from sagfast.serving.schema import Limits

    specs = {} if args.no_digits else dict(DEFAULT_MODELS)
    for name, source in args.model:
        specs[name] = source
    if not specs:
        print("sagfast serve: no models to serve (--no-digits and no --model)", file=sys.stderr)
        return 2
    limits = Limits(args.max_steps, args.max_size, args.max_batch_size, args.batch_wait_ms, args.max_queue, args.group_by)
    try:
        url = start(specs, limits, args.host, args.port, args.replicas, args.gpus_per_replica, args.address)
    except StartupError as exc:
        print(f"sagfast serve: {exc}", file=sys.stderr)
        return 2
    stopped = threading.Event()
    try:
        # After start: ray.init installs its own SIGTERM handler (it aborts the process); a SIGTERM
        # (a process manager, a container stop) is to stop the server as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        print(f"sagfast serving {', '.join(specs)} at {url} (API docs: {url}/docs)", flush=True)
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(args.address)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagfast", description="Self-Attention Guidance for diffusers, fast.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser(
        "demo",
        help="a labelled PNG grid: no guidance / CFG / CFG + SAG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", default="sag_demo.png", help="PNG path, in a folder that exists (default: sag_demo.png)")
    d.add_argument("--steps", type=_positive, help="denoising steps (default: 15 digits, 25 SD)")
    d.add_argument("--guidance", type=_scale, help="CFG scale, >= 0 (default: 3 digits, 7.5 SD)")
    d.add_argument("--sag-scale", type=_scale, default=0.75, help="SAG scale, >= 0 (default 0.75)")
    d.add_argument("--seed", type=_seed, default=0, help="the noise's seed, 0 <= seed < 2**63 (default 0)")
    d.add_argument("--samples", type=_positive, default=1, help="digit demo: samples per cell (default 1)")
    d.add_argument(
        "--scheduler",
        type=_scheduler,
        help=f"the UNet's scheduler (the digit UNet's, or --model's; the DiT panel keeps its flow-matching Euler): "
        f"{', '.join(SCHEDULERS)} (default ddim), or a diffusers scheduler class compatible with DDIMScheduler that SAG accepts",
    )
    d.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's; 1 on machines with <= 2 cores)")
    d.add_argument("--model", help="a local diffusers Stable Diffusion folder (instead of the digit model)")
    d.add_argument("--prompt", action="append", help="with --model: a prompt (repeat for more rows)")
    d.add_argument("--negative-prompt", help="with --model")
    d.add_argument("--height", type=_pixels, help="with --model: image height in pixels (a multiple of 8)")
    d.add_argument("--width", type=_pixels, help="with --model: image width in pixels (a multiple of 8)")
    d.extend = _add_setting_flags
    d.set_defaults(demo_parser=d)
    _serve_parser(sub)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "demo":
        _check(args.demo_parser, args)
        import torch

        threads_before = torch.get_num_threads()
        try:
            _demo(args)
        except Refused as exc:  # a model of the demo cannot run the settings: refused before any image
            args.demo_parser.error(str(exc))
        finally:
            torch.set_num_threads(threads_before)  # main() may run inside another program (tests)
    elif args.command == "serve":
        return _serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
