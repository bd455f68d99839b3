""""Check this next": is the top-ranked question worth more than any other?

On the held-out cases the review rule flags, the oracle user (the ground truth) answers
exactly one question per case, chosen by one of three rules, and the macro-F1 gain over
all cases is reported (docs/decisions.md#check-this-next):

- expected effect (the package's ranking): P(no) |margin change if no| +
  P(yes) |margin change if yes|, P(no) = 1 - the concept head's probability;
- margin change alone: the largest |margin change| of either answer, ignoring how likely
  that answer is;
- random: a question drawn uniformly (mean over --draws draws).

    python benchmarks/check_next.py [--n 1000] [--draws 5]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from csr_widgets import SyntheticCXR, load_pretrained
from csr_widgets._batching import iterate_batches
from csr_widgets.evaluation import metrics
from csr_widgets.evaluation.simulation import oracle_answer
from csr_widgets.model import rank_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="held-out SyntheticCXR test images")
    parser.add_argument("--draws", type=int, default=5, help="random questions drawn per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_pretrained("synthetic-cxr", device="cpu")
    data = SyntheticCXR(n=args.n, split="test", seed=0, image_size=model.config.image_size)
    rng = np.random.default_rng(0)
    rules = ["expected effect", "margin change alone"] + [f"random {d}" for d in range(args.draws)]
    labels, before, after, flagged = [], [], {rule: [] for rule in rules}, []
    with torch.inference_mode():
        for batch in iterate_batches(model, data, 32, progress=True, desc="check next"):
            encoding = model.encode(batch.images)
            base = model.reason(encoding)
            for b in range(len(encoding)):
                prediction = int(base.prediction[b])
                labels.append(int(batch.labels[b]))
                before.append(prediction)
                flagged.append(bool(base.needs_review[b]))
                questions = rank_questions(model, encoding[b]) if flagged[-1] else []
                choices = {}
                if questions:
                    choices["expected effect"] = questions[0]
                    choices["margin change alone"] = max(questions, key=lambda q: max(q.change_no, q.change_yes))
                    for d in range(args.draws):
                        choices[f"random {d}"] = questions[rng.integers(len(questions))]
                for rule in rules:
                    answer = None
                    if rule in choices:
                        answer = oracle_answer(choices[rule], batch.concepts[b], batch.boxes[b], model.concepts)
                    after[rule].append(prediction if answer is None else int(model.reason(encoding[b], answer).prediction[0]))
    f1_before = metrics.macro_f1(labels, before)
    gains = {rule: 100 * (metrics.macro_f1(labels, predictions) - f1_before) for rule, predictions in after.items()}
    random_gain = float(np.mean([gains[f"random {d}"] for d in range(args.draws)]))
    print(f"bundled model, {args.n} held-out images, {sum(flagged)} flagged; macro F1 before {100 * f1_before:.2f}")
    print(f"{'rule':<22}{'F1 gain (points)':>18}{'x random':>10}")
    for rule in ("expected effect", "margin change alone"):
        # a ratio to a random gain of ~0 says nothing (it was -782x once): shown only above 0.05 points
        ratio = f"{gains[rule] / random_gain:.1f}" if random_gain > 0.05 else "n/a"
        print(f"{rule:<22}{gains[rule]:>18.2f}{ratio:>10}")
    print(f"{'random (mean)':<22}{random_gain:>18.2f}{1.0:>10.1f}")


if __name__ == "__main__":
    main()
