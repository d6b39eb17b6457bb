"""Loading a run config: the YAML file, the environment overrides, then the checks that need more than
the schema (hetrain.core.config): the circuit's counted depth (one numpy step of the network), which
picks the chain under ckks.auto, and whether fsspec can open exchange.url. Every entry point loads here.
"""

import os
from pathlib import Path

import yaml

from hetrain.core import store
from hetrain.core.config import CkksConfig, RunConfig, validate_config
from hetrain.core.errors import ConfigError, SecurityParameterError
from hetrain.core.shapes import uses_tiled
from hetrain.mpc_ops.exchange.remote import check_url
from hetrain.mpc_ops.layers.depth_plan import chain_for_depth, circuit_depth


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config mapping; raise ConfigError listing every problem. With ckks.auto the returned
    config carries the chain picked for the circuit's depth (a new object: the validated one is frozen)."""
    return check_loaded(validate_config(raw, source), source)


def check_loaded(cfg: RunConfig, source: str = "config") -> RunConfig:
    """The checks above the schema, on a config `validate_config` accepted; the checked config (new with ckks.auto)."""
    if cfg.exchange.url is not None:
        try:
            check_url(cfg.exchange.url)
        except ValueError as exc:
            raise ConfigError(f"{source}: key 'exchange': {exc}") from None
    try:
        return _fit_circuit(cfg)
    except ValueError as exc:  # the same line a schema cross-check gives
        raise ConfigError(f"{source}: key '(top level)': {exc}") from None


def _fit_circuit(cfg: RunConfig) -> RunConfig:
    """The circuit's counted depth fits the chain (or, with ckks.auto, picks it); ValueError if not."""
    if not cfg.ckks.auto and not uses_tiled(cfg):
        return cfg  # the depth-1 hybrid: hetrain.core.checks already fitted len(cipher_layers) levels
    depth = circuit_depth(cfg)
    try:
        if not cfg.ckks.auto:
            cfg.ckks.params().validate(needed_depth=depth)
            return cfg
        params = chain_for_depth(depth)
    except SecurityParameterError as exc:
        raise ValueError(str(exc)) from None
    ckks = CkksConfig(poly_modulus_degree=params.poly_modulus_degree, scale_bits=params.scale_bits,
                      coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), auto=True)
    return cfg.model_copy(update={"ckks": ckks})


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
    return resolve_paths(cfg, path.parent), path.resolve()


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """A config whose file paths (owner tables and pseudonym keys, key-holder files, a folder exchange URL) are
    absolute, read relative to `base` (a YAML file's folder; a mapping's base directory)."""
    owners = [o.model_copy(update={k: (base / v).resolve() for k in ("path", "pseudonym_key_file")
                                   if (v := getattr(o, k)) is not None}) for o in cfg.data.owners]
    data = cfg.data.model_copy(update={"owners": owners})
    files = {k: (base / v).resolve() for k, v in cfg.key_holder.model_dump().items()
             if k in KEY_HOLDER_FILES and v is not None}
    key_holder = cfg.key_holder.model_copy(update=files)
    exchange = cfg.exchange
    if exchange.url is not None and "://" not in exchange.url:  # a plain folder, relative to the base
        exchange = exchange.model_copy(update={"url": str((base / exchange.url).resolve())})
    return cfg.model_copy(update={"data": data, "key_holder": key_holder, "exchange": exchange})


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
