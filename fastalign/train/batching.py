"""Batching: tokenized examples -> padded (B, T) tensors, sequence packing, and the sampler that picks which
examples each step sees (shuffled per epoch, sharded over processes, resumable)."""
from __future__ import annotations


import torch

from fastalign.train.data import IGNORE

# a fresh permutation per epoch: generator seed = seed * EPOCH_SEED_STRIDE + epoch (a prime stride)
EPOCH_SEED_STRIDE = 100003


def pad_right(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)


def attention_mask(seqs: list[list[int]], *, left: bool = False) -> torch.Tensor:
    """(B, T) int64: 1 on each sequence's tokens, 0 on the padding :func:`pad_right` (``left``: :func:`pad_left`)
    adds."""
    ones = [[1] * len(s) for s in seqs]
    return pad_left(ones, 0) if left else pad_right(ones, 0)


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on padding), all (B, T)."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": attention_mask(ids),
        "labels": pad_right([e["labels"] for e in examples], IGNORE),
    }


def pack_sft(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples and cut the stream into rows of ``max_length`` tokens (the last may be shorter).
    Label masks travel with their tokens."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids), max_length)]


def collate_preference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, (2B, T) right-padded, labels IGNORE on prompt and padding."""
    seqs, labels = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            seqs.append(e["prompt_ids"] + e[key])
            labels.append([IGNORE] * len(e["prompt_ids"]) + e[key])
    return {
        "input_ids": pad_right(seqs, pad_id),
        "attention_mask": attention_mask(seqs),
        "labels": pad_right(labels, IGNORE),
    }


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``input_ids``, ``attention_mask`` (B, T)."""
    ids = [e["prompt_ids"] for e in examples]
    return {"input_ids": pad_left(ids, pad_id), "attention_mask": attention_mask(ids, left=True)}


class Sampler:
    """An endless, resumable stream of example indices: a fresh seeded permutation each epoch, each global
    batch split across ranks (rank r takes its contiguous slice), so N processes see what one process with
    N times the batch would. ``state_dict`` is the data position saved in checkpoints."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if size < 1:
            raise ValueError("Sampler needs at least one example")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self) -> list[int]:
        """This rank's indices of the next global batch (batch_size * world_size examples)."""
        out = []
        for _ in range(self.batch_size * self.world_size):
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
