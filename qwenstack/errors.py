"""Errors a user can act on. Each names the thing at fault (a file, a tensor, a field, a limit)."""


class QwenstackError(Exception):
    """Base class: an error with a message meant for the person running qwenstack."""


class ConfigError(QwenstackError):
    """config.json is missing, unreadable, or lacks a field the architecture needs."""


class CheckpointError(QwenstackError):
    """The weights on disk do not match the architecture: a missing, unexpected or mis-shaped tensor."""


class ModelNotFoundError(QwenstackError):
    """A model id or path that cannot be resolved to a local checkpoint."""


class UnsupportedModelError(QwenstackError):
    """A checkpoint whose architecture or options qwenstack does not implement."""


class RequestError(QwenstackError, ValueError):
    """A request that cannot be served as asked (too long, bad sampling values); the engine keeps running."""


class EngineUnavailableError(QwenstackError):
    """The engine cannot run requests any more (a tensor-parallel worker process died): answered as 503."""
