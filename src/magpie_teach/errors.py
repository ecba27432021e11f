"""Errors raised for bad user input. Messages name the file, row, column and value."""


class MagpieTeachError(Exception):
    """Base class of every expected user error. The CLI prints it as one line and exits 2."""


class ConfigError(MagpieTeachError):
    """A bad option, config key or value."""


class DataError(MagpieTeachError):
    """Bad input data: missing columns, empty responses, inconsistent teachers, duplicates."""


def network_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub call raises: huggingface_hub's HTTP errors, and its HTTP client's transport errors
    (httpx2 for huggingface_hub 2, httpx for 1)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
