"""Use the model a device made: talk to it, compare it with the base and its own adapter, and
export it to llama.cpp, llama-server, Ollama, LM Studio or transformers.

`choose_model` names the model (a device's `aggregated` or `local` adapter of a round, the
`base`, or an adapter file); `generate`, `compare` and `ChatSession` run it through the base's
llama.cpp runtime; `export_model` writes it as a merged GGUF, a base + adapter pair or a PEFT
folder.
"""

from edgefed.runtime.generate import Generation, Sampling
from edgefed.use.chosen import CHOICES, ChosenModel, choose_model
from edgefed.use.export import FORMATS, Export, export_model
from edgefed.use.generate import ChatSession, Compared, compare, generate

__all__ = [
    "CHOICES",
    "FORMATS",
    "ChatSession",
    "ChosenModel",
    "Compared",
    "Export",
    "Generation",
    "Sampling",
    "choose_model",
    "compare",
    "export_model",
    "generate",
]
