"""Errors a user can cause. The CLI prints their message as one line, no traceback."""


def did_you_mean(word: str, choices, n: int = 1, cutoff: float = 0.6) -> str:
    """``"did you mean X?"`` (or ``"X, Y?"``) for the choices closest to ``word``, ignoring case; else ``""``.

    >>> did_you_mean("mobilenet2", ["resnet18", "mobilenet_v2"])
    'did you mean mobilenet_v2?'
    """
    import difflib
    choices = [str(c) for c in choices]
    by_lower = {}
    for c in choices:
        by_lower.setdefault(c.lower(), c)
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=cutoff)
    return f"did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""


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
