"""Frozen-feature evaluation: linear probe (all labels and few-shot) and k-NN.

The same protocol is applied to every feature set (pretrained encoder, the
same encoder at its random initialization, raw pixels), with every choice made
on the training split only:

* linear probe: features standardized with the statistics of the training
  split (no labels needed), a multinomial logistic regression fitted by
  L-BFGS, its L2 strength picked by 5-fold cross-validated log-loss on the
  labelled training images, then refitted on all of them;
* few-shot: the same probe on ``shots`` labelled images per class, averaged
  over several random draws of those images (the same draws for every feature set);
* k-NN: cosine similarity on L2-normalized features, the ``k`` nearest training
  images vote with weight ``exp(similarity / 0.07)`` (the protocol common in
  self-supervised learning papers).

All probe fits of one feature set are solved together as a single batched
problem, which keeps the whole table to seconds on a CPU.
"""

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def embed(model, images: torch.Tensor, device, batch_size: int = 512, autocast: bool = False) -> torch.Tensor:
    """Encoder outputs for preprocessed ``images`` as a float32 CPU tensor."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(model(batch).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _fit_logreg(x, y, mask, weight_decay, num_classes, max_iter):
    """Fit ``P`` independent L2-regularized multinomial logistic regressions at once.

    ``x [P, m, d]``, ``y [P, m]``, ``mask [P, m]`` (1 = sample used), ``weight_decay [P]``.
    The objectives are separable, so one L-BFGS run on their sum solves each of
    them; batching replaces hundreds of tiny solves by one of bigger tensors.
    """
    P, _, d = x.shape
    w = torch.zeros(P, d, num_classes, requires_grad=True)
    b = torch.zeros(P, num_classes, requires_grad=True)
    onehot = F.one_hot(y, num_classes).float() * mask[..., None]
    count = mask.sum(1)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        logp = (torch.bmm(x, w) + b[:, None]).log_softmax(-1)
        loss = (-(logp * onehot).sum((1, 2)) / count + weight_decay * w.square().sum((1, 2))).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _folds(y, k, generator):
    """Stratified assignment of samples to ``k`` folds."""
    fold = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        fold[idx] = torch.arange(len(idx)) % k
    return fold


def probe_accuracies(subsets, test_x, test_y, num_classes, weight_decays=WEIGHT_DECAYS, folds=5, max_iter=300,
                     seed=0):
    """Held-out accuracy of a logistic-regression probe for each ``(train_x, train_y)`` in ``subsets``.

    Features must already be standardized. For each subset the L2 strength is
    the one with the lowest ``folds``-fold cross-validated log-loss on the
    subset itself; all cross-validation fits and all refits are solved as one
    batch.
    """
    gen = torch.Generator().manual_seed(seed)
    wds = torch.tensor(weight_decays, dtype=torch.float32)
    m = max(len(y) for _, y in subsets)
    xs, ys, masks, val_masks, decay = [], [], [], [], []
    for train_x, train_y in subsets:
        pad = m - len(train_y)
        x = F.pad(train_x, (0, 0, 0, pad))
        y = F.pad(train_y, (0, pad))
        valid = F.pad(torch.ones(len(train_y)), (0, pad))
        k = max(2, min(folds, int(torch.bincount(train_y).min())))
        fold = F.pad(_folds(train_y, k, gen), (0, pad), value=-1)
        cv = len(weight_decays) > 1
        for f in range(k if cv else 0):
            for wd in wds:
                xs.append(x), ys.append(y), masks.append(valid * (fold != f)), val_masks.append(valid * (fold == f))
                decay.append(wd)
        for wd in wds if cv else wds[:1]:  # refits on the whole subset
            xs.append(x), ys.append(y), masks.append(valid), val_masks.append(torch.zeros(m)), decay.append(wd)
    xs, ys, masks, val_masks = torch.stack(xs), torch.stack(ys), torch.stack(masks), torch.stack(val_masks)
    w, b = _fit_logreg(xs, ys, masks, torch.stack(decay), num_classes, max_iter)
    val_loss = (F.cross_entropy((torch.bmm(xs, w) + b[:, None]).transpose(1, 2), ys, reduction="none")
                * val_masks).sum(1)
    accs, row = [], 0
    for train_x, train_y in subsets:
        if len(weight_decays) > 1:
            k = max(2, min(folds, int(torch.bincount(train_y).min())))
            cv_loss = val_loss[row:row + k * len(wds)].view(k, len(wds)).sum(0)
            row += k * len(wds)
            pick = row + int(cv_loss.argmin())
            row += len(wds)
        else:
            pick, row = row, row + 1
        accs.append(((test_x @ w[pick] + b[pick]).argmax(1) == test_y).float().mean().item())
    return accs


def knn(train_x, train_y, test_x, test_y, num_classes, k=20, temperature=0.07):
    """Weighted k-nearest-neighbour accuracy with cosine similarity."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    sim, idx = (test_x @ train_x.T).topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


def evaluate_features(features: dict, train_y, test_y, num_classes, shots=10, draws=5, max_iter=300,
                      weight_decays=WEIGHT_DECAYS, k=20, seed=0):
    """Run every protocol on every feature set.

    ``features`` maps a name to ``(train_x, test_x)``; returns
    ``{"linear_probe": {name: acc}, "linear_probe_10shot": {...}, "knn": {...}}``.
    The few-shot subsets are the same images for every feature set.
    """
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for _ in range(draws):
        pick = [torch.nonzero(train_y == c).flatten() for c in range(num_classes)]
        picks.append(torch.cat([idx[torch.randperm(len(idx), generator=gen)[:shots]] for idx in pick]))
    results = {"linear_probe": {}, f"linear_probe_{shots}shot": {}, "knn": {}}
    for name, (train_x, test_x) in features.items():
        train_x, test_x = train_x.float(), test_x.float()
        results["knn"][name] = knn(train_x, train_y, test_x, test_y, num_classes, k=k)
        # Standardizing with the statistics of the whole training split uses no labels,
        # so the few-shot probes may use them too.
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        full = probe_accuracies([(train_x, train_y)], test_x, test_y, num_classes, weight_decays, max_iter=max_iter,
                                seed=seed)
        few = probe_accuracies([(train_x[p], train_y[p]) for p in picks], test_x, test_y, num_classes,
                               weight_decays, max_iter=max_iter, seed=seed)
        results["linear_probe"][name] = full[0]
        results[f"linear_probe_{shots}shot"][name] = sum(few) / len(few)
    return results


def format_table(results: dict) -> str:
    """The results as a plain-text table: one row per feature set, one column per protocol."""
    protocols = list(results)
    names = list(results[protocols[0]])
    width = max(len(n) for n in names + ["features"])
    head = f"{'features':<{width}}  " + "  ".join(f"{p:>20}" for p in protocols)
    lines = [head, "-" * len(head)]
    for name in names:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * results[p][name]:>19.2f}%" for p in protocols))
    return "\n".join(lines)
