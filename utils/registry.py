"""Components by kind: the framework builds what a recipe names by looking its kind up here.

The framework registers its own kinds (Wan VAEs, umT5 and tiny text encoders, the Wan DiT); other packages add
theirs from their own code, announced under the `self_forcing_wan.components` entry point group (pyproject.toml)
and imported the first time a kind is not found: the miniature world registers its VAE and judges, so nothing in
the framework imports it. Benchmarks put stand-ins in place for a run with `Registry.replaced`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Generic, Iterator, TypeVar

from utils.errors import UserError

PLUGIN_GROUP = "self_forcing_wan.components"
Builder = TypeVar("Builder", bound=Callable)
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module announced under PLUGIN_GROUP once (each registers its kinds when imported)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()


class Registry(Generic[Builder]):
    """kind -> builder, for one sort of component; `setting` names where a recipe states the kind."""

    def __init__(self, what: str, setting: str) -> None:
        self.what, self.setting = what, setting
        self._builders: dict[str, Builder] = {}

    def register(self, *kinds: str) -> Callable[[Builder], Builder]:
        """Decorator: the builder for `kinds` (one builder may serve several). A kind is registered once."""
        def add(builder: Builder) -> Builder:
            for kind in kinds:
                if kind in self._builders and self._builders[kind] is not builder:
                    raise ValueError(f"{self.what} kind '{kind}' is registered twice")
                self._builders[kind] = builder
            return builder
        return add

    def kinds(self) -> list[str]:
        load_plugins()
        return sorted(self._builders)

    def __contains__(self, kind: str) -> bool:
        if kind not in self._builders:
            load_plugins()
        return kind in self._builders

    def get(self, kind: str) -> Builder:
        if kind not in self:
            raise UserError(
                f"{self.setting} '{kind}' names no registered {self.what}: expected one of {', '.join(self.kinds())} "
                f"(packages add kinds under the '{PLUGIN_GROUP}' entry points once installed: pip install -e .)"
            )
        return self._builders[kind]

    @contextlib.contextmanager
    def replaced(self, kind: str, builder: Builder) -> Iterator[Builder]:
        """Stand `builder` in for `kind` inside the block (benchmarks' random weights); yields the original."""
        original = self.get(kind)
        self._builders[kind] = builder
        try:
            yield original
        finally:
            self._builders[kind] = original


# The framework's registries. Builders' signatures are documented where each is looked up (pipeline.components,
# trainer.evaluation).
DITS: Registry = Registry("DiT builder", "the DiT family")
VAES: Registry = Registry("VAE", "vae preset kind")
TEXT_ENCODERS: Registry = Registry("text encoder", "text encoder preset kind")
JUDGES: Registry = Registry("judge", "evaluation.judge")
