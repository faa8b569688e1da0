"""Baselines of the serving benchmark, each behind the same `submit(adapter, pixels)`:

    (b) BaseServer         the backbone with no adapters (one shared connector), batched like
                           the engine: up to max_batch rows, waiting at most max_wait
    (c) PeftServer naive   PEFT LoRA model, `set_adapter` per request, batch 1
    (d) PeftServer mixed   PEFT LoRA model, mixed-adapter batches through `adapter_names=`

All three decode greedily with a KV cache, finished rows leaving the batch, in the same loop
(`greedy`), so they differ from the engine only in how adapters are applied and batched.
PEFT applies one LoRA to every token (context-agnostic: the adapter sets' text-context
weights), which costs the same FLOPs as the engine's per-context product.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn
from transformers import DynamicCache

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone, decoder_layers, lm_linear
from adapters.config import FUSED_GATE_UP, LM_MODULES, TEXT

LmCall = Callable[[torch.Tensor, DynamicCache, list[int]], torch.Tensor]


@torch.no_grad()
def greedy(
    backbone: Backbone, lm_call: LmCall, image_embeds: torch.Tensor, max_new_tokens: int
) -> list[list[int]]:
    """[BOS] + image embeddings, then greedy decoding; `lm_call(embeds, cache, rows)` gets the
    original indices of the rows still running."""
    batch = image_embeds.shape[0]
    tok = backbone.tokenizer
    embed = backbone.lm.get_input_embeddings()
    bos = embed(torch.full((batch, 1), tok.bos_token_id, device=image_embeds.device))
    cache = DynamicCache(config=backbone.lm.config)
    active = list(range(batch))
    logits = lm_call(torch.cat([bos, image_embeds], dim=1), cache, active)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    while active:
        next_ids = logits[:, -1].argmax(dim=-1)
        keep = []
        for pos, (row, token) in enumerate(zip(active, next_ids.tolist(), strict=True)):
            if token != tok.eos_token_id:
                outputs[row].append(token)
                if len(outputs[row]) < max_new_tokens:
                    keep.append(pos)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            next_ids = next_ids.index_select(0, index)
            active = [active[k] for k in keep]
        logits = lm_call(embed(next_ids.unsqueeze(1)), cache, active)
    return outputs


@dataclass
class _Job:
    adapter: int
    pixels: torch.Tensor
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop
    arrival: float


class BatchServer:
    """A worker thread forming FIFO batches of up to `max_batch` requests (waiting at most
    `max_wait_s` after the first) and running `step(adapters, pixels) -> tokens per row`."""

    def __init__(
        self,
        step: Callable[[list[int], torch.Tensor], list[list[int]]],
        max_batch: int,
        max_wait_s: float,
    ) -> None:
        self.step = step
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches = 0
        self.rows = 0
        self.adapters = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    async def submit(self, adapter: int, pixels: torch.Tensor) -> int:
        loop = asyncio.get_running_loop()
        job = _Job(adapter, pixels, loop.create_future(), loop, time.perf_counter())
        self._queue.put(job)
        return await job.future

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            fill_by = first.arrival + self.max_wait_s
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, fill_by - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                jobs.append(job)
            tokens = self.step([j.adapter for j in jobs], torch.stack([j.pixels for j in jobs]))
            self.batches += 1
            self.rows += len(jobs)
            self.adapters += len({j.adapter for j in jobs})
            for job, ids in zip(jobs, tokens, strict=True):
                job.loop.call_soon_threadsafe(job.future.set_result, len(ids))

    def counters(self) -> tuple[int, int, int]:
        return self.batches, self.rows, self.adapters

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


def base_step(backbone: Backbone, connector: nn.Linear, max_new_tokens: int) -> Callable:
    """(b): the frozen backbone, one shared connector, no adapter anywhere."""

    def lm_call(embeds: torch.Tensor, cache: DynamicCache, rows: list[int]) -> torch.Tensor:
        return backbone.lm(
            inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1
        ).logits

    def step(adapters: list[int], pixels: torch.Tensor) -> list[list[int]]:
        features = backbone.encode_images(pixels)
        return greedy(backbone, lm_call, connector(features), max_new_tokens)

    return step


class PeftLoras:
    """A PEFT LoRA model holding every benchmark adapter, plus their connectors."""

    def __init__(self, backbone: Backbone, adapters: Sequence[AdapterSet], rank: int) -> None:
        self.backbone = backbone
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=list(LM_MODULES),
        )
        self.names = [f"a{i}" for i in range(len(adapters))]
        self.model = peft.get_peft_model(backbone.lm, config, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.model.add_adapter(name, config)
        self.model.eval()
        self.connectors: list[nn.Linear] = []
        for name, adapter in zip(self.names, adapters, strict=True):
            self._copy(name, adapter)
            self.connectors.append(_connector(adapter))

    def _copy(self, name: str, adapter: AdapterSet) -> None:
        tensors = adapter.tensors()
        inter = self.backbone.dims.intermediate_size
        ctx = TEXT if len(adapter.config.contexts) > 1 else 0
        for index, layer in enumerate(decoder_layers(self.backbone.lm)):
            for module in LM_MODULES:
                fused = module in ("gate_proj", "up_proj")
                target = FUSED_GATE_UP if fused else module
                prefix = f"lm.layers.{index}.{target}"
                a = tensors[f"{prefix}.lora_A"][ctx]  # [d_in, r]
                b = tensors[f"{prefix}.lora_B"][ctx]  # [r, d_out]
                if fused:
                    b = b[:, :inter] if module == "gate_proj" else b[:, inter:]
                lora: Any = lm_linear(layer, module)  # a PEFT LoRA layer now
                with torch.no_grad():
                    lora.lora_A[name].weight.copy_(a.t())
                    lora.lora_B[name].weight.copy_(b.t())

    def embeds(self, adapters: list[int], features: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter's connector, one call per distinct adapter."""
        out = torch.empty(
            (*features.shape[:2], self.backbone.dims.hidden_size), dtype=features.dtype
        )
        for adapter in set(adapters):
            rows = torch.tensor([i for i, a in enumerate(adapters) if a == adapter])
            out[rows] = self.connectors[adapter](features[rows])
        return out

    def naive_step(self, max_new_tokens: int) -> Callable:
        """(c): one request at a time, `set_adapter` before it."""

        def lm_call(embeds: torch.Tensor, cache: DynamicCache, rows: list[int]) -> torch.Tensor:
            return self.model(
                inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1
            ).logits

        def step(adapters: list[int], pixels: torch.Tensor) -> list[list[int]]:
            assert len(adapters) == 1
            self.model.set_adapter(self.names[adapters[0]])
            features = self.backbone.encode_images(pixels)
            return greedy(self.backbone, lm_call, self.embeds(adapters, features), max_new_tokens)

        return step

    def mixed_generate(
        self, adapters: list[int], features: torch.Tensor, max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy decoding of one batch mixing adapters, routed by PEFT's `adapter_names=`."""
        names = [self.names[a] for a in adapters]

        def lm_call(embeds: torch.Tensor, cache: DynamicCache, rows: list[int]) -> torch.Tensor:
            return self.model(
                inputs_embeds=embeds,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                adapter_names=[names[r] for r in rows],
            ).logits

        return greedy(self.backbone, lm_call, self.embeds(adapters, features), max_new_tokens)

    def mixed_step(self, max_new_tokens: int) -> Callable:
        """(d): one batch mixing adapters, routed by PEFT's `adapter_names=`."""

        def step(adapters: list[int], pixels: torch.Tensor) -> list[list[int]]:
            features = self.backbone.encode_images(pixels)
            return self.mixed_generate(adapters, features, max_new_tokens)

        return step


def _connector(adapter: AdapterSet) -> nn.Linear:
    tensors = adapter.tensors()
    weight = tensors["connector.weight"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(tensors["connector.bias"])
    return linear.eval()
