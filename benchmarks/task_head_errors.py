"""Where the bundled model's errors come from: the concept head or the task head.

For each held-out image: the prediction, whether the review rule flags it, and the concept
head's own verdict (concept logit > 0) per concept. If the concept head's verdicts, put
through SyntheticCXR's label rule, give the right class where the model does not, the
error is the task head's reading of the prototype scores (docs/decisions.md#task-head-fit).

    python benchmarks/task_head_errors.py [--n 1000] [--seed 0]
"""
from __future__ import annotations

import argparse

import torch

from csr_widgets import SyntheticCXR, load_pretrained
from csr_widgets.data.synthetic import label_of
from csr_widgets.pretrained import RECIPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="held-out images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    args = parser.parse_args()
    model = load_pretrained("synthetic-cxr", device="cpu")
    data = SyntheticCXR(**{**RECIPES["synthetic-cxr"].test, "n": args.n, "seed": args.seed})
    predicted, flagged, verdicts, concepts, labels = [], [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(data), 100):
            items = [data[i] for i in range(start, min(start + 100, len(data)))]
            encoding = model.encode(torch.stack([item["image"] for item in items]))
            reasoning = model.reason(encoding)
            predicted.append(reasoning.probs.argmax(-1))
            flagged.append(reasoning.needs_review)
            verdicts.append((encoding.concept_logits > 0).int())
            concepts.append(torch.stack([item["concepts"].int() for item in items]))
            labels.append(torch.tensor([item["label"] for item in items]))
    predicted, flagged, verdicts, concepts, labels = map(torch.cat, (predicted, flagged, verdicts, concepts, labels))
    wrong = predicted != labels
    concepts_right = (verdicts == concepts).all(-1)
    rule = torch.as_tensor(label_of(verdicts.numpy()))
    print(f"{len(data)} held-out images (seed {args.seed}): {int(wrong.sum())} errors, {int(flagged.sum())} flagged, "
          f"{int((wrong & flagged).sum())} of the errors flagged")
    print(f"errors where the concept head has every concept right: {int((wrong & concepts_right).sum())} of {int(wrong.sum())}")
    print(f"the concept head's verdicts through the label rule: accuracy {100 * float((rule == labels).float().mean()):.1f}%")


if __name__ == "__main__":
    main()
