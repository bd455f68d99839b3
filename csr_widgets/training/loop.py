"""Training: the three stages (see stages.py), with cached features after stage 1.

Once F and C are frozen (stages 2 and 3) every image's feature map f is computed once and
kept in memory, so stages 2 and 3 cost seconds: stage 2 trains on local concept vectors,
stage 3 on scores, both derived from the cache by the model's own functions.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score, roc_auc_score
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import collate
from ..model import CSRModel
from ..model.checkpoint import load_weights
from .losses import concept_loss, concept_similarities, local_concept_vectors, pixel_loss, prototype_loss
from .stages import set_stage, trainable_parts


@dataclass
class TrainingPlan:
    """How long and how fast each stage trains."""

    concept_epochs: int = 15  # stage 1 epochs over the training images
    prototype_epochs: int = 30  # stage 2 epochs over the local concept vectors
    task_epochs: int = 60  # stage 3 epochs over the cached scores
    batch_size: int = 32  # images per stage-1 step
    vector_batch_size: int = 256  # local concept vectors per stage-2 step
    concept_lr: float = 1e-3  # AdamW, cosine decay, stage 1
    prototype_lr: float = 1e-3  # AdamW, stage 2
    task_lr: float = 1e-2  # AdamW, stage 3
    weight_decay: float = 1e-4  # on weights; never on prototypes, norms or biases
    seed: int = 0  # everything random in training follows from it


@dataclass
class FeatureCache:
    """Frozen-backbone outputs for a whole dataset.

    features: (n, C, h, w) f;  concepts: (n, K);  labels: (n,);  image_size: (H, W)
    """

    features: torch.Tensor
    concepts: torch.Tensor
    labels: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield slice(start, start + batch_size)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def check_dataset(model: CSRModel, dataset: Dataset, what: str) -> None:
    """Refuse a dataset whose concept or class names are not the model's, in order."""
    for field in ("concepts", "classes"):
        names = list(getattr(dataset, field, []))
        if names != list(getattr(model, field)):
            raise ValueError(f"The {what} set's {field} {names} differ from the model's {getattr(model, field)}.")


# ------------------------------------------------------------------ caches
@torch.no_grad()
def cache_features(model: CSRModel, dataset: Dataset, batch_size: int = 64, progress: bool = True,
                   on_progress: Callable[[float], None] | None = None) -> FeatureCache:
    """Run the frozen backbone once over a dataset. ``on_progress(fraction)`` after each batch."""
    was_training = model.training
    model.eval()
    features, concepts, labels = [], [], []
    batches = loader(dataset, batch_size)
    for step, batch in enumerate(tqdm(batches, desc="caching features", disable=not progress, leave=False)):
        features.append(model.features(batch["image"]).cpu())
        concepts.append(batch["concepts"])
        labels.append(batch["label"])
        image_size = tuple(batch["image"].shape[-2:])
        if on_progress is not None:
            on_progress((step + 1) / len(batches))
    model.train(was_training)
    return FeatureCache(torch.cat(features), torch.cat(concepts), torch.cat(labels), image_size)


@torch.no_grad()
def cached_scores(model: CSRModel, cache: FeatureCache, batch_size: int = 256) -> torch.Tensor:
    """(n, K, M) scores s without interaction, through the model's own encode/reason."""
    device = model.device
    return torch.cat([
        model.reason(model.encode_features(cache.features[rows].to(device), cache.image_size)).scores.cpu()
        for rows in cache.batches(batch_size)
    ])


