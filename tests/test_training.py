"""The training helpers of utils/training.py that loops with their own steps share: EpochTally."""
import torch

from utils.training import EpochTally, TrainingRecipe


def test_a_tally_gives_the_mean_loss_per_batch_and_the_accuracy_per_sample():
    tally = EpochTally()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    tally.add(torch.tensor(1.0), logits, torch.tensor([0, 0, 0]))  # 2 of 3 right
    tally.add(0.5, logits[:1], torch.tensor([0]))  # a plain float loss, 1 of 1 right
    stats = tally.stats()
    assert (stats.loss, stats.acc, stats.batches, stats.samples) == (0.75, 0.75, 2, 4) and stats.seconds >= 0
    empty = EpochTally().stats()
    assert (empty.loss, empty.acc, empty.batches, empty.samples) == (0.0, 0.0, 0, 0)


def test_a_cosine_schedule_of_zero_epochs_is_asked_for_its_first_rate_without_dividing_by_zero():
    recipe = TrainingRecipe.from_options({"epochs": 0, "lr_scheduler": "CosineAnnealingLR"})
    assert recipe.lr_factor(0, 10) == 1.0  # LambdaLR asks this when it is built; --epochs 0 then trains nothing
    assert TrainingRecipe.from_options({"epochs": 4, "lr_scheduler": "CosineAnnealingLR"}).lr_factor(20, 10) == 0.5
