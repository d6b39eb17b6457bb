"""The run configuration's schema, validated once at the entry point by pydantic (cross-field rules: core/checks.py).

Nothing here reads a file or imports above hetrain.core: loading the YAML, the environment
overrides and the checks that need the circuit or the exchange store's protocols are in
hetrain.configure, which calls `validate_config` and then those checks.
"""

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetrain.core.checks import check_model
from hetrain.core.errors import ConfigError
from hetrain.core.params import CkksParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OwnerConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    # Exactly one of: the raw table, read in this process, or the owner's own Prefect deployment
    # ("flow/deployment"), which reads the table on the owner's worker and holds its path itself.
    path: Path | None = None
    deployment: str | None = Field(None, pattern=r"^[^/\s]+/[^/\s]+$")
    features: list[str] = Field(min_length=1)
    label: bool = False
    # the owners' shared secret for sample pseudonyms (participants/pseudonyms.py); unset: pseudonym.key
    # beside the first owner's table, created on first use
    pseudonym_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "OwnerConfig":
        if (self.path is None) == (self.deployment is None):
            got = "both" if self.path is not None else "neither"
            raise ValueError(
                f"owner '{self.name}': set exactly one of 'path' (the raw table, read in-process) or "
                f"'deployment' (the owner's Prefect deployment, 'flow-name/deployment-name'); got {got}"
            )
        return self


class DataConfig(_Strict):
    partition: Literal["horizontal", "vertical"]
    id_column: str = "id"
    label_column: str = "label"
    task: Literal["binary", "multiclass"]
    num_classes: int = Field(2, ge=2, le=1000)
    test_fraction: float = Field(0.2, gt=0.0, le=0.9)
    owners: list[OwnerConfig] = Field(min_length=1)


class LayerConfig(_Strict):
    kind: Literal["linear", "relu", "tanh", "sigmoid", "square", "poly_tanh", "poly_sigmoid"]
    name: str | None = None
    out_features: int | None = Field(None, ge=1, le=4096)
    # polynomial activations (poly_tanh, poly_sigmoid): least-squares fit of this degree on [-range, range]
    degree: int | None = Field(None, ge=1, le=3)
    range: float | None = Field(None, gt=0.0, le=64.0)


class ModelConfig(_Strict):
    layers: list[LayerConfig] = Field(min_length=1)
    loss: Literal["binary_cross_entropy", "softmax_cross_entropy"]


class OptimizerConfig(_Strict):
    kind: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.01, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(_Strict):
    rounds: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(128, ge=8, le=4096)
    optimizer: OptimizerConfig = OptimizerConfig()
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0)
    patience: int | None = Field(None, ge=1)
    workers: int = Field(2, ge=1, le=64)  # processes for ciphertext work (capped at the CPU count)
    # Where ciphertext jobs run: a local process pool, or Dask through prefect-dask's DaskTaskRunner
    compute: Literal["processes", "dask"] = "processes"
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls|inproc)://\S+$")  # None: a LocalCluster of `workers`
    # A retrain (a new generation of a run directory) starts from the newest checkpoint's weights and
    # optimizer state when true, from a fresh initialisation when false.
    warm_start: bool = False


class RevealPoint(_Strict):
    allow_invertible: bool = False
    # Most dimensions of each sample's features the trainer may learn through this layer's
    # activations over the whole run (distinct weights × out_features); None: in_features - 1.
    max_rank: int | None = Field(None, ge=1)


class DpConfig(_Strict):
    """Gaussian noise on revealed weight gradients (per-sample delta clipped by the trainer)."""

    noise_multiplier: float = Field(gt=0.0, le=1000.0)
    clip: float = Field(1.0, gt=0.0, le=1e6)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)


class FloodingConfig(_Strict):
    security_bits: int = Field(30, ge=0, le=128)
    budget: int = Field(65536, ge=1, le=2**40)


class PolicyConfig(_Strict):
    cipher_layers: list[str] = Field(min_length=1)
    reveals: dict[str, RevealPoint]
    min_batch: int = Field(32, ge=1)
    labels: Literal["reveal", "encrypted"] = "reveal"
    mask_bound: float = Field(64.0, gt=0.0)
    flooding: FloodingConfig = FloodingConfig()
    dp: DpConfig | None = None
    # semi_honest: the key holder checks what the trainer declares; untrusted: it decrypts only reveals it can
    # verify (mpc_ops/reveal/verified.py), the ciphertext layer's weights are its own and never train
    trainer: Literal["semi_honest", "untrusted"] = "semi_honest"


class CkksConfig(_Strict):
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: list[int] = [60, 50, 60]
    scale_bits: int = 50
    # true: the planner picks [60, 50 × depth, 60] at the smallest N that fits the circuit's depth
    auto: bool = False

    def params(self) -> CkksParams:
        return CkksParams(self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.scale_bits)


