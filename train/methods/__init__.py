"""Training methods: each is a small pluggable piece that prepares the model (and may bring its own Trainer).

A method owns: wrapping the base model (`prepare`), what it saves (`saves_adapter`), and optionally a
Trainer subclass (`trainer_cls`) for objectives beyond next-token loss, e.g. distillation or preference
training, which plug in here without forking the training loop.
"""

from train.methods.base import Method
from train.methods.full import FullFineTuning
from train.methods.peft_methods import DoRA, IA3, LoRA, PromptTuning

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoRA, DoRA, IA3, PromptTuning, FullFineTuning)}


def get_method(name: str) -> Method:
    return METHODS[name]()
