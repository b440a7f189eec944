"""A deterministic, resumable sampler: distinct shards per rank, reshuffled every epoch from the seed.

The position (epoch, cursor) is part of the checkpoint, so a resumed run reads exactly the items the
uninterrupted run would have read.
"""
from __future__ import annotations

import torch

from utils.errors import UserError


class ShardedSampler:
    """Hands out `batch_size` dataset indices per call; every rank sees its own shard of each epoch."""

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        # every rank takes the same number of items per epoch, so ranks never fall out of step
        self.items_per_rank = num_items // world_size
        if self.items_per_rank == 0:
            raise UserError(
                f"the dataset has {num_items} items, fewer than the {world_size} ranks: expected at least one per rank"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # items of this epoch's shard already handed out
        self._shard = self._shard_for(self.epoch)

    def _shard_for(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        return order[self.rank :: self.world_size][: self.items_per_rank]

    def next_indices(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            if self.cursor == self.items_per_rank:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._shard = self._shard_for(self.epoch)
            indices.append(self._shard[self.cursor])
            self.cursor += 1
        return indices

    def partner_indices(self, indices: list[int]) -> list[int]:
        """Another item for each index (a prompt to switch to), drawn from the seed, the epoch and the index alone, so
        a resumed run draws the same partners."""
        partners = []
        for index in indices:
            other = int(torch.randint(0, max(self.num_items - 1, 1), (1,), generator=self._item_generator(index, 1_000_033)))
            partners.append(other + 1 if self.num_items > 1 and other >= index else other)
        return partners

    def draw_choices(self, indices: list[int], counts: list[int]) -> list[int]:
        """For each index, one of its `counts` options (a row's next prompt), drawn from the seed, the epoch and the
        index alone, the same on a resumed run."""
        return [int(torch.randint(0, count, (1,), generator=self._item_generator(index, 1_000_039)))
                for index, count in zip(indices, counts, strict=True)]

    def draw_below(self, indices: list[int], share: float) -> list[bool]:
        """For each index, whether a uniform draw from the seed, the epoch and the index falls below `share` (which
        rows of a batch of both tasks get their image), the same on a resumed run."""
        return [bool(torch.rand((), generator=self._item_generator(index, 1_000_037)) < share) for index in indices]

    def _item_generator(self, index: int, salt: int) -> torch.Generator:
        """A generator seeded by the run's seed, this epoch and the item (salt: one stream per kind of draw)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * salt + index)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._shard = self._shard_for(self.epoch)