class PackingConfig(_Strict):
    forward: Literal["auto", "rows", "column"] = "auto"


class ReportConfig(_Strict):
    plaintext_twin: bool = False  # true: the trainer's process reads the owners' plaintext (diagnostic only)


class KeyHolderConfig(_Strict):
    """Where the trainer finds the key holder: in-process (url unset) or a `hetrain key-holder serve` service."""

    url: str | None = None
    token_file: Path | None = None
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    retries: int = Field(3, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0.0, le=60.0)  # waits backoff_s, 2·backoff_s, 4·backoff_s, … between tries
    tls_ca: Path | None = None  # CA bundle that signed the service's certificate (https only)
    tls_cert: Path | None = None  # client certificate, for a service started with --tls-client-ca
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _check_url(self) -> "KeyHolderConfig":
        tls = [k for k in ("tls_ca", "tls_cert", "tls_key") if getattr(self, k) is not None]
        if self.url is None:
            stray = ["token_file"] * (self.token_file is not None) + tls
            if stray:
                raise ValueError(f"key_holder.url is required when key_holder sets {stray} "
                                 f"(without a url the key holder runs in-process)")
            return self
        check_service_url(self.url, "key_holder.url")
        if self.token_file is None:
            raise ValueError("key_holder.token_file is required when key_holder.url is set "
                             "(the file `hetrain key-holder token FILE` or `hetrain key-holder serve` wrote)")
        if tls and not self.url.startswith("https://"):
            raise ValueError(f"key_holder {tls} need an https:// url; got {self.url!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("key_holder.tls_cert and key_holder.tls_key go together (the client certificate and its key)")
        return self


class ExchangeConfig(_Strict):
    """Where owners publish and the trainer reads bundles: unset, RUN_DIR/exchange; else a shared folder
    or an fsspec URL (s3://bucket/prefix, gs://…, file://…), mirrored into RUN_DIR/exchange by the trainer."""

    url: str | None = Field(None, min_length=1, max_length=2048)
    # passed to the fsspec filesystem (e.g. {"anon": false, "endpoint_url": "…"}); keep secrets in the
    # environment or the provider's own credential files, not here
    storage_options: dict[str, str | int | float | bool] = {}

    @model_validator(mode="after")
    def _check_url(self) -> "ExchangeConfig":
        if self.url is None:
            if self.storage_options:
                raise ValueError("exchange.storage_options needs exchange.url (without a url the exchange store "
                                 "is the local folder RUN_DIR/exchange)")
        return self  # whether fsspec can open the url is checked by hetrain.configure (it imports fsspec)


def check_service_url(url: str, key: str) -> None:
    """Raise ValueError unless `url` is http(s)://HOST:PORT (an optional trailing slash, nothing else)."""
    allowed = f"{key} must be http://HOST:PORT or https://HOST:PORT (e.g. http://127.0.0.1:8765); got {url!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(allowed) from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or port is None or not 1 <= port <= 65535
            or parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc):
        raise ValueError(allowed)


class RunConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = 0
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    policy: PolicyConfig
    ckks: CkksConfig = CkksConfig()
    packing: PackingConfig = PackingConfig()
    report: ReportConfig = ReportConfig()
    key_holder: KeyHolderConfig = KeyHolderConfig()
    exchange: ExchangeConfig = ExchangeConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        check_model(self)
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Keys allowed at the parent of `loc` inside `model`, for unknown-key messages."""
    current: type[BaseModel] | None = model
    skip_key = False
    for part in loc[:-1]:
        if current is None or isinstance(part, int):
            continue
        if skip_key:  # the user's own key inside a dict-valued field (e.g. policy.reveals.<layer>)
            skip_key = False
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        origin_args = getattr(ann, "__args__", ())
        skip_key = getattr(ann, "__origin__", None) is dict
        candidates = [ann, *origin_args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return sorted(current.model_fields) if current else []


def format_errors(exc: ValidationError, source: str) -> str:
    """One line per problem: the key, what is allowed, and the value received."""
    lines = []
    for err in exc.errors():
        loc = ".".join(f"{p!s:.60}" for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(RunConfig, err["loc"])
            lines.append(f"{source}: unknown key '{loc}' (allowed here: {', '.join(allowed)})")
        elif err["type"] == "missing":
            lines.append(f"{source}: key '{loc}' is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            received = err.get("input")
            # Cross-checks get the whole mapping as input; their message already names the value.
            got = "" if not err["loc"] or isinstance(received, dict) else f"; got {received!r:.200}"
            lines.append(f"{source}: key '{loc}': {msg}{got}")
    return "\n".join(lines)


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config mapping against the schema and the pure cross-checks; raise ConfigError listing
    every problem. Not the whole check: hetrain.configure.parse_config also counts the circuit's depth."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None
