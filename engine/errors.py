"""Errors the engine raises on purpose. Each message is one clear sentence for the user: what is wrong, what is allowed."""


class EngineError(Exception):
    """Base class; its message is one clear sentence for the user."""


class ModelLoadError(EngineError):
    """A model, tokenizer or drafter could not be found or loaded."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (empty prompt, out-of-range value, prompt beyond the context...)."""


class EngineBusyError(EngineError):
    """The request queue is full; the caller may retry later."""


class EngineClosedError(EngineError):
    """The engine was closed and takes no more requests."""
