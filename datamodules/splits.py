"""Train/validation/test splits."""
import torch
from torch import Tensor


def class_balanced_split(y: Tensor, per_class: int, num_val: int, num_test: int, seed: int) -> dict:
    """The reference's label-rate split: ``per_class`` random training nodes of every class,
    then ``num_val`` validation and ``num_test`` test nodes drawn from the rest.

    Draws come from a generator seeded with ``seed`` (the reference uses 123), so the
    split is the same in every run and on every rank. Returns boolean masks.
    """
    generator = torch.Generator().manual_seed(seed)
    train, rest = [], []
    for label in torch.unique(y[y >= 0]):
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        train.append(members[:per_class])
        rest.append(members[per_class:])
    rest = torch.cat(rest)
    rest = rest[torch.randperm(rest.numel(), generator=generator)]
    if rest.numel() < num_val + num_test:
        raise ValueError(f"the split asks for {num_val} validation and {num_test} test nodes but only "
                         f"{rest.numel()} labelled nodes remain after {per_class} training nodes per class")
    chosen = {"train": torch.cat(train), "val": rest[:num_val], "test": rest[num_val:num_val + num_test]}
    masks = {}
    for split, index in chosen.items():
        mask = torch.zeros(y.size(0), dtype=torch.bool)
        mask[index] = True
        masks[f"{split}_mask"] = mask
    return masks
