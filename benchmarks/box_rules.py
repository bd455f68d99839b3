"""How should a drawn box reach the scores? The four rules, measured with the oracle user.

Runs the simulated clinician (csr_widgets.evaluation.simulation) on held-out SyntheticCXR
images with the bundled model under each combination of the two switches that decide it
(docs/decisions.md#boxes-act-on-cells, #floor-at-absent):

- CSRConfig.box_footprint: "area" (the paper's A averaged over each cell's pixels) or
  "touch" (a box acts fully on every cell it touches);
- CSRConfig.box_floor: False (the paper's) or True (a box lowers a score only down to the
  prototype's absent baseline).

Prints the macro-F1 gain (points) of each oracle feedback on the flagged cases (review)
and on every case (all), and what one true box does to its own concept: the share of
its score kept by a positive box on lesions <= 1.5 cells wide, and how often a negative
box over a finding moves the concept's peak off it.

    python benchmarks/box_rules.py [--n 1000]
"""
from __future__ import annotations

import argparse
import dataclasses

import pandas as pd
import torch

from csr_widgets import SyntheticCXR, load_pretrained
from csr_widgets.evaluation import simulation
from csr_widgets.pretrained import RECIPES

KINDS = ("boxes", "concept_boxes", "reject", "both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="held-out SyntheticCXR test images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_pretrained("synthetic-cxr", device="cpu")
    data = SyntheticCXR(**{**RECIPES["synthetic-cxr"].test, "n": args.n, "image_size": model.config.image_size})
    columns = {}
    for footprint in ("area", "touch"):
        for floor in (False, True):
            model.config = dataclasses.replace(model.config, box_footprint=footprint, box_floor=floor)
            gains = simulation.interaction_gains(simulation.simulate_interaction(model, data, kinds=KINDS, progress=False))
            fidelity = simulation.fidelity_summary(simulation.box_fidelity(model, data, progress=False)).loc["overall"]
            column = {f"F1 gain, {trigger}: {kind}": 100 * row["gain"] for (trigger, kind), row in gains.iterrows()}
            column["true box keeps its concept's score (<= 1.5 cells), %"] = 100 * fidelity["kept (small, mean)"]
            column["negative box moves the peak off the finding, %"] = 100 * fidelity["peak moved off"]
            columns[f"{footprint}{' + floor' if floor else ''}"] = column
    table = pd.DataFrame(columns)
    table.columns.name = "rule"
    print(f"bundled synthetic-cxr model, {args.n} held-out images; 'area' without floor is the paper's rule")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
