"""Errors a user can cause. The CLI prints their message as one line, no traceback."""


class FeatxError(Exception):
    """Base class: something the user can fix. The message says what and how."""


class DatasetError(FeatxError):
    """The dataset folder, manifest or split is unusable."""


class ImageError(FeatxError):
    """One image could not be read (raised per image; skipped unless strict)."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # crosses process boundaries (DataLoader, Dask) intact
        return (ImageError, (self.path, self.reason))


class BackboneError(FeatxError):
    """Unknown backbone, layer or weights that do not fit."""


class WeightsError(BackboneError):
    """Weights file missing, corrupt, of the wrong hash or the wrong architecture."""


class CacheError(FeatxError):
    """A cache entry is missing, unreadable or does not match what was asked."""


class ConfigError(FeatxError):
    """A pipeline file or option value is invalid."""
