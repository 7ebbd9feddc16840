"""Settings shared by the locate-then-edit methods (MEMIT, AlphaEdit)."""

from __future__ import annotations

from dataclasses import dataclass

from lledit import checks


@dataclass
class LocateConfig:
    """Settings shared by MEMIT and AlphaEdit.

    The defaults follow MEMIT and AlphaEdit scaled to SmolLM2-135M (30 layers,
    576 hidden, 1536 MLP); docs/methods/memit.md has the measurements.
    """

    layers: str | None = None
    """Edited decoder layers, e.g. "4-8" (see `lledit.layers.parse_layers`); the
    last is the critical layer. None: the `lower` band (4-8 of 30 layers)."""
    part: str = "mlp_out"
    """The projection edited in each layer (see `lledit.layers.PARTS`); it must
    write into the residual stream."""
    value_steps: int = 10
    """Most gradient steps of the target-value optimisation."""
    value_lr: float = 1.0
    """Adam learning rate of the target-value optimisation."""
    clamp: float = 0.75
    """Largest norm of the hidden-state change, as a fraction of the hidden state's norm."""
    kl_weight: float = 0.0625
    """Weight of the KL term that keeps the subject's other predictions ("{subject} is a")."""
    early_stop: float = 0.9
    """Stop the value optimisation once the mean probability of the targets reaches this."""
    prefix_count: int = 2
    """Random prefixes (sampled from the model) that keys and values are averaged over."""
    prefix_length: int = 6
    """Tokens sampled for each prefix after its first word."""
    stats_corpus: str | None = None
    """Text file for the key statistics (one document per line, or blank-line
    separated); None: text sampled from the model itself."""
    stats_samples: int = 20000
    """Number of keys (token positions) the statistics average over."""
    seed: int = 0
    """Seed of the sampled prefixes and statistics text."""

    def __post_init__(self) -> None:
        checks.at_least(self, 0, "value_steps", "prefix_count")
        checks.at_least(self, 1, "prefix_length", "stats_samples")
        checks.positive(self, "value_lr", "clamp")
        checks.non_negative(self, "kl_weight")
        checks.fraction(self, "early_stop")
