"""The run configuration: YAML validated once at the entry point by pydantic."""

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetrain.core import store
from hetrain.core.errors import ConfigError, SecurityParameterError
from hetrain.mpc_ops.crypto.params import CkksParams


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
    plaintext_twin: bool = True


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
            return self
        from hetrain.mpc_ops.exchange.remote import check_url  # that module imports the bundle reader, which imports this one

        check_url(self.url)
        return self


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
        _check_model(self)
        return self


def _check_model(cfg: RunConfig) -> None:
    names = []
    for i, layer in enumerate(cfg.model.layers):
        if layer.kind == "linear" and (layer.name is None or layer.out_features is None):
            raise ValueError(f"model.layers[{i}]: a linear layer needs 'name' and 'out_features'")
        if layer.kind != "linear" and layer.out_features is not None:
            raise ValueError(f"model.layers[{i}]: '{layer.kind}' takes no out_features")
        if layer.kind not in ("poly_tanh", "poly_sigmoid") and (layer.degree is not None or layer.range is not None):
            raise ValueError(f"model.layers[{i}]: '{layer.kind}' takes no degree or range (only poly_tanh, poly_sigmoid)")
        if layer.name:
            names.append(layer.name)
    if len(set(names)) != len(names):
        raise ValueError(f"model.layers: layer names must be unique, got {names}")
    first = cfg.model.layers[0]
    if first.kind != "linear":
        raise ValueError("model.layers[0] must be linear: the encrypted input enters through it")
    _check_policy_split(cfg)
    _check_rank(cfg)
    last = [layer for layer in cfg.model.layers if layer.kind == "linear"][-1]
    want = 1 if cfg.model.loss == "binary_cross_entropy" else cfg.data.num_classes
    if last.out_features != want:
        raise ValueError(
            f"model.layers: the last linear layer '{last.name}' must have out_features={want} "
            f"for loss {cfg.model.loss} with num_classes={cfg.data.num_classes}; got {last.out_features}"
        )
    if (cfg.data.task == "binary") != (cfg.model.loss == "binary_cross_entropy"):
        raise ValueError(f"model.loss {cfg.model.loss} does not fit data.task {cfg.data.task}")
    if cfg.train.batch_size & (cfg.train.batch_size - 1):
        raise ValueError(f"train.batch_size must be a power of two in [8, 4096]; got {cfg.train.batch_size}")
    if cfg.policy.min_batch > cfg.train.batch_size:
        raise ValueError(
            f"policy.min_batch={cfg.policy.min_batch} exceeds train.batch_size={cfg.train.batch_size}; "
            f"every gradient reveal would be refused"
        )
    owners = cfg.data.owners
    labelled = [o.name for o in owners if o.label]
    if cfg.data.partition == "vertical" and len(labelled) != 1:
        raise ValueError(f"data.owners: exactly one owner must hold the labels (label: true); got {labelled}")
    if cfg.data.partition == "horizontal":
        if len(labelled) != len(owners):
            raise ValueError("data.owners: in a horizontal split every owner holds labels (label: true)")
        if len({tuple(o.features) for o in owners}) != 1:
            raise ValueError("data.owners: in a horizontal split every owner must declare the same features")
    if len({o.name for o in owners}) != len(owners):
        raise ValueError("data.owners: owner names must be unique")
    deployed = [o.name for o in owners if o.deployment is not None]
    if deployed and cfg.report.plaintext_twin:
        raise ValueError(
            f"report.plaintext_twin must be false when owners run as deployments ({deployed}): the twin needs "
            f"each owner's standardised plaintext on the trainer's side, which a deployed owner never sends"
        )
    _check_depth(cfg)


def _check_policy_split(cfg: RunConfig) -> None:
    """policy.cipher_layers is a prefix of the linear layers; reveals name its top (or nothing: strict);
    the circuit fits the CKKS chain."""
    layers = cfg.model.layers
    linears = [layer.name for layer in layers if layer.kind == "linear"]
    cipher = list(cfg.policy.cipher_layers)
    if cipher != linears[: len(cipher)]:
        raise ValueError(
            f"policy.cipher_layers must be the first linear layers in model order (one of "
            f"{[linears[:k] for k in range(1, len(linears) + 1)]}); got {cipher}")
    top = next(i for i, layer in enumerate(layers) if layer.name == cipher[-1])
    for i, layer in enumerate(layers[:top]):
        if layer.kind not in ("linear", "square", "poly_tanh", "poly_sigmoid"):
            raise ValueError(
                f"model.layers[{i}]: '{layer.kind}' sits below the ciphertext layer '{cipher[-1]}'; only "
                f"polynomial activations (square, poly_tanh, poly_sigmoid) run on ciphertext")
    if not cfg.policy.reveals:
        missing = [name for name in linears if name not in cipher]
        if missing:
            raise ValueError(
                f"policy.reveals is empty (strict mode: no activation is revealed), so every linear layer "
                f"must be in policy.cipher_layers; missing {missing}")
    elif set(cfg.policy.reveals) != {cipher[-1]}:
        raise ValueError(
            f"policy.reveals must name ciphertext layers whose outputs may be revealed (allowed: "
            f"[{cipher[-1]!r}], the last of policy.cipher_layers; or {{}} for strict mode); "
            f"got {sorted(cfg.policy.reveals)}")


