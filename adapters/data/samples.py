"""Sample pictures a backbone's service can hand out: fresh synthetic scenes for the demo
backbone, the kind of picture its adapters learned (a newcomer rarely has coloured shapes at
hand), and none for any other backbone, where such pictures mean nothing.

    samples = samples_for(backbone.config)      # None unless it is the demo backbone
    sample = samples.draw()                     # sample.png (bytes), sample.captions {task: text}
    samples.image_size, samples.tasks, samples.trained_on

The engines offer this as their `samples` (service.api.engine_port); GET /samples/random
serves it. One scene is a Pillow drawing of at most three shapes and a PNG of a few hundred
bytes: well under a millisecond.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from adapters.config import BackboneConfig
from adapters.data.synthetic import COLORS, KINDS, MAX_SHAPES, TASKS, caption, render, sample_scene

# The backbone `ctxpeft demo` builds (the `demo` preset, adapters.demo.DemoPlan) and trains on.
DEMO_BACKBONE = "demo"
# Fresh scenes, not a sequence anyone can replay: seeded from the OS on every draw.
_RNG = random.SystemRandom()


@dataclass(frozen=True)
class Sample:
    png: bytes
    captions: dict[str, str]  # demo task -> the scene's true caption


@dataclass(frozen=True)
class SceneSamples:
    """Synthetic scenes of `image_size` pixels, with their true caption for every task."""

    image_size: int
    tasks: tuple[str, ...] = TASKS

    @property
    def trained_on(self) -> str:
        """What the demo adapters learned from, in one sentence."""
        size = self.image_size
        return (
            f"synthetic {size}x{size} pictures of 1 to {MAX_SHAPES} coloured shapes "
            f"({', '.join(KINDS)}; {', '.join(COLORS)}; small or large) on a white background"
        )

    def draw(self, rng: random.Random = _RNG) -> Sample:
        scene = sample_scene(rng)
        buffer = io.BytesIO()
        render(scene, self.image_size).save(buffer, format="PNG")
        return Sample(buffer.getvalue(), {task: caption(scene, task) for task in self.tasks})


def samples_for(config: BackboneConfig) -> SceneSamples | None:
    """The demo backbone's scenes at its image size; None for any other backbone."""
    return SceneSamples(config.image_size) if config.name == DEMO_BACKBONE else None
