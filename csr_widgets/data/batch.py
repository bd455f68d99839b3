"""collate: items (DESIGN section 7) -> one batch, for torch's DataLoader."""
from __future__ import annotations

import torch


def collate(items: list[dict]) -> dict:
    """Stack what has one shape per image, keep lists of what does not.

    image (B, C, H, W), concepts (B, K), label (B,) long, masks (B, K, H, W) when present;
    boxes, shortcut_box and id stay Python lists of length B.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "label":
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r} of different shapes {sorted(shapes)}; give the dataset an image_size")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
