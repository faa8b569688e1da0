"""The servability probe: one small forward of an adapter set on a fixed image, so that a
version is known to serve before anyone's request depends on it.

    probe = ServabilityProbe(model, connector, max_rank)
    probe(adapter_set, "acme/news@v3")     # raises AdapterUnservable (422) with the cause

The set is placed in a scratch bank slot of the probe's own one-slot bank (the serving bank
is the worker thread's alone), prefilled on the probe image and decoded for `tokens` tokens.
Any exception (a set the bank cannot hold, a shape the layers refuse, a division by zero in
its config) or a non-finite logit is the refusal's cause. The registry runs it on every
upload before the version becomes visible, and before a version that appeared in the store
from elsewhere (`ctxpeft train`, a copied folder) is first served. It runs on the caller's
thread (the upload's, or the loader's), one probe at a time; a forward beside the worker's
is safe because routing is per call (a ContextVar) and the frozen weights are only read.

Cost: one prefill and `tokens` decode steps of one row (measured in docs/BENCHMARKS.md).
A set that passes can still overflow on other inputs; the step loop's numeric containment
handles that case.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

from adapters.adapter_set import AdapterSet
from adapters.bank import AdapterBank
from adapters.config import ConnectorSpec
from adapters.decoding import NON_FINITE, DecodeState
from adapters.model import ContextPEFTModel
from service.exceptions import AdapterUnservable

PROBE_TOKENS = 2  # decode steps after the prefill: the KV path is exercised too
_PROBE_SEED = 20  # the probe image: seeded noise, the same in every process
_CAUSE_CHARS = 300


def probe_image(size: int) -> Image.Image:
    """The fixed probe image: seeded RGB noise of `size` x `size`."""
    rng = np.random.default_rng(_PROBE_SEED)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


class ServabilityProbe:
    def __init__(
        self,
        model: ContextPEFTModel,
        connector: ConnectorSpec,
        max_rank: int,
        tokens: int = PROBE_TOKENS,
    ) -> None:
        self.model = model
        self.connector = connector
        self.max_rank = max_rank
        self.tokens = tokens
        self._lock = threading.Lock()
        self._bank: AdapterBank | None = None  # allocated at the first probe
        # The probe image's features, computed once here: later probes run on the loader or
        # an upload's thread and must not need the encoder (nor wait on it).
        with torch.no_grad():
            backbone = model.backbone
            pixels = backbone.preprocess([probe_image(backbone.config.image_size)])
            self._features = backbone.encode_images(pixels)

    def __call__(self, adapter: AdapterSet, label: str) -> None:
        """Raise AdapterUnservable naming the cause unless `adapter` serves the probe image
        with finite logits."""
        with self._lock, torch.no_grad():
            try:
                self._run(adapter, self._features)
            except (MemoryError, torch.OutOfMemoryError):
                raise  # out of memory now says nothing of the set: the loader retries
            except _NonFinite as exc:
                raise AdapterUnservable(
                    f"adapter {label} failed the servability probe: {exc} gave non-finite "
                    "logits (NaN or infinity) on the fixed probe image"
                ) from None
            except Exception as exc:
                cause = f"{type(exc).__name__}: {exc}"[:_CAUSE_CHARS]
                raise AdapterUnservable(
                    f"adapter {label} failed the servability probe: a forward on the fixed "
                    f"probe image raised {cause}"
                ) from None
            finally:
                if self._bank is not None:
                    self._bank.clear(0)  # holds nothing of the set between probes

    def _run(self, adapter: AdapterSet, features: torch.Tensor) -> None:
        backbone = self.model.backbone
        if self._bank is None:
            self._bank = AdapterBank(
                backbone.dims,
                self.connector,
                1,
                self.max_rank,
                device=backbone.device,
                dtype=backbone.dtype,
            )
        self._bank.load(0, adapter)
        state, ids = DecodeState.prefill(self.model, self._bank, features, [0])
        for step in range(self.tokens + 1):
            if int(ids[0]) == NON_FINITE:
                raise _NonFinite("the prefill" if step == 0 else f"decode step {step}")
            if step < self.tokens:
                ids = state.step()


class _NonFinite(Exception):
    """The probe's logits were not finite at the stage named by the message."""
