"""The defenses and attacks this toolkit ships. The batch runner, the benchmark, the help texts, the defense frame and
the tests read these two registries; nothing else keeps a list of them. Each entry's script is <kind>/<name>.py and
its defaults are under config/<kind>/<name>/."""
from dataclasses import dataclass

from utils.registry import Registry


@dataclass(frozen=True)
class Method:
    kind: str  # "defense" or "attack"
    name: str  # file and folder name, BackdoorBench's where it has one
    title: str  # as papers and tables write it
    summary: str  # one line for help texts

    @property
    def script(self):
        return f"{self.kind}/{self.name}.py"

    @property
    def config_folder(self):
        return f"config/{self.kind}/{self.name}"


DEFENSES = Registry("defense")
ATTACKS = Registry("attack")

for _name, _title, _summary in (
        ("ulrl", "ULRL", "unlearn by gradient ascent, re-initialise the neurons that moved most, relearn"),
        ("tsbd", "TSBD", "neuron weight-change ranking, zero-reinitialisation, activeness-aware fine-tuning"),
        ("ft", "FT", "fine-tuning on the clean subset"),
        ("fp", "FP", "prune the channels least active on clean data, then fine-tune"),
        ("nad", "NAD", "neural attention distillation from a fine-tuned teacher"),
        ("nc", "NC", "Neural Cleanse: reverse a trigger per class, unlearn the outliers'"),
        ("anp", "ANP", "adversarial neuron perturbation, prune by learned masks"),
        ("rnp", "RNP", "reconstructive neuron pruning: unlearn, recover masks, prune"),
        ("clp", "CLP", "channel Lipschitz pruning, data-free"),
        ("fst", "FST", "feature shift tuning of the classifier head"),
        ("ibau", "i-BAU", "implicit backdoor adversarial unlearning"),
        ("sau", "SAU", "shared adversarial unlearning")):
    DEFENSES.add(_name, Method("defense", _name, _title, _summary))

for _name, _title, _summary in (
        ("badnet", "BadNets", "a 3x3 white patch at the bottom-right corner"),
        ("blended", "Blended", "a fixed image blended in at alpha 0.2"),
        ("sig", "SIG", "a sinusoidal signal on target-class images (clean-label)"),
        ("wanet", "WaNet", "a smooth warping field, with noise-mode samples"),
        ("bpp", "BPP", "colour-depth reduction with dithering, with negative samples"),
        ("inputaware", "Input-aware", "a trigger generated per image, with cross-trigger samples")):
    ATTACKS.add(_name, Method("attack", _name, _title, _summary))