def _check_depth(cfg: RunConfig) -> None:
    """The circuit's counted depth fits the chain (or, with ckks.auto, picks it)."""
    from hetrain.mpc_ops.layers.depth_plan import chain_for_depth, circuit_depth, uses_tiled

    if uses_tiled(cfg) and cfg.policy.dp is not None:
        raise ValueError(
            "policy.dp is not supported with strict, mixed or encrypted-label policies yet (their revealed "
            "gradients carry a gain that would divide the DP noise); remove policy.dp or use the hybrid policy")
    if cfg.ckks.auto:
        depth = circuit_depth(cfg)
        try:
            params = chain_for_depth(depth)
        except SecurityParameterError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(cfg, "ckks", CkksConfig(poly_modulus_degree=params.poly_modulus_degree,
                                                   coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                                                   scale_bits=params.scale_bits, auto=True))
        return
    depth = circuit_depth(cfg) if uses_tiled(cfg) else len(cfg.policy.cipher_layers)
    try:
        cfg.ckks.params().validate(needed_depth=depth)
    except SecurityParameterError as exc:
        raise ValueError(str(exc)) from None


def _check_rank(cfg: RunConfig) -> None:
    from hetrain.mpc_ops.reveal.policy import reveal_shapes  # policy imports this module

    for name, shape in reveal_shapes(cfg).items():
        point = cfg.policy.reveals.get(name)
        if point is None or point.allow_invertible or point.max_rank is None:
            continue
        if not shape.out_features <= point.max_rank < shape.in_features:
            raise ValueError(
                f"policy.reveals.{name}.max_rank must be in [{shape.out_features}, {shape.in_features - 1}] "
                f"(at least out_features, so one reveal fits; below in_features, so the trainer never "
                f"holds full rank); got {point.max_rank}"
            )


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


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config mapping; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: a config never needs them, and an alias bomb
    (a few lines that expand to billions of nodes) would hang validation and error formatting."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a config")
        if getattr(self.peek_event(), "anchor", None) is not None:
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML anchors (&name) are not allowed in a config")
        return super().compose_node(parent, index)


def load_config(path: str | Path) -> tuple[RunConfig, Path]:
    """Read and validate a YAML config; owner paths are resolved relative to the config's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    source = store.read_bounded(path, MAX_CONFIG_BYTES, "config file", ConfigError)
    try:
        raw = yaml.load(source.decode("utf-8"), Loader=_NoAliasLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:  # the composer recurses once per nesting level
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc)[:300]})") from None
    try:
        cfg = parse_config(_environment_overrides(raw), str(path))
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to validate") from None
    owners = [o if o.path is None else o.model_copy(update={"path": (path.parent / o.path).resolve()})
              for o in cfg.data.owners]
    data = cfg.data.model_copy(update={"owners": owners})
    files = {k: (path.parent / v).resolve() for k, v in cfg.key_holder.model_dump().items()
             if k in KEY_HOLDER_FILES and v is not None}
    key_holder = cfg.key_holder.model_copy(update=files)
    exchange = cfg.exchange
    if exchange.url is not None and "://" not in exchange.url:  # a plain folder, relative to the config's
        exchange = exchange.model_copy(update={"url": str((path.parent / exchange.url).resolve())})
    return cfg.model_copy(update={"data": data, "key_holder": key_holder, "exchange": exchange}), path.resolve()


KEY_HOLDER_FILES = ("token_file", "tls_ca", "tls_cert", "tls_key")
# Deployment overrides: the same config file can train in-process or against a service.
KEY_HOLDER_ENV = {"HETRAIN_KEY_HOLDER_URL": "url", "HETRAIN_KEY_HOLDER_TOKEN_FILE": "token_file"}


def _environment_overrides(raw):
    """key_holder.url and key_holder.token_file from the environment, when set (files relative to the cwd)."""
    updates = {key: os.environ[env] for env, key in KEY_HOLDER_ENV.items() if os.environ.get(env)}
    if not updates or not isinstance(raw, dict):
        return raw
    if "token_file" in updates:
        updates["token_file"] = str(Path(updates["token_file"]).resolve())
    section = raw.get("key_holder")
    return {**raw, "key_holder": {**(section if isinstance(section, dict) else {}), **updates}}
