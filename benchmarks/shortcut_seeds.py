"""The shortcut experiment over several seeds: does pruning + refit beat refitting alone?

Each seed trains a small model (96 px, resnet18 to stage 2) on SyntheticCXR with a corner
marker correlated with "tb" (phi = 0.9; "tb" means a cavity here, faint cavities, no nodules
or consolidations), finds the prototypes whose maps peak on the marker, prunes them and
refits the task head (``run_shortcut_experiment``), and compares with the same refit
without pruning (the control). It also draws a negative box over the marker on every
decorrelated test image that has one (the unpruned model): "tb | marker" is the share of
those images predicted tb before, "tb | marker, box" with the box, "tb | no marker" the
share among images without a marker, "negative box" the macro F1 with the boxes. Prints
one row per seed, then the mean and the spread.

    python benchmarks/shortcut_seeds.py                 # seeds 1-5, 3-11 min each on one core (3 when quiet)
    python benchmarks/shortcut_seeds.py --seeds 1 2 --prototypes 4

Single-threaded: multi-threaded CPU training is not bit-reproducible.
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from csr_widgets import CSRConfig, SyntheticCXR
from csr_widgets.evaluation import evaluate
from csr_widgets.evaluation.report import classification_summary
from csr_widgets.evaluation.shortcut import run_shortcut_experiment
from csr_widgets.training import TrainingPlan, refit_task_head

LESIONS = {"nodule": {"prevalence": 0.0}, "consolidation": {"prevalence": 0.0}, "cavity": {"contrast": 0.6}}


def one_seed(seed: int, prototypes: int, n_train: int) -> dict:
    common = dict(seed=seed, image_size=96, shortcut="marker", shortcut_correlation=0.9, lesions=LESIONS)
    train_set = SyntheticCXR(n=n_train, split="train", **common)
    val_set = SyntheticCXR(n=200, split="val", **common)
    test_set = val_set.decorrelate(n=300)
    config = CSRConfig(concepts=train_set.concepts, classes=train_set.classes, backbone="resnet18", feature_stage=2,
                       image_size=96, prototypes_per_concept=prototypes, embedding_dim=32, concept_pooling="lse")
    plan = TrainingPlan(concept_epochs=8, prototype_epochs=15, task_epochs=30, seed=seed)
    start = time.perf_counter()
    experiment = run_shortcut_experiment(train_set, val_set, test_set, config, train_kwargs={"plan": plan},
                                         refit_kwargs={"epochs": 30})
    control = copy.deepcopy(experiment.model)
    refit_task_head(control, train_set, epochs=30, progress=False)
    f1 = experiment.table["macro_f1"].tolist()
    control_f1 = classification_summary(evaluate(control, test_set, progress=False))["macro_f1"]
    cavity = train_set.concepts.index("cavity")
    box = experiment.negative_box  # a negative box over the marker, unpruned model, decorrelated split
    return {"seed": seed, "correlated": f1[0], "before": f1[1], "pruned + refit": f1[2], "refit only": control_f1,
            "gain over control": f1[2] - control_f1, "negative box": box["macro F1 with the negative box"],
            "tb | marker": box["predicted tb, with shortcut, before"],
            "tb | marker, box": box["predicted tb, with shortcut, negative box"],
            "tb | no marker": box["predicted tb, without shortcut"],
            "pruned": int(experiment.shortcut_mask.sum()),
            "pruned cavity": int(experiment.shortcut_mask[cavity].sum()), "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--prototypes", type=int, default=8, help="prototypes per concept (M)")
    parser.add_argument("--n-train", type=int, default=800)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(seed, args.prototypes, args.n_train))
        print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True)
    table = pd.DataFrame(rows).set_index("seed")
    print(f"\nM = {args.prototypes}, {args.n_train} training images; macro F1 on the decorrelated test split")
    print(table.round(3).to_string())
    summary = table.drop(columns=["pruned", "pruned cavity", "minutes"]).agg(["mean", "std", "min", "max"])
    print(summary.round(3).to_string())
    wins = int((table["gain over control"] > 0).sum())
    print(f"pruning + refit beat the refit-only control in {wins} of {len(table)} seeds")


if __name__ == "__main__":
    main()
