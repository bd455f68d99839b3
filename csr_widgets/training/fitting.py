"""Fitting each stage (the table of what each trains is in stages.py).

One function per stage: ``train_concepts`` (stage 1, on images), ``train_prototypes``
(stage 2, on cached local concept vectors), ``train_task_head`` (stage 3, on cached
scores), and ``refit_task_head`` (stage 3 again, after pruning). Stages 1 and 2 end on
their best validation epoch (``BestEpoch``), stage 3 at its objective's optimum; all in eval mode.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .._batching import loader
from .._distributed import current
from .._inference import evaluating
from ..evaluation import metrics
from ..model import CSRModel
from .features import FeatureCache, autocast, cache_features, cached_scores, concept_vectors
from .losses import box_loss, concept_loss, pixel_loss, prototype_loss
from .run_folder import load_progress, save_progress
from .stages import TrainingPlan, set_stage, trainable_parts


class BestEpoch:
    """The best epoch of one stage so far: its validation score and the stage's trainable
    tensors then. ``restore`` is how every stage ends."""

    def __init__(self, model: CSRModel, stage: int, higher_is_better: bool = True):
        self.model, self.stage, self.higher_is_better = model, stage, higher_is_better
        self.score = None
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, score) -> None:
        """Keep the current tensors if ``score`` (a number, or a tuple compared in order:
        later entries break ties) beats the best so far (NaN never does)."""
        if self.score is None:
            better = score == score if not isinstance(score, tuple) else score[0] == score[0]  # not NaN
        else:
            better = score > self.score if self.higher_is_better else score < self.score
        if better:
            self.record(score)

    def record(self, score: float) -> None:
        """Keep the current tensors as the best, with ``score`` (a resumed stage's best)."""
        self.score, self.state = score, _trainable_state(self.model, self.stage)

    def restore(self) -> None:
        """End the stage: the best epoch's tensors back (when an epoch scored), eval mode."""
        if self.state is not None:
            self.model.load_state_dict(self.state, strict=False)
        self.model.eval()


# ------------------------------------------------------------------ stage 1
class ConceptLogits(nn.Module):
    """Stage 1's forward pass as a module of its own, images -> concept logits (B, K) and
    the CAM (B, K, h, w) they pool: what DistributedDataParallel wraps, so that its
    gradients are averaged across processes."""

    def __init__(self, model: CSRModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        concept_maps = self.model.concept_head(self.model.features(images))
        return self.model.pool_concepts(concept_maps), concept_maps


def box_cells(model: CSRModel, boxes: list, image_size: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """B lists of ground-truth boxes ``(concept, x0, y0, x1, y1)`` -> (B, K, h, w) bool: the
    cells whose centre pixel lies in one of the concept's boxes (``FeatureGrid.centred_in``
    along each axis). Boxes of concepts the model lacks are left out.
    """
    (H, W), (h, w), grid = image_size, cells, model.grid
    mask = np.zeros((len(boxes), len(model.concepts), h, w), dtype=bool)
    for b, image_boxes in enumerate(boxes):
        for k, concept_boxes in enumerate(metrics.boxes_by_concept(image_boxes or [], model.concepts)):
            for box in concept_boxes:
                pixels = metrics.box_pixels(box, H, W)
                if pixels is not None:
                    y_lo, y_hi, x_lo, x_hi = pixels
                    mask[b, k][np.ix_(grid.centred_in(y_lo, y_hi, h), grid.centred_in(x_lo, x_hi, w))] = True
    return torch.from_numpy(mask)


def train_concepts(model: CSRModel, train_set: Dataset, val_set: Dataset | None, plan: TrainingPlan, progress: bool = True, resume_from: Path | None = None) -> list[dict]:
    """Stage 1: F and C on the concept labels (BCE). Keeps the best epoch by validation AUC,
    ties broken by the lower validation BCE (ours: on SyntheticCXR the AUC reaches 1.0 within
    a few epochs, and keeping the first such epoch kept an under-trained backbone;
    docs/decisions.md#stage-1-tie-break).

    With several processes each one reads its share of every epoch (a DistributedSampler)
    and DistributedDataParallel averages the gradients, so the processes stay identical;
    an optimiser step follows every ``plan.accumulation_steps`` batches.
    """
    group = current()
    params = set_stage(model, 1)
    optimizer = torch.optim.AdamW(_param_groups(model, params, plan.weight_decay), lr=plan.concept_lr)
    bf16, pin = plan.uses_bf16(model.device), model.device.type == "cuda"

    def batches(epoch: int):
        return loader(train_set, plan.batch_size, shuffle=True, seed=plan.seed + epoch, num_workers=plan.num_workers, pin_memory=pin, group=group)

    per_epoch = math.ceil(len(batches(0)) / plan.accumulation_steps)
    steps = max(plan.concept_epochs * per_epoch, 1)
    # OneCycleLR divides by pct_start * steps - 1: zero for exactly 10 steps (a tiny run)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, plan.concept_lr, total_steps=steps, pct_start=0.1 if steps != 10 else 0.15)
    history, best, start_epoch = [], BestEpoch(model, 1), 0
    if resume_from is not None and resume_from.is_file():
        start_epoch, best_score, history = load_progress(resume_from, model, optimizer, schedule, layout=_layout(plan, group))
        # with the weights saved after the last epoch; a file from before the tie-break holds the AUC alone
        if best_score is not None:
            best.record(tuple(best_score) if isinstance(best_score, list) else (best_score, -math.inf))
    forward = ConceptLogits(model)
    optimizer.zero_grad(set_to_none=True)
    if group.distributed:
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=[model.device.index] if model.device.type == "cuda" else None)
    bar = tqdm(range(start_epoch, plan.concept_epochs), desc="stage 1: concepts", disable=not (progress and group.is_main))
    for epoch in bar:
        set_stage(model, 1)
        losses = []
        epoch_batches = batches(epoch)
        for step, batch in enumerate(epoch_batches):
            last = (step + 1) % plan.accumulation_steps == 0 or step + 1 == len(epoch_batches)
            images = batch["image"].to(model.device, non_blocking=pin)
            with autocast(model, bf16):
                logits, concept_maps = forward(images)
            loss = concept_loss(logits.float(), batch["concepts"].to(model.device))
            if plan.concept_box_weight > 0:
                if batch.get("boxes") is None:
                    raise ValueError("TrainingPlan.concept_box_weight > 0 needs concept boxes in the training items "
                                     "(a 'boxes' entry); this dataset has none: set concept_box_weight to 0.")
                boxed = box_cells(model, batch["boxes"], tuple(images.shape[-2:]), tuple(concept_maps.shape[-2:]))
                loss = loss + plan.concept_box_weight * box_loss(concept_maps.float(), boxed.to(model.device), model.config.pooling_sharpness)
            # DDP averages gradients when the last batch of a step goes backward, not before
            with nullcontext() if last or not group.distributed else forward.no_sync():
                (loss / plan.accumulation_steps).backward()
            if last:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            losses.append(loss.item())
        train_loss = group.mean(np.mean(losses)) if losses else float("nan")
        auc, val_loss = concept_validation(model, val_set, bf16=bf16, num_workers=plan.num_workers) if val_set is not None else (None, None)
        score = (auc, -val_loss) if val_set is not None else (-train_loss, 0.0)
        best.offer(score)
        history.append({"stage": 1, "epoch": epoch, "train_loss": train_loss, "val_concept_auc": auc, "val_concept_loss": val_loss})
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc=f"{score[0]:.4f}")
        if resume_from is not None:
            save_progress(resume_from, model, optimizer, schedule, epoch + 1, None if best.score is None else list(best.score), layout=_layout(plan, group), history=history)
    best.restore()
    return history


def _layout(plan: TrainingPlan, group) -> dict:
    """What a stage-1 progress file can only be resumed with: the same steps per epoch."""
    return {"processes": group.world_size, "batch_size": plan.batch_size, "accumulation_steps": plan.accumulation_steps}


def concept_auc(model: CSRModel, dataset: Dataset, batch_size: int = 64, bf16: bool = False, num_workers: int = 0) -> float:
    """Mean over concepts of the ROC AUC of the concept logits (``metrics.concept_auc``,
    the AUC the tables report; concepts with one class left out)."""
    return concept_validation(model, dataset, batch_size, bf16, num_workers)[0]


def concept_validation(model: CSRModel, dataset: Dataset, batch_size: int = 64, bf16: bool = False,
                       num_workers: int = 0) -> tuple[float, float]:
    """(concept AUC as ``concept_auc``, mean BCE of the concept logits) on a dataset. Each
    process scores its share of the images; every process gets the same numbers over all."""
    group = current()
    rows = group.shard(len(dataset), batch_size)
    logits, truth = [torch.zeros(0, len(model.concepts))], [torch.zeros(0, len(model.concepts))]
    forward = ConceptLogits(model)
    with evaluating(model):
        for batch in loader(Subset(dataset, rows), batch_size, num_workers=num_workers, pin_memory=model.device.type == "cuda"):
            with autocast(model, bf16):
                logits.append(forward(batch["image"])[0].float().cpu())
            truth.append(batch["concepts"].float())
    truth, logits = group.gather_rows(torch.cat(truth)), group.gather_rows(torch.cat(logits))
    return metrics.mean_auc(metrics.concept_auc(truth, logits)), concept_loss(logits, truth).item()


# ------------------------------------------------------------------ stage 2
def train_prototypes(model: CSRModel, train: FeatureCache, val: FeatureCache | None, plan: TrainingPlan, progress: bool = True) -> list[dict]:
    """Stage 2: P and p with the SoftTriple loss on projected local concept vectors.

    Prototypes start as projected concept vectors of their own concept; a prototype that
    no vector of its concept chose during an epoch is re-seeded on one (with gamma = 1000
    most prototypes die otherwise: docs/decisions.md#prototype-reseeding).
    """
    config = model.config
    generator = torch.Generator().manual_seed(plan.seed)
    if config.pixel_loss_weight > 0:  # the pixel term reads any image's feature map
        train = train.gathered()
    vectors, concepts, images = concept_vectors(model, train)
    if len(vectors) == 0:
        raise ValueError("No training image has any concept present: stage 2 has nothing to learn from.")
    val_vectors = concept_vectors(model, val)[:2] if val is not None else None
    params = set_stage(model, 2)
    device = model.device
    with torch.no_grad():
        _reseed(model, torch.ones_like(model.prototype_mask), vectors, concepts, generator)
    optimizer = torch.optim.AdamW(_param_groups(model, params, plan.weight_decay), lr=plan.prototype_lr)
    history, best = [], BestEpoch(model, 2, higher_is_better=False)
    bar = tqdm(range(plan.prototype_epochs), desc="stage 2: prototypes", disable=not progress)
    for epoch in bar:
        set_stage(model, 2)
        usage = torch.zeros_like(model.prototypes[..., 0], dtype=torch.long, device="cpu")
        order = torch.randperm(len(vectors), generator=generator)
        losses = []
        for start in range(0, len(order), plan.vector_batch_size):
            rows = order[start : start + plan.vector_batch_size]
            projected = model.projector(vectors[rows].to(device))
            prototypes = F.normalize(model.prototypes, dim=-1)
            loss = prototype_loss(projected, concepts[rows].to(device), prototypes, config.lambda_, config.gamma, config.delta)
            if config.pixel_loss_weight > 0:
                frames = images[rows].unique()
                maps = model.similarity(model.project(train.features[frames].to(device)))
                loss = loss + config.pixel_loss_weight * pixel_loss(maps, train.concepts[frames].to(device), config.lambda_)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            with torch.no_grad():
                usage += _assignments(projected, concepts[rows].to(device), prototypes).cpu()
        in_use = int((usage > 0).sum())
        with torch.no_grad():
            _reseed(model, usage == 0, vectors, concepts, generator)
        val_loss = _prototype_val_loss(model, val_vectors) if val_vectors is not None else float(np.mean(losses))
        best.offer(val_loss)
        history.append({"stage": 2, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "prototypes_in_use": in_use})
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val=f"{val_loss:.4f}", in_use=f"{in_use}/{usage.numel()}")
    best.restore()
    return history


