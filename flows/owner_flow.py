"""A data owner's preparation as its own Prefect deployment, run by the owner's own worker.

The owner's deployment (prefect.yaml, work pool `owner-<name>`) holds the raw table's path as its
own parameter; the trainer triggers it with the exchange location and the public context's location
only, so the owner's worker is the only process that ever reads the raw table.
"""

import hashlib
import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.configure import parse_config
from hetrain.core.config import OwnerConfig, RunConfig
from hetrain.core.errors import ConfigError, OwnerDeploymentError
from hetrain.mpc_ops.exchange.remote import PUBLIC_CONTEXT, RemoteExchange
from hetrain.participants import data_owner

from hetrain.runtime import Runtime, packing_plan
from hetrain.tasks import transient_only

OWNER_TIMEOUT_SECONDS = 3600.0
POLL_SECONDS = 1.0


def owner_entry(cfg: RunConfig, owner: str, table_path: str) -> OwnerConfig:
    """The trainer's entry for `owner`, pointed at the table path the owner's deployment holds."""
    entry = next((o for o in cfg.data.owners if o.name == owner), None)
    if entry is None:
        raise ConfigError(f"owner '{owner}' is not one of the config's data.owners "
                          f"({[o.name for o in cfg.data.owners]})")
    return entry.model_copy(update={"path": Path(table_path).resolve(), "deployment": None})


def default_outbox(url: str) -> Path:
    """Where a deployed owner prepares its bundle before publishing it to exchange.url: kept between runs,
    so an unchanged table is not encrypted again."""
    return Path.home() / ".cache" / "hetrain" / "outbox" / hashlib.sha256(url.encode()).hexdigest()[:16]


@task(name="encrypt-owner-bundle", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient_only)
def encrypt_owner_bundle(cfg: RunConfig, owner: OwnerConfig, exchange_dir: str, public_context: str,
                         outbox_dir: str | None = None) -> dict:
    """Validate, standardise and encrypt the owner's table into the exchange store.

    With exchange.url set, the public context is read from the URL, and the bundle is prepared in the
    owner's outbox and published to the URL (blobs first, manifest last).
    """
    if cfg.exchange.url is None:
        context = Path(public_context).read_bytes()
        manifest = data_owner.prepare(cfg, owner, context, packing_plan(cfg), Path(exchange_dir))
        return data_owner.bundle_summary(manifest, manifest["reused"])
    remote = RemoteExchange(cfg.exchange.url, cfg.exchange.storage_options)
    context = remote.read(PUBLIC_CONTEXT, ckks.MAX_CONTEXT_BYTES, "public context")
    outbox = Path(outbox_dir) if outbox_dir else default_outbox(cfg.exchange.url)
    manifest = data_owner.prepare(cfg, owner, context, packing_plan(cfg), outbox)
    published = remote.publish_owner(outbox / owner.name, owner.name)
    get_run_logger().info("owner %s: published %d files (%d bytes) to %s", owner.name, published["files"],
                          published["bytes"], remote.where(owner.name))
    return data_owner.bundle_summary(manifest, manifest["reused"])


@flow(name="prepare-owner-bundle", flow_run_name="prepare-{owner}")
def prepare_owner_bundle(owner: str, table_path: str, config: dict, exchange_dir: str, public_context: str,
                         outbox_dir: str | None = None) -> dict:
    """The owner's side, on the owner's worker: its own table in, a ciphertext bundle out.

    `owner`, `table_path` and `outbox_dir` (with exchange.url: where the bundle is prepared before it is
    published; default ~/.cache/hetrain/outbox/<url digest>) are the deployment's own parameters; the
    trainer passes only the validated config, the exchange location and the public context's location.
    """
    cfg = parse_config(config, f"config sent to owner '{owner}'")
    summary = encrypt_owner_bundle(cfg, owner_entry(cfg, owner, table_path), exchange_dir, public_context,
                                   outbox_dir)
    get_run_logger().info("owner %s: %d ciphertexts, %d bytes (%s)", owner, summary["ciphertexts"],
                          summary["bytes"], "reused" if summary["reused"] else "encrypted")
    return summary


def _manifest(rt: Runtime, owner: str) -> bytes | None:
    """An owner's published manifest (from exchange.url, or the exchange folder), None before its first."""
    if rt.remote is not None:
        return rt.remote.manifest_bytes(owner)
    path = rt.paths.exchange / owner / data_owner.MANIFEST
    return path.read_bytes() if path.is_file() else None


def _digest(data: bytes | None) -> str | None:
    return None if data is None else store.sha256_bytes(data)


def prepare_deployed_owners(rt: Runtime, timeout: float = OWNER_TIMEOUT_SECONDS) -> dict[str, dict]:
    """Trigger every owner given by `deployment`, wait for all, and summarise their bundles.

    The runs are started together (each on its owner's own work pool) and linked to the current
    flow run as subflows. Raises OwnerDeploymentError naming the owner, deployment and state.
    """
    owners = [o for o in rt.cfg.data.owners if o.deployment is not None]
    if not owners:
        return {}
    remote = rt.remote
    parameters = {"config": rt.cfg.model_dump(mode="json"),
                  "exchange_dir": str(rt.paths.exchange) if remote is None else remote.url,
                  "public_context": str(rt.paths.public_context) if remote is None else remote.where(PUBLIC_CONTEXT)}
    before = {o.name: _digest(_manifest(rt, o.name)) for o in owners}
    started = {}
    for o in owners:
        try:
            started[o.name] = run_deployment(o.deployment, parameters=parameters, timeout=0)
        except ObjectNotFound:
            raise OwnerDeploymentError(
                f"owner '{o.name}': deployment '{o.deployment}' does not exist on the Prefect server; run "
                f"`prefect deploy --all` from the repository root (prefect.yaml) against that server"
            ) from None
    finished = _wait(started, timeout)
    summaries = {}
    for o in owners:
        state = finished[o.name].state
        if state is None or not state.is_completed():
            raise OwnerDeploymentError(
                f"owner '{o.name}': deployment '{o.deployment}' ended {state.name if state else 'without a state'}"
                f" ({state.message if state and state.message else 'see its flow run in the UI'}); "
                f"no bundle was published"
            )
        data = _manifest(rt, o.name)
        if data is None:
            raise OwnerDeploymentError(f"owner '{o.name}': deployment '{o.deployment}' completed but published no "
                                       f"manifest to {parameters['exchange_dir']}")
        manifest = json.loads(data)
        summaries[o.name] = data_owner.bundle_summary(manifest, reused=before[o.name] == _digest(data))
    return summaries


def _wait(started: dict, timeout: float) -> dict:
    """Poll the owners' flow runs until all are final; raise OwnerDeploymentError past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = {name: client.read_flow_run(run.id) for name, run in started.items()}
            waiting = {n: r.state.name if r.state else "no state" for n, r in runs.items()
                       if r.state is None or not r.state.is_final()}
            if not waiting:
                return runs
            if time.monotonic() > deadline:
                raise OwnerDeploymentError(
                    f"owners {sorted(waiting)} did not finish within {timeout:.0f} s (states {waiting}); is a "
                    f"worker polling each owner's work pool (`prefect worker start --pool owner-<name>`)?"
                )
            time.sleep(POLL_SECONDS)
