"""Trainer pieces in one process: LoRA merge, the resumable sampler, EMA, accumulation arithmetic."""
import pytest
import torch
from torch import nn

from trainer.data_position import ShardedSampler
from trainer.ema import ParameterEMA
from trainer.lora import apply_lora, merge_lora_state_dict
from utils.errors import UserError


class TinyBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"ffn": nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))})])

    def forward(self, x):
        return self.blocks[0]["ffn"](x)


def test_lora_merge_matches_the_adapted_model():
    torch.manual_seed(0)
    model = apply_lora(TinyBlocks(), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # peft starts B at zero; make the adapter matter
    x = torch.randn(3, 8)
    merged = merge_lora_state_dict(model.state_dict(), rank=2, alpha=4.0)
    plain = TinyBlocks()
    plain.load_state_dict(merged)  # official keys only: strict load
    assert torch.allclose(plain(x), model(x), atol=1e-5)


def test_sampler_shards_are_disjoint_resumable_and_reshuffled():
    ranks = [ShardedSampler(10, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    epoch0 = [sum((s.next_indices() for _ in range(2)), []) + s.next_indices()[:1] for s in ranks]
    assert not set(epoch0[0]) & set(epoch0[1])
    sampler = ranks[0]
    state = sampler.state_dict()
    ahead = [sampler.next_indices() for _ in range(4)]
    again = ShardedSampler(10, batch_size=2, rank=0, world_size=2, seed=3)
    again.load_state_dict(state)
    assert [again.next_indices() for _ in range(4)] == ahead
    assert again.epoch >= 1 and again._shard_for(0) != again._shard_for(1)
    with pytest.raises(UserError, match="fewer than the 4 ranks"):
        ShardedSampler(3, 1, 0, 4, 0)


def test_switch_partners_are_other_items_drawn_again_each_epoch():
    sampler = ShardedSampler(5, batch_size=5, rank=0, world_size=1, seed=3)
    indices = list(range(5))
    partners = sampler.partner_indices(indices)
    assert all(0 <= p < 5 and p != i for i, p in zip(indices, partners))
    assert ShardedSampler(5, 5, 0, 1, seed=3).partner_indices(indices) == partners  # from the seed and epoch alone
    per_epoch = []
    for _ in range(4):
        sampler.next_indices()  # one whole epoch
        per_epoch.append(sampler.partner_indices(indices))
    assert len({tuple(p) for p in per_epoch}) > 1


def test_ema_starts_with_a_copy_then_averages():
    model = nn.Linear(2, 2, bias=False)
    ema = ParameterEMA(model, decay=0.5, start_step=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(1)
    assert not ema.started
    ema.update(2)
    assert ema.started and torch.equal(ema.shadow["weight"], torch.ones(2, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(3)
    assert torch.equal(ema.shadow["weight"], torch.full((2, 2), 2.0))
    with ema.swapped_in():
        assert torch.equal(model.weight, torch.full((2, 2), 2.0))
    assert torch.equal(model.weight, torch.full((2, 2), 3.0))


def test_accumulation_steps():
    from trainer.setup import accumulation_steps
    from utils.config import load_config

    config = load_config(None, ["train.batch_size=2", "train.total_batch_size=16"])
    assert accumulation_steps(config, world_size=2) == 4
    with pytest.raises(UserError, match="total_batch_size=16"):
        accumulation_steps(config, world_size=3)


def test_exported_ema_weights_are_the_averages_not_the_live_weights():
    # the export takes the generator's weights, then swaps the EMA in: the first dict must not follow the swap
    from trainer.checkpoint import full_state_dict

    model = nn.Linear(3, 2)
    ema = ParameterEMA(model, decay=0.5, start_step=0)
    ema.update(0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(1)  # shadow = old + 0.5
    generator = full_state_dict(model)
    with ema.swapped_in():
        averaged = full_state_dict(model)
    assert torch.equal(generator["weight"], model.weight)
    assert torch.allclose(averaged["weight"], model.weight - 0.5)
    assert not torch.equal(generator["weight"], averaged["weight"])
