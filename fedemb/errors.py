"""The one exception type users see: a message that names the problem, no traceback."""


class FedembError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""


class ConfigError(FedembError):
    """A config value is missing, of the wrong type, or out of range."""


class DataError(FedembError):
    """A data file is missing, unreadable, or inconsistent."""


class ConcurrentReleaseError(FedembError):
    """Another process recorded a release under the same name in the same privacy ledger meanwhile;
    nothing was released."""
