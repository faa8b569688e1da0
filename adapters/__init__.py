"""Context-PEFT: adapters whose parameters are chosen per token by the token's context.

The method package: typed configs and presets, backbone assembly (vision encoder + connector +
Llama-family LM), context adapter layers (LoRA / IA3 / BitFit), the adapter bank that serves a
batch mixing many adapter sets in one forward pass, and the on-disk format. No web code here;
`service` builds on this package, never the other way round.
"""

__version__ = "0.1.0"
