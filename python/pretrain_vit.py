"""LeJEPA pretraining of a small ViT with the fused SIGReg op.

    python python/pretrain_vit.py                      # digits, ~5.5 minutes on 2 CPU cores
    python python/pretrain_vit.py --data DIR           # DIR/<class>/<image>.png
    torchrun --nproc_per_node=2 python/pretrain_vit.py # data parallel (gloo on CPU, nccl on GPU)
    python python/pretrain_vit.py > train.log          # a batch job: a progress line every 20 s, no bar

Progress (``--progress``): a bar on a terminal; when stdout is not a terminal,
one line every ``--log-every`` seconds with the step, elapsed and remaining
time, the losses and the online probe's accuracy (see ``progress.py``).

The objective is LeJEPA's: V augmented views of each image go through the
encoder and a projector; the invariance term is the squared Euclidean
distance of each view's projection to the mean projection of its image's
views (averaged over views and images), and lambda * SIGReg pushes each view's
batch of projections ``(V, N, K)`` towards an isotropic Gaussian. There is no stop-gradient, teacher, EMA or schedule other
than warmup + cosine learning rate. A linear probe on detached CLS features is
trained alongside (it never touches the encoder) to watch progress.

At the end, frozen features of the held-out split are evaluated (linear probe
with all labels and with 10 per class, k-NN) against the same encoder at its
random initialization and against raw pixels; the table goes to stdout and
``summary.json`` in ``--out``, loss curves to ``curves.png`` beside it.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

try:
    from sigreg_kernels import SIGReg
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sigreg_kernels import SIGReg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment import AugmentConfig, Augmenter  # noqa: E402
from data import DataError, holdout_split, load_digits_set, load_image_folder  # noqa: E402
from evaluate import embed, evaluate_features, format_table  # noqa: E402
from progress import MODES as PROGRESS_MODES, Progress  # noqa: E402
from vit import ViT, Projector  # noqa: E402

# Overrides applied by --smoke (explicit flags still win): a run of seconds for tests and CI.
SMOKE = dict(dim=32, depth=1, heads=2, proj_hidden=64, proj_dim=16, views=2, batch_size=32, num_slices=64,
             steps=4, max_minutes=0.0, probe_iters=30, probe_draws=1, probe_grid=False, warmup=0.25)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, default=None,
                   help="folder of images in class sub-folders; default: scikit-learn's 8x8 digits")
    g.add_argument("--image-size", type=int, default=16, help="side of the views the ViT sees")
    g.add_argument("--channels", type=int, default=0, choices=(0, 1, 3), help="for --data: 0 = auto")
    g.add_argument("--holdout", type=float, default=0.25, help="fraction held out for evaluation")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    g.add_argument("--hflip", type=int, default=-1, choices=(-1, 0, 1),
                   help="horizontal flips; -1 = off for digits, on for --data")
    g.add_argument("--crop-scale", type=float, default=0.6, help="smallest crop area fraction")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=4)
    g.add_argument("--dim", type=int, default=128, help="ViT width")
    g.add_argument("--depth", type=int, default=4, help="number of transformer blocks")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--mlp-ratio", type=float, default=2.0)
    g.add_argument("--proj-hidden", type=int, default=512)
    g.add_argument("--proj-dim", type=int, default=64, help="K, the dimension SIGReg sees")
    g = p.add_argument_group("objective")
    g.add_argument("--views", type=int, default=4, help="augmented views per image (V)")
    g.add_argument("--lambda", dest="lam", type=float, default=2.0, help="weight of SIGReg")
    g.add_argument("--num-slices", type=int, default=256, help="random directions per SIGReg call")
    g.add_argument("--sigreg-backend", default="auto",
                   help="reference | cpu | triton | cuda | auto (reference is the published formula)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size (all processes)")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of the run spent in linear warmup")
    g.add_argument("--epochs", type=float, default=0, help="schedule length in epochs; 0 = fill --max-minutes")
    g.add_argument("--steps", type=int, default=0, help="schedule length in steps (overrides --epochs)")
    g.add_argument("--max-minutes", type=float, default=5.4,
                   help="training time budget (0 = none); the schedule is compressed to fit it, which makes "
                        "a run that hits it depend on the machine's speed")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many steps without changing the schedule (to be --resume'd)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=str, default="runs/pretrain_vit", help="output folder")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: OUT/checkpoint.pt)")
    g.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--threads", type=int, default=0, help="CPU threads per process; 0 = cores / processes")
    g.add_argument("--probe-iters", type=int, default=100, help="L-BFGS iterations of the final probes")
    g.add_argument("--probe-draws", type=int, default=5, help="random draws of the 10-shot subsets")
    g.add_argument("--probe-grid", type=int, default=1, choices=(0, 1),
                   help="choose the probes' L2 strength by cross-validation (0: fixed 1e-3)")
    g.add_argument("--progress", default="auto", choices=PROGRESS_MODES,
                   help="bar: a progress bar; lines: a line every --log-every seconds (for logs of batch jobs); "
                        "auto: the bar when stdout is a terminal, else lines")
    g.add_argument("--log-every", type=float, default=20.0, help="seconds between progress lines")
    g.add_argument("--smoke", action="store_true", help="tiny model, few steps, quick eval (tests, CI)")
    args = p.parse_args(argv)
    if args.smoke:
        # Smoke values become the defaults, so flags given explicitly still win.
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    args.parser = p
    return args


# ----------------------------------------------------------------------------- setup


def setup_distributed(args):
    """Initialize the process group when launched by torchrun; returns (rank, world, local_rank, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(args.device if args.device not in ("auto", "cuda") else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # Processes on one machine share its cores; oversubscribing them is much slower than not.
        torch.set_num_threads(args.threads or max(1, cores // local_world))
    return rank, world, local_rank, device


def load_data(args):
    """Images and labels, split into train / held-out; exits with a usage error for unusable --data."""
    try:
        if args.data is None:
            data = load_digits_set()
        else:
            data = load_image_folder(args.data, args.image_size, args.channels)
        train_idx, test_idx = holdout_split(data.labels, args.holdout, args.split_seed)
    except DataError as err:
        args.parser.error(f"--data: {err}")
    return data.subset(train_idx), data.subset(test_idx)


class LeJEPANet(nn.Module):
    """Encoder, projector and the online probe, wrapped together so DDP syncs all of them."""

    def __init__(self, args, channels, num_classes):
        super().__init__()
        self.encoder = ViT(args.image_size, args.patch_size, channels, args.dim, args.depth, args.heads,
                           args.mlp_ratio)
        self.projector = Projector(args.dim, args.proj_hidden, args.proj_dim)
        self.probe = nn.Linear(args.dim, num_classes)

    def forward(self, images):
        emb = self.encoder(images)
        # The probe learns from detached features: labels never shape the encoder.
        return self.projector(emb), self.probe(emb.detach())


def make_optimizer(net, args):
    """AdamW; weight decay on matrices only (not on biases, norms, position embeddings, CLS token)."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name and "token" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def lr_factor(progress, warmup):
    """Linear warmup then cosine decay to zero, as a function of the run's progress in [0, 1]."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-8, 1 - warmup))))


def lejepa_loss(proj, lam, sigreg):
    """LeJEPA objective on projections ``[V, N, K]``; returns (total, invariance, sigreg).

    The invariance term is the squared Euclidean distance of each view's
    projection to the mean of its image's views, averaged over views and images.
    (Averaging over the K coordinates too would divide it by K and hand the
    whole loss to SIGReg at any reasonable lambda.)
    """
    proj32 = proj.float()
    invariance = (proj32 - proj32.mean(0)).square().sum(-1).mean()
    reg = sigreg(proj)
    return invariance + lam * reg, invariance, reg


def make_views(augmenter, images, views, global_batch, rank, world, seed, step):
    """``views`` augmented copies of this process's ``images``, stacked view-major: ``[views * n, C, S, S]``.

    The random parameters are drawn for the whole global batch from a generator
    keyed by (seed, step); this process's samples sit at rows rank, rank + world,
    ... of it (DistributedSampler deals the shuffled indices out round-robin), so
    every image gets the same views whatever the number of processes.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    params = augmenter.sample(views * global_batch, gen).view(views, global_batch, -1)[:, rank::world]
    return augmenter.apply(images.repeat(views, 1, 1, 1), params.reshape(views * len(images), -1))


# ----------------------------------------------------------------------------- training


def train(args):
    """Pretrain, checkpoint, and (once the schedule is complete) evaluate and plot; rank 0 writes files."""
    t_start = time.perf_counter()
    rank, world, _, device = setup_distributed(args)
    is_main = rank == 0
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    ckpt_path = out / "checkpoint.pt"
    resume_path = (ckpt_path if args.resume == "auto" else Path(args.resume)) if args.resume else None
    if resume_path is not None and not resume_path.is_file():
        args.parser.error(f"--resume: no checkpoint at {resume_path}")
    train_set, test_set = load_data(args)
    channels = train_set.images.shape[1]
    num_classes = len(train_set.classes)
    hflip = (args.data is not None) if args.hflip < 0 else bool(args.hflip)
    augmenter = Augmenter(AugmentConfig(out_size=args.image_size, channels=channels, hflip=hflip,
                                        scale=(args.crop_scale, 1.0)))
    # Per-channel statistics of the un-augmented training views normalize every input.
    resized = augmenter.resize(train_set.images)
    mean = resized.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = resized.std(dim=(0, 2, 3)).view(1, -1, 1, 1).clamp_min(1e-3)

    batch = min(args.batch_size, (len(train_set) // world) * world)
    if batch % world:
        args.parser.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if batch != args.batch_size and is_main:
        print(f"batch size reduced to {batch}: the training split has {len(train_set)} images", file=sys.stderr)
    local_batch = batch // world
    sampler = DistributedSampler(range(len(train_set)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    total_steps = args.steps or (round(args.epochs * steps_per_epoch) if args.epochs else 0)
    budget = 60.0 * args.max_minutes
    if not total_steps and not budget:
        args.parser.error("give --epochs, --steps or --max-minutes")

    torch.manual_seed(args.seed)  # same initial weights in every process and for the random-init baseline
    net = LeJEPANet(args, channels, num_classes).to(device)
    init_state = {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}
    sigreg = SIGReg(num_slices=args.num_slices, backend=args.sigreg_backend).to(device)
    opt = make_optimizer(net, args)

    step, trained_seconds, resumed_seconds, history = 0, 0.0, 0.0, []
    if resume_path is not None:
        ckpt = torch.load(resume_path, map_location=device, weights_only=False)
        try:
            net.load_state_dict(ckpt["net"])
            opt.load_state_dict(ckpt["opt"])
            sigreg.load_state_dict(ckpt["sigreg"])
        except (RuntimeError, ValueError) as err:
            args.parser.error(f"--resume: {resume_path} does not fit the model these flags build ({err})")
        init_state = ckpt["init_encoder"]
        step, trained_seconds, history = ckpt["step"], ckpt["trained_seconds"], ckpt["history"]
        resumed_seconds = ckpt["total_seconds"]
        if is_main:
            print(f"resumed from {resume_path} at step {step}", file=sys.stderr)

    model = net
    if world > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = device.type == "cuda"

    def save_checkpoint():
        if is_main:
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sigreg": sigreg.state_dict(),
                        "init_encoder": init_state, "step": step, "trained_seconds": trained_seconds,
                        "total_seconds": time.perf_counter() - t_start + resumed_seconds,
                        "history": history, "args": {k: v for k, v in vars(args).items() if k != "parser"}},
                       ckpt_path.with_suffix(".tmp"))
            os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)  # never leave a half-written checkpoint

    def progress_of(step, seconds):
        by_steps = step / total_steps if total_steps else 0.0
        by_time = seconds / budget if budget else 0.0
        return min(1.0, max(by_steps, by_time))

    images, labels = train_set.images.to(device), train_set.labels.to(device)
    mean, std = mean.to(device), std.to(device)
    report = Progress(args.progress, total_steps, budget, interval=args.log_every, enabled=is_main)
    t_session = time.perf_counter() - trained_seconds  # the clock counts time trained before a resume
    progress = progress_of(step, trained_seconds)
    net.train()
    while progress < 1.0 and not (args.stop_after and step >= args.stop_after):
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for k in range(offset, steps_per_epoch):
            idx = torch.tensor(order[k * local_batch:(k + 1) * local_batch], device=device)
            # The schedule is read at the middle of the step about to be taken (neither the
            # first nor the last step gets a zero lr), on the clock all processes agreed on
            # after the previous step, so they all set the same learning rate.
            lr = args.lr * lr_factor(progress_of(step + 0.5, trained_seconds), args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            views = (make_views(augmenter, images[idx], args.views, batch, rank, world, args.seed, step)
                     - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                proj, logits = model(views)
                proj = proj.view(args.views, local_batch, -1)
                loss, inv, reg = lejepa_loss(proj, args.lam, sigreg)
                probe_loss = F.cross_entropy(logits.float(), labels[idx].repeat(args.views))
            opt.zero_grad(set_to_none=True)
            (loss + probe_loss).backward()
            opt.step()
            step += 1

            with torch.no_grad():
                probe_acc = (logits.argmax(1) == labels[idx].repeat(args.views)).float().mean()
                stats = torch.stack([inv.detach(), probe_loss.detach(), probe_acc,
                                     torch.tensor(time.perf_counter() - t_session, device=device)])
            if world > 1:
                # Averages over processes (equal local batches) are the global-batch values; the
                # clock is the slowest process's, so every process follows the same schedule.
                means, clock = stats[:3].clone(), stats[3:].clone()
                dist.all_reduce(means)
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
                stats = torch.cat([means / world, clock])
            inv_v, probe_loss_v, probe_acc_v, seconds = stats.tolist()
            reg_v = reg.item()
            trained_seconds = seconds
            record = dict(step=step, epoch=epoch, lr=opt.param_groups[0]["lr"], loss=inv_v + args.lam * reg_v,
                          invariance=inv_v, sigreg=reg_v, probe_loss=probe_loss_v, probe_acc=probe_acc_v)
            history.append(record)
            progress = progress_of(step, seconds)
            report.update(step, seconds, record)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at step {step}; lower --lr")
            if step % args.ckpt_every == 0:
                save_checkpoint()
            if progress >= 1.0 or (args.stop_after and step >= args.stop_after):
                break
    report.close(step, trained_seconds)
    save_checkpoint()
    if is_main:
        with open(out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)

    if world > 1:
        dist.barrier()
    finished = progress >= 1.0
    if is_main and finished:
        summary = final_evaluation(args, net.encoder, init_state, augmenter, (mean, std), train_set, test_set,
                                   device, use_amp)
        summary["minutes"] = round((time.perf_counter() - t_start + resumed_seconds) / 60, 3)
        summary["train_minutes"] = round(trained_seconds / 60, 3)
        plot_curves(history, out / "curves.png")
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- evaluation and plots


def final_evaluation(args, encoder, init_state, augmenter, norm, train_set, test_set, device, use_amp):
    """Frozen-feature table for the trained encoder, the same encoder at init, and raw pixels."""
    mean, std = norm
    t0 = time.perf_counter()
    train_in = (augmenter.resize(train_set.images).to(device) - mean) / std
    test_in = (augmenter.resize(test_set.images).to(device) - mean) / std
    features = {"lejepa": (embed(encoder, train_in, device, autocast=use_amp),
                           embed(encoder, test_in, device, autocast=use_amp))}
    random_init = ViT(args.image_size, args.patch_size, train_set.images.shape[1], args.dim, args.depth,
                      args.heads, args.mlp_ratio).to(device)
    random_init.load_state_dict(init_state)
    features["random_init"] = (embed(random_init, train_in, device, autocast=use_amp),
                               embed(random_init, test_in, device, autocast=use_amp))
    features["raw_pixels"] = (train_in.flatten(1).float().cpu(), test_in.flatten(1).float().cpu())
    grid = None if args.probe_grid else (1e-3,)
    results = evaluate_features(features, train_set.labels, test_set.labels, len(train_set.classes),
                                draws=args.probe_draws, max_iter=args.probe_iters,
                                **({"weight_decays": grid} if grid else {}))
    print()
    print(f"held-out accuracy ({len(test_set)} images; train split {len(train_set)}):")
    print(format_table(results))
    print(f"evaluation took {time.perf_counter() - t0:.1f} s")
    return results


def plot_curves(history, path):
    """Invariance, SIGReg, total loss and online-probe accuracy against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ("invariance", "sigreg", "loss", "probe_acc"),
                              ("invariance", "SIGReg", "total loss", "online probe accuracy (train views)")):
        values = [r[key] for r in history]
        ax.plot(steps, values, lw=0.6, alpha=0.35, color="C0")
        ax.plot(steps, _ema(values), lw=1.5, color="C0")  # per-step values are noisy at small batches
        ax.set_title(title)
        ax.set_xlabel("step")
        if key != "probe_acc":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ema(values, span=None):
    """Exponential moving average with a window of ~2% of the run (debiased at the start)."""
    alpha = 2.0 / ((span or max(2, len(values) // 50)) + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def main(argv=None):
    args = parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
