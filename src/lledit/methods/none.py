"""The unedited reference: applies nothing, so every metric shows the starting point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from lledit.data.request import EditRequest
from lledit.edit import NoChange
from lledit.model import ModelHandle


@dataclass
class NoEditConfig:
    """`none` has no settings."""


class NoEdit:
    name: ClassVar[str] = "none"
    description: ClassVar[str] = "the unedited model (reference)"
    config_class: ClassVar[type] = NoEditConfig

    def __init__(self, handle: ModelHandle, config: NoEditConfig | None = None) -> None:
        self.handle = handle
        self.config = config or NoEditConfig()

    def prepare(self) -> None:
        return None

    def apply(self, batch: Sequence[EditRequest]) -> NoChange:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        return NoChange()

    def memory_share(self) -> int:
        return 0

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "modules": []}
