"""The training helpers of utils/training.py that loops with their own steps share: EpochTally."""
import torch

from utils.training import EpochTally


def test_a_tally_gives_the_mean_loss_per_batch_and_the_accuracy_per_sample():
    tally = EpochTally()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    tally.add(torch.tensor(1.0), logits, torch.tensor([0, 0, 0]))  # 2 of 3 right
    tally.add(0.5, logits[:1], torch.tensor([0]))  # a plain float loss, 1 of 1 right
    stats = tally.stats()
    assert (stats.loss, stats.acc, stats.batches, stats.samples) == (0.75, 0.75, 2, 4) and stats.seconds >= 0
    empty = EpochTally().stats()
    assert (empty.loss, empty.acc, empty.batches, empty.samples) == (0.0, 0.0, 0, 0)
