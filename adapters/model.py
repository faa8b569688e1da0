"""ContextPEFTModel: the frozen backbone with context layers injected, plus the sequence
layout, the training loss and greedy generation with a KV cache.

    sequence  = [BOS] + connector(vision(image)) + caption tokens (+ EOS when training)
    contexts  =  text  +        image x n_img      + text ...

Every LM call takes a `WeightSource` (the serving bank or one trainable adapter set) and the
per-row slots explicitly; they reach the layers through `use_routing` for that call only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from adapters.backbone import Backbone, decoder_layers, lm_linear
from adapters.config import IMAGE, LM_MODULES, TEXT
from adapters.decoding import NON_FINITE, DecodeState
from adapters.layers import ContextLinear
from adapters.routing import Path, Routing, WeightSource, use_routing


class ContextPEFTModel(nn.Module):
    """A backbone whose LM linears are `ContextLinear`s. Holds no adapter weights itself."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self._inject()

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
        embeddings = self.backbone.lm.get_input_embeddings()
        return embeddings(ids.to(self.backbone.device))

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

    # --- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        source: WeightSource,
        slots: torch.Tensor,
        max_new_tokens: int | Sequence[int],
        path: Path = "row",
        decode_path: Path | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of one static batch with a KV cache. Each row stops at EOS or its
        own token limit and leaves the batch; returns the generated ids per row (EOS
        excluded). A row whose logits stop being finite ends there (see NON_FINITE). The serving engine drives `DecodeState` itself, so that rows can also join
        between steps; both decode the same way, token for token."""
        batch = features.shape[0]
        limits = (
            [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
        )
        state, tokens = DecodeState.prefill(self, source, features, slots, path, decode_path)
        eos = self.backbone.tokenizer.eos_token_id
        outputs: list[list[int]] = [[] for _ in range(batch)]
        active = list(range(batch))  # original row index of each row still in the batch
        while True:
            keep = []
            for pos, (row, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
                ends = token in (eos, NON_FINITE)
                # A row whose limit is 0 still takes part in the prefill but emits nothing.
                if not ends and len(outputs[row]) < limits[row]:
                    outputs[row].append(token)
                if not ends and len(outputs[row]) < limits[row]:
                    keep.append(pos)
            if not keep:
                return outputs
            if len(keep) < len(active):
                active = [active[k] for k in state.keep(keep)]
            tokens = state.step()

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backbone.tokenizer.decode(list(ids), skip_special_tokens=True))
