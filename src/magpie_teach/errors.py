"""Errors raised for bad user input. Messages name the file, row, column and value."""


class MagpieTeachError(Exception):
    """Base class of every expected user error. The CLI prints it as one line and exits 2."""


class ConfigError(MagpieTeachError):
    """A bad option, config key or value."""


class DataError(MagpieTeachError):
    """Bad input data: missing columns, empty responses, inconsistent teachers, duplicates."""