def _assignments(projected: torch.Tensor, concepts: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(K, M) how many vectors chose each prototype of their own concept (argmax of q)."""
    own = torch.einsum("vd,vmd->vm", projected, prototypes[concepts])
    counts = torch.zeros(prototypes.shape[:2], dtype=torch.long, device=projected.device)
    counts.index_put_((concepts, own.argmax(-1)), torch.ones_like(concepts), accumulate=True)
    return counts


def _reseed(model: CSRModel, dead: torch.Tensor, vectors: torch.Tensor, concepts: torch.Tensor, generator: torch.Generator) -> int:
    """Put each dead prototype (K, M) on the projection of a random vector of its concept."""
    slots = dead.cpu().nonzero()  # (R, 2): concept, prototype
    if len(slots) == 0:
        return 0
    pools = (concepts[None, :] == slots[:, :1]).float()  # (R, V): vectors of each slot's concept
    has_pool = pools.sum(1) > 0
    slots, pools = slots[has_pool], pools[has_pool]
    if len(slots) == 0:
        return 0
    chosen = torch.multinomial(pools, 1, generator=generator).squeeze(1)
    projected = model.projector(vectors[chosen].to(model.device))
    noise = 0.01 * torch.randn(projected.shape, generator=generator).to(projected)
    model.prototypes[slots[:, 0], slots[:, 1]] = F.normalize(projected + noise, dim=-1)
    return len(slots)


@torch.no_grad()
def _prototype_val_loss(model: CSRModel, val_vectors) -> float:
    vectors, concepts = val_vectors
    if len(vectors) == 0:
        return float("nan")
    config = model.config
    projected = model.projector(vectors.to(model.device))
    return prototype_loss(projected, concepts.to(model.device), F.normalize(model.prototypes, dim=-1), config.lambda_, config.gamma, config.delta).item()


# ------------------------------------------------------------------ stage 3
@torch.no_grad()
def calibrate_task_head(model: CSRModel, scores: torch.Tensor, concepts: torch.Tensor) -> None:
    """At the start of stage 3: the scores' per-prototype mean/std and absent baselines.

    scores (n, K, M), concepts (n, K). A concept present in every image has no absent
    images; its baseline falls back to the 10th percentile of its scores.
    """
    head = model.task_head
    head.score_mean.copy_(scores.mean(0))
    head.score_std.copy_(scores.std(0).clamp(min=1e-4) if len(scores) > 1 else torch.ones_like(head.score_std))
    absent = (concepts == 0).float()  # (n, K)
    counts = absent.sum(0)  # (K,)
    baseline = torch.einsum("nk,nkm->km", absent, scores) / counts.clamp(min=1)[:, None]
    low = scores.quantile(0.1, dim=0)
    model.absent_baseline.copy_(torch.where(counts[:, None] > 0, baseline, low))


def calibrate_novelty(model: CSRModel, train: Dataset | FeatureCache, val: Dataset | FeatureCache | None = None,
                      quantile: float = 0.99, progress: bool = True) -> float:
    """Measure the out-of-distribution statistics of a model whose backbone is trained
    (``model.novelty``, see model/novelty.py): a Gaussian of the training images' pooled
    features, and the threshold at ``quantile`` of the validation images' distances.
    Takes datasets or feature caches; returns the threshold. Training does this when
    stage 3 starts; call it for a model saved without them, then save it again.
    """
    caches = [d if d is None or isinstance(d, FeatureCache) else cache_features(model, d, progress=progress) for d in (train, val)]
    model.novelty.fit(caches[0].pooled_features(), None if caches[1] is None else caches[1].pooled_features(), quantile)
    return float(model.novelty.threshold)


def train_task_head(model: CSRModel, train: FeatureCache, val: FeatureCache | None, plan: TrainingPlan, progress: bool = True,
                    on_progress: Callable[[float], None] | None = None) -> list[dict]:
    """Stage 3: H fitted to the optimum of its convex objective, mean cross-entropy on the
    standardised scores + ``plan.task_l2`` ||W||^2, by full-batch L-BFGS
    (docs/decisions.md#task-head-fit). The rows: every training image's scores, and once
    more with each *absent* concept replaced by its absent baseline with probability
    ``config.concept_dropout``, so that rejecting a concept the image lacks stays in
    distribution (docs/decisions.md#concept-dropout).
    ``on_progress(fraction)`` after each round of iterations (e.g. a widget's progress bar)."""
    generator = torch.Generator().manual_seed(plan.seed + 3)
    scores = cached_scores(model, train)
    calibrate_task_head(model, scores, train.concepts)
    calibrate_novelty(model, train, val)  # F is frozen from here on: its statistics are final
    val_scores = cached_scores(model, val) if val is not None else None
    params = set_stage(model, 3)
    with torch.no_grad():
        model.task_head.linear.reset_parameters()
    # present concepts are never dropped: a present concept at its absent baseline under an
    # unchanged label taught H to predict "tb" without a cavity, and held its training F1 down
    dropped = (train.concepts == 0) & (torch.rand(train.concepts.shape, generator=generator) < model.config.concept_dropout)  # (n, K)
    rows = torch.cat([scores, torch.where(dropped[..., None], model.absent_baseline.cpu(), scores)]).to(model.device)  # (2n, K, M)
    labels = torch.cat([train.labels, train.labels]).to(model.device)
    weight = model.task_head.linear.weight
    # tolerances far below the defaults, and L-BFGS run in rounds of several iterations: with
    # the defaults, or one iteration per call, it stopped short of the optimum on these scores
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=_LBFGS_ROUND, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def penalised_loss() -> torch.Tensor:
        _, logits = model.classify(rows)
        return F.cross_entropy(logits, labels) + plan.task_l2 * weight.square().sum()

    def objective() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = penalised_loss()
        loss.backward()
        return loss

    count = optimizer.param_groups[0]["params"][0]  # L-BFGS keeps its iteration count with its first tensor
    history, previous, reported = [], math.inf, 0.0
    bar = tqdm(total=plan.task_epochs, desc="stage 3: task head", disable=not progress)
    while (done := optimizer.state[count].get("n_iter", 0)) < plan.task_epochs:
        optimizer.param_groups[0]["max_iter"] = min(_LBFGS_ROUND, plan.task_epochs - done)
        optimizer.step(objective)
        with torch.no_grad():
            loss = penalised_loss().item()  # after the round (step returns the loss before it)
        iterations = optimizer.state[count]["n_iter"]
        score = _macro_f1(model, val_scores, val.labels) if val is not None else _macro_f1(model, scores, train.labels)
        history.append({"stage": 3, "epoch": iterations - 1, "train_loss": loss, "val_macro_f1": score})
        bar.update(iterations - done)
        bar.set_postfix(loss=f"{loss:.4f}", val_f1=f"{score:.4f}")
        if iterations == done or previous - loss < 1e-9:  # at the optimum: later iterations change nothing
            break
        previous = loss
        if on_progress is not None:
            reported = iterations / plan.task_epochs
            on_progress(reported)
    bar.close()
    if on_progress is not None and reported < 1.0:
        on_progress(1.0)
    model.eval()
    return history


_LBFGS_ROUND = 10  # stage-3 L-BFGS iterations between progress reports


@torch.no_grad()
def _macro_f1(model: CSRModel, scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Validation macro F1 of H on cached scores: ``metrics.macro_f1``, the F1 the tables report."""
    _, logits = model.classify(scores.to(model.device))
    return metrics.macro_f1(labels, logits.argmax(-1))


def refit_task_head(model: CSRModel, dataset: Dataset | FeatureCache, val_set: Dataset | FeatureCache | None = None, *, epochs: int = 300, seed: int = 0, progress: bool = True,
                    on_progress: Callable[[float], None] | None = None) -> pd.DataFrame:
    """Refit H after pruning prototypes (``model.prototype_mask``) or on new data.

    Stage 3 again: standardisation and baselines re-measured, H trained from scratch on the
    current masks. Takes datasets or feature caches (faster when called repeatedly).
    ``epochs``: L-BFGS iterations at most (``TrainingPlan.task_epochs``; it stops at the optimum).
    ``on_progress(fraction)``: called as the work advances, fraction in [0, 1] (caching
    the features, when datasets are given, counts as the first half).
    """
    to_cache = [d for d in (dataset, val_set) if d is not None and not isinstance(d, FeatureCache)]
    share = 0.5 / len(to_cache) if to_cache else 0.0
    done = 0.0

    def report(start: float, width: float):
        return None if on_progress is None else (lambda fraction: on_progress(start + width * fraction))

    caches = []
    for d in (dataset, val_set):
        if d is not None and not isinstance(d, FeatureCache):
            d = cache_features(model, d, progress=progress, on_progress=report(done, share))
            done += share
        caches.append(d)
    history = train_task_head(model, caches[0], caches[1], TrainingPlan(task_epochs=epochs, seed=seed), progress,
                              on_progress=report(done, 1.0 - done))
    return pd.DataFrame(history)


# ------------------------------------------------------------------ helpers
def _param_groups(model: CSRModel, params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: never on prototypes (they live on the unit
    sphere, decay would pull them to 0), norms or biases."""
    trainable = {id(p) for p in params}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            continue
        (no_decay if name == "prototypes" or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _trainable_state(model: CSRModel, stage: int) -> dict[str, torch.Tensor]:
    parts = trainable_parts(stage)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.split(".")[0] in parts}
