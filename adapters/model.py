"""ContextPEFTModel: the frozen backbone with context layers injected, plus the sequence
layout, the training loss and the LM call with explicit routing.

    sequence  = [BOS] + connector(vision(image)) + caption tokens (+ EOS when training)
    contexts  =  text  +        image x n_img      + text ...

Every LM call takes a `WeightSource` (the serving bank or one trainable adapter set) and the
per-row slots explicitly; they reach the layers through `use_routing` for that call only.
Generation (a KV cache, rows that join and leave) is `adapters.decoding`, which builds on this
module (this module does not import it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from adapters.backbone import Backbone, decoder_layers, lm_linear
from adapters.config import IMAGE, LM_MODULES, TEXT
from adapters.layers import ContextLinear
from adapters.routing import Routing, use_routing
from adapters.weights import WeightSource


class ContextPEFTModel(nn.Module):
    """A backbone whose LM linears are `ContextLinear`s. Holds no adapter weights itself."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self._inject()
        # Looked up once: Hugging Face's accessor searches the model's attributes per call.
        # Kept outside nn.Module's registry: it is the backbone's module, not a second child.
        object.__setattr__(self, "_embeddings", backbone.lm.get_input_embeddings())

    def _inject(self) -> None:
        for index, layer in enumerate(decoder_layers(self.backbone.lm)):
            for name in LM_MODULES:
                module = lm_linear(layer, name)
                if isinstance(module, ContextLinear):
                    continue
                parent = (
                    layer.self_attn
                    if name in ("q_proj", "k_proj", "v_proj", "o_proj")
                    else layer.mlp
                )
                setattr(parent, name, ContextLinear(module, index, name))

    @property
    def lm(self) -> nn.Module:
        return self.backbone.lm

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backbone.tokenizer

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        embeddings: nn.Module = self.__dict__["_embeddings"]
        # The table's own device (Backbone.device walks the parameters: once per step adds up).
        weight = embeddings.weight
        assert isinstance(weight, torch.Tensor)
        return embeddings(ids.to(weight.device))

    # --- sequence layout ----------------------------------------------------------------
    def prefix(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[BOS] + image embeddings, and their contexts: ([B, 1 + n, d], [B, 1 + n])."""
        batch, n_img, _ = image_embeds.shape
        bos_id = self.backbone.tokenizer.bos_token_id
        bos = self.embed_tokens(torch.full((batch, 1), bos_id, dtype=torch.long))
        embeds = torch.cat([bos.to(image_embeds.dtype), image_embeds], dim=1)
        contexts = torch.full((batch, 1 + n_img), IMAGE, dtype=torch.long, device=embeds.device)
        contexts[:, 0] = TEXT
        return embeds, contexts

    def lm_forward(
        self,
        inputs_embeds: torch.Tensor,
        routing: Routing | None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One LM call with explicit routing; returns logits. `attention_mask` is a 2-D
        padding mask or a ready 4-D additive mask (adapters.decoding builds those)."""
        with use_routing(routing):
            out = self.backbone.lm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
            )
        return out.logits

    # --- training ---------------------------------------------------------------------
    def caption_loss(
        self,
        features: torch.Tensor,
        captions: Sequence[Sequence[int]],
        source: WeightSource,
        slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over caption tokens + EOS (the loss is on caption tokens only),
        and the number of tokens it averages over. Rows are right-padded."""
        device = self.backbone.device
        batch = features.shape[0]
        slots = torch.zeros(batch, dtype=torch.long, device=device) if slots is None else slots
        image_embeds = source.connect(features.to(device), slots)
        prefix, prefix_ctx = self.prefix(image_embeds)
        eos = self.backbone.tokenizer.eos_token_id
        pad = self.backbone.tokenizer.pad_token_id
        targets = [[*c, eos] for c in captions]
        width = max(len(t) for t in targets)
        ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, t in enumerate(targets):
            ids[row, : len(t)] = torch.tensor(t, device=device)
            mask[row, : len(t)] = 1
        # Input = prefix + targets[:-1]; the last prefix position predicts the first caption token.
        text_embeds = self.embed_tokens(ids[:, :-1]).to(prefix.dtype)
        inputs = torch.cat([prefix, text_embeds], dim=1)
        contexts = torch.cat([prefix_ctx, torch.full_like(ids[:, :-1], TEXT)], dim=1)
        attention = torch.cat([torch.ones_like(prefix_ctx), mask[:, :-1]], dim=1)
        routing = Routing(source, slots, contexts)
        logits = self.lm_forward(inputs, routing, attention_mask=attention)
        p = prefix.shape[1]
        predicted = logits[:, p - 1 :, :].float()
        labels = ids.masked_fill(mask == 0, -100)
        loss = nn.functional.cross_entropy(
            predicted.reshape(-1, predicted.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        return loss, int(mask.sum())

    # --- text --------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backbone.tokenizer.decode(list(ids), skip_special_tokens=True))
