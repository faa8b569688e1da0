"""Vision-encoder outputs cached by image content, shared by every adapter.

The features of an image do not depend on the adapter (the connector comes after them), so
one image captioned by K adapters, or sent again, runs the encoder once. Keys are content
hashes of the preprocessed pixels, scoped by the caller: the engine prefixes them with the
tenant (unless `encoder_cache_shared`), so one tenant's upload never hits another tenant's
entry and no timing can tell a tenant whether someone else sent an image. Used by the
engine's worker thread only (not thread-safe by itself).

    cache = EncoderCache(entries=512, counters=counters)
    features = cache.encode(keys, pixels, backbone.encode_images)   # [N, n_img, d_vis]
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from service.engine.counters import EngineCounters


def content_key(pixels: torch.Tensor) -> str:
    """Hash of preprocessed pixels [3, S, S] (their exact bytes)."""
    data = pixels.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class EncoderCache:
    """LRU of features per content key, bounded in entries (0 disables caching)."""

    def __init__(self, entries: int, counters: EngineCounters) -> None:
        self.entries = entries
        self._counters = counters
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

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
                # Its own copy: a view into the batch's tensor would keep the whole batch
                # alive for as long as the entry lives, and the entry bound would not bound
                # memory.
                own = feature.clone()
                found[key] = own
                self._remember(key, own)
        self._counters.encoder(hits=hits, misses=len(todo))
        return [found[key] for key in keys]

    def count_hits(self, n: int) -> None:
        """Images whose features the caller already held (a request's earlier batch)."""
        self._counters.encoder(hits=n)

    def _remember(self, key: str, feature: torch.Tensor) -> None:
        if self.entries <= 0:
            return
        self._cache[key] = feature
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)