@torch.no_grad()
def concept_vectors(model: CSRModel, cache: FeatureCache, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local concept vectors (Eq. 2) of every present concept of every image.

    -> vectors (V, C), their concept index (V,), their image index (V,).
    """
    vectors, concepts, images = [], [], []
    device = model.device
    for rows in cache.batches(batch_size):
        features = cache.features[rows].to(device)
        v = local_concept_vectors(features, model.concept_head(features)).cpu()  # (B, K, C)
        image, concept = cache.concepts[rows].nonzero(as_tuple=True)
        vectors.append(v[image, concept])
        concepts.append(concept)
        images.append(image + rows.start)
    return torch.cat(vectors), torch.cat(concepts), torch.cat(images)


# ------------------------------------------------------------------ stage 1
def train_concepts(model: CSRModel, train_set: Dataset, val_set: Dataset | None, plan: TrainingPlan, progress: bool = True, resume_from: Path | None = None) -> list[dict]:
    """Stage 1: F and C on the concept labels (BCE). Keeps the best epoch by validation AUC,
    ties broken by the lower validation BCE (ours: on SyntheticCXR the AUC reaches 1.0 within
    a few epochs, and keeping the first such epoch kept an under-trained backbone;
    docs/decisions.md)."""
    params = set_stage(model, 1)
    optimizer = torch.optim.AdamW(_param_groups(model, params, plan.weight_decay), lr=plan.concept_lr)
    steps = plan.concept_epochs * math.ceil(len(train_set) / plan.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, plan.concept_lr, total_steps=max(steps, 1), pct_start=0.1)
    history, best, start_epoch = [], ([-math.inf, -math.inf], None), 0  # ([AUC, -BCE], state)
    if resume_from is not None and resume_from.is_file():
        start_epoch, best_score = _load_progress(resume_from, model, optimizer, schedule)
        best = (list(np.atleast_1d(best_score)) + [-math.inf])[:2], _trainable_state(model, 1)
    bar = tqdm(range(start_epoch, plan.concept_epochs), desc="stage 1: concepts", disable=not progress)
    for epoch in bar:
        set_stage(model, 1)
        losses = []
        for batch in loader(train_set, plan.batch_size, shuffle=True, seed=plan.seed + epoch):
            features = model.features(batch["image"])
            logits = model.pool_concepts(model.concept_head(features))
            loss = concept_loss(logits, batch["concepts"].to(model.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        auc, val_loss = concept_validation(model, val_set) if val_set is not None else (None, None)
        score = [auc, -val_loss] if val_set is not None else [-float(np.mean(losses)), 0.0]
        if score > best[0]:
            best = (score, _trainable_state(model, 1))
        history.append({"stage": 1, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_concept_auc": auc,
                        "val_concept_loss": val_loss})
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_auc=f"{score[0]:.4f}")
        if resume_from is not None:
            _save_progress(resume_from, model, optimizer, schedule, epoch + 1, best[0])
    if best[1] is not None:
        model.load_state_dict(best[1], strict=False)
    model.eval()
    return history


def concept_auc(model: CSRModel, dataset: Dataset, batch_size: int = 64) -> float:
    """Mean over concepts of the ROC AUC of the concept logits (concepts with one class skipped)."""
    return concept_validation(model, dataset, batch_size)[0]


@torch.no_grad()
def concept_validation(model: CSRModel, dataset: Dataset, batch_size: int = 64) -> tuple[float, float]:
    """(concept AUC as ``concept_auc``, mean BCE of the concept logits) on a dataset."""
    model.eval()
    logits, truth = [], []
    for batch in loader(dataset, batch_size):
        features = model.features(batch["image"])
        logits.append(model.pool_concepts(model.concept_head(features)).cpu())
        truth.append(batch["concepts"])
    logits, truth = torch.cat(logits).numpy(), torch.cat(truth).numpy()
    aucs = [roc_auc_score(truth[:, k], logits[:, k]) for k in range(truth.shape[1]) if 0 < truth[:, k].sum() < len(truth)]
    loss = concept_loss(torch.from_numpy(logits), torch.from_numpy(truth)).item()
    return (float(np.mean(aucs)) if aucs else float("nan")), loss


# ------------------------------------------------------------------ stage 2
def train_prototypes(model: CSRModel, train: FeatureCache, val: FeatureCache | None, plan: TrainingPlan, progress: bool = True) -> list[dict]:
    """Stage 2: P and p with the SoftTriple loss on projected local concept vectors.

    Prototypes start as projected concept vectors of their own concept; a prototype that
    no vector of its concept chose during an epoch is re-seeded on one (with gamma = 1000
    most prototypes die otherwise: DESIGN section 2).
    """
    config = model.config
    generator = torch.Generator().manual_seed(plan.seed)
    vectors, concepts, images = concept_vectors(model, train)
    if len(vectors) == 0:
        raise ValueError("No training image has any concept present: stage 2 has nothing to learn from.")
    val_vectors = concept_vectors(model, val)[:2] if val is not None else None
    params = set_stage(model, 2)
    device = model.device
    with torch.no_grad():
        _reseed(model, torch.ones_like(model.prototype_mask), vectors, concepts, generator)
    optimizer = torch.optim.AdamW(_param_groups(model, params, plan.weight_decay), lr=plan.prototype_lr)
    history, best = [], (math.inf, None)
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
        if val_loss < best[0]:
            best = (val_loss, _trainable_state(model, 2))
        history.append({"stage": 2, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "prototypes_in_use": in_use})
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val=f"{val_loss:.4f}", in_use=f"{in_use}/{usage.numel()}")
    if best[1] is not None:
        model.load_state_dict(best[1], strict=False)
    model.eval()
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
    images; its baseline falls back to its lowest observed scores' mean (the 10% least).
    """
    head = model.task_head
    head.score_mean.copy_(scores.mean(0))
    head.score_std.copy_(scores.std(0).clamp(min=1e-4) if len(scores) > 1 else torch.ones_like(head.score_std))
    absent = (concepts == 0).float()  # (n, K)
    counts = absent.sum(0)  # (K,)
    baseline = torch.einsum("nk,nkm->km", absent, scores) / counts.clamp(min=1)[:, None]
    low = scores.quantile(0.1, dim=0)
    model.absent_baseline.copy_(torch.where(counts[:, None] > 0, baseline, low))


def train_task_head(model: CSRModel, train: FeatureCache, val: FeatureCache | None, plan: TrainingPlan, progress: bool = True,
                    on_progress: Callable[[float], None] | None = None) -> list[dict]:
    """Stage 3: H with cross-entropy on the scores, with concept dropout (ours).
    ``on_progress(fraction)`` after each epoch (e.g. a widget's progress bar)."""
    generator = torch.Generator().manual_seed(plan.seed + 3)
    scores = cached_scores(model, train)
    calibrate_task_head(model, scores, train.concepts)
    val_scores = cached_scores(model, val) if val is not None else None
    params = set_stage(model, 3)
    with torch.no_grad():
        model.task_head.linear.reset_parameters()
    optimizer = torch.optim.AdamW(_param_groups(model, params, plan.weight_decay), lr=plan.task_lr)
    device, dropout = model.device, model.config.concept_dropout
    labels = train.labels
    history, best = [], (-math.inf, None)
    bar = tqdm(range(plan.task_epochs), desc="stage 3: task head", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(scores), generator=generator)
        losses = []
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            batch = scores[rows]
            dropped = torch.rand(batch.shape[:2], generator=generator) < dropout  # (B, K)
            batch = torch.where(dropped[..., None], model.absent_baseline.cpu(), batch)
            _, logits = model.classify(batch.to(device))
            loss = F.cross_entropy(logits, labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        score = _macro_f1(model, val_scores, val.labels) if val is not None else _macro_f1(model, scores, labels)
        if score > best[0]:
            best = (score, _trainable_state(model, 3))
        history.append({"stage": 3, "epoch": epoch, "train_loss": float(np.mean(losses)), "val_macro_f1": score})
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_f1=f"{score:.4f}")
        if on_progress is not None:
            on_progress((epoch + 1) / plan.task_epochs)
    if best[1] is not None:
        model.load_state_dict(best[1], strict=False)
    model.eval()
    return history


@torch.no_grad()
def _macro_f1(model: CSRModel, scores: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = model.classify(scores.to(model.device))
    return float(f1_score(labels.numpy(), logits.argmax(-1).cpu().numpy(), average="macro", labels=range(len(model.classes)), zero_division=0))


def refit_task_head(model: CSRModel, dataset: Dataset | FeatureCache, val_set: Dataset | FeatureCache | None = None, *, epochs: int = 60, seed: int = 0, progress: bool = True,
                    on_progress: Callable[[float], None] | None = None) -> pd.DataFrame:
    """Refit H after pruning prototypes (``model.prototype_mask``) or on new data.

    Stage 3 again: standardisation and baselines re-measured, H trained from scratch on the
    current masks. Takes datasets or feature caches (faster when called repeatedly).
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


# ------------------------------------------------------------------ the whole recipe
def train(model: CSRModel, train_set: Dataset, val_set: Dataset | None = None, plan: TrainingPlan | None = None, *, out_dir=None, stages=(1, 2, 3), progress: bool = True) -> pd.DataFrame:
    """Train a CSRModel in three stages; returns the per-epoch history.

    With ``out_dir``, each finished stage is saved as ``stage{n}.safetensors`` (the best
    epoch by validation), stage 1 also after every epoch (``stage1-progress.safetensors``,
    with the optimiser), and a later call with the same ``out_dir`` resumes where the last
    one stopped: finished stages are loaded, not retrained. ``model.safetensors`` is the
    final model. Deterministic on CPU for a given ``plan.seed``.
    """
    plan = plan or TrainingPlan()
    check_dataset(model, train_set, "training")
    if val_set is not None:
        check_dataset(model, val_set, "validation")
    torch.manual_seed(plan.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []  # rows of the stages trained by this call
    caches: tuple[FeatureCache, FeatureCache | None] | None = None
    for stage in (1, 2, 3):
        done = out / f"stage{stage}.safetensors" if out is not None else None
        if done is not None and done.is_file():
            load_weights(model, done)
            continue
        if stage not in stages:
            continue
        if stage == 1:
            progress_file = out / "stage1-progress.safetensors" if out is not None else None
            history += train_concepts(model, train_set, val_set, plan, progress, resume_from=progress_file)
        else:
            if caches is None:
                caches = (cache_features(model, train_set, progress=progress), cache_features(model, val_set, progress=progress) if val_set is not None else None)
            step = train_prototypes if stage == 2 else train_task_head
            history += step(model, *caches, plan, progress)
        if done is not None:
            model.save(done)
    frame = pd.DataFrame(history)
    if out is not None:
        model.save(out / "model.safetensors")
        frame = _merge_history(out / "history.csv", frame)
    return frame


def _merge_history(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """The run's whole history: earlier rows of stages not retrained now, then the new rows.
    A resumed run therefore never loses what the first one recorded."""
    if path.is_file() and path.stat().st_size > 1:
        old = pd.read_csv(path)
        if not new.empty and "stage" in old:
            old = old[~old["stage"].isin(new["stage"].unique())]
        new = pd.concat([old, new], ignore_index=True)
    new.to_csv(path, index=False)
    return new


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


def _save_progress(path: Path, model: CSRModel, optimizer, schedule, epoch: int, best: list[float]) -> None:
    """Model and optimiser state as tensors; counters as JSON metadata (nothing pickled)."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    metadata = {"epoch": str(epoch), "best": json.dumps(best), "schedule": json.dumps(schedule.state_dict(), default=float),
                "param_groups": json.dumps(state["param_groups"])}
    save_file(tensors, str(path), metadata=metadata)


def _load_progress(path: Path, model: CSRModel, optimizer, schedule) -> tuple[int, list[float] | float]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(metadata["param_groups"])})
    schedule.load_state_dict(json.loads(metadata["schedule"]))
    return int(metadata["epoch"]), json.loads(metadata["best"])
