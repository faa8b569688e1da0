"""Vision-encoder outputs cached by image content, shared by every adapter.

The features of an image do not depend on the adapter (the connector comes after them), so
one image captioned by K adapters, or sent again, runs the encoder once. Keys are content
hashes of the preprocessed pixels: two uploads that decode and resize to the same pixels
share an entry. Used by the engine's worker thread only (not thread-safe by itself).

    cache = EncoderCache(entries=512)
    features = cache.encode(keys, pixels, backbone.encode_images)   # [N, n_img, d_vis]
    cache.hits, cache.misses, cache.runs
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from service.metrics import ServiceMetrics


def content_key(pixels: torch.Tensor) -> str:
    """Hash of preprocessed pixels [3, S, S] (their exact bytes)."""
    data = pixels.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class EncoderCache:
    """LRU of features per content key, bounded in entries (0 disables caching)."""

    def __init__(self, entries: int, metrics: ServiceMetrics | None = None) -> None:
        self.entries = entries
        self._metrics = metrics
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.runs = 0  # images passed through the encoder

    def encode(
        self,
        keys: Sequence[str],
        pixels: Sequence[torch.Tensor],
        encoder: Callable[[torch.Tensor], torch.Tensor],
    ) -> list[torch.Tensor]:
        """Features per image (each [n_img, d_vis]); images not cached are encoded in one
        batch, duplicates within the call once."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, torch.Tensor] = {}
        hits = 0
        for key, image in zip(keys, pixels, strict=True):
            if key in found or key in todo:
                hits += 1  # a duplicate within the call rides on the same encoder pass
                continue
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                found[key] = cached
                hits += 1
            else:
                todo[key] = image
        if todo:
            features = encoder(torch.stack(list(todo.values())))
            for key, feature in zip(todo, features, strict=True):
                found[key] = feature
                self._remember(key, feature)
        self.hits += hits
        self.misses += len(todo)
        self.runs += len(todo)
        if self._metrics is not None:
            self._metrics.encoder_cache_hits.inc(hits)
            self._metrics.encoder_cache_misses.inc(len(todo))
            self._metrics.encoder_runs.inc(len(todo))
        return [found[key] for key in keys]

    def count_hits(self, n: int) -> None:
        """Images whose features the caller already held (a request's earlier batch)."""
        self.hits += n
        if self._metrics is not None:
            self._metrics.encoder_cache_hits.inc(n)

    def _remember(self, key: str, feature: torch.Tensor) -> None:
        if self.entries <= 0:
            return
        self._cache[key] = feature
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)
