"""Named exceptions: each protocol failure has its own type, and messages say what, where and what is allowed."""


class HetrainError(Exception):
    """Base class for every error hetrain raises on purpose."""


class ConfigError(HetrainError):
    """A configuration value is missing, unknown or out of range."""


class SchemaError(HetrainError):
    """A data owner's table does not match its declared schema."""


class AlignmentError(SchemaError):
    """Vertically partitioned tables do not share the same IDs."""


class SecurityParameterError(HetrainError):
    """CKKS parameters break the 128-bit security bound or the circuit depth."""


class BundleError(HetrainError):
    """A ciphertext bundle or manifest is malformed."""


class DigestMismatch(BundleError):
    """A blob's SHA-256 does not match its manifest."""


class ForeignKeyError(BundleError):
    """A ciphertext or context was made under another key than the key holder's."""


class FrameError(BundleError):
    """A reveal frame (the binary body exchanged with the key-holder service) is malformed."""


class IsolatedLoadError(BundleError):
    """Loading untrusted bytes crashed, ran out of memory or hung in the isolated loader process."""


class PolicyRefusal(HetrainError):
    """The key holder refused a reveal because a policy rule forbids it."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"policy rule '{rule}' refused the reveal: {message}")
        self.rule, self.detail = rule, message


class BudgetExhausted(PolicyRefusal):
    """The per-key decryption budget is spent; the key must be rotated."""

    def __init__(self, message: str):
        super().__init__("decryption_budget", message)


class CheckpointError(HetrainError):
    """A checkpoint is missing, torn or does not match this run."""


class KeyHolderUnreachable(HetrainError):
    """The key-holder service did not answer (connection error, timeout or 5xx) after every retry."""


class ExchangeUnavailable(HetrainError):
    """The exchange store at exchange.url cannot be reached, or refuses an operation (credentials, permissions)."""


class KeyHolderRejected(HetrainError):
    """The key-holder service refused a request outside the reveal protocol (bad token, body too large)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class OwnerDeploymentError(HetrainError):
    """A data owner's own Prefect deployment is missing, did not finish, or failed."""
