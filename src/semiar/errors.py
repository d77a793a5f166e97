"""Typed errors. Every error a user can cause is a `SemiarError` with a message they can act on;
the CLI prints it on one line and exits with code 2."""


class SemiarError(Exception):
    """Base class for errors caused by input the user can fix."""


class UnknownModelError(SemiarError):
    """A model name that is neither a known model, a local path, nor a reachable hub id."""


class ModelFileError(SemiarError):
    """A weight file that is missing, truncated, corrupt or fails its checksum."""


class ModelNotInstalledError(SemiarError):
    """A known model that has not been pulled yet."""


class TokenizerMismatchError(SemiarError):
    """Target and drafter do not share a tokenizer/vocabulary."""


class DrafterMismatchError(SemiarError):
    """A trained drafter was made for a different target model."""


class ContextLengthError(SemiarError):
    """Prompt (plus what must be generated) does not fit the model's context."""


class InvalidArgumentError(SemiarError):
    """A parameter outside its valid range (sampling settings, token budgets, tree specs...)."""
