"""The Lambda control plane: create, update, wait for, list and delete smlt's functions.

Blocking boto3 calls (the backend runs them in a thread). A function is created tagged as
smlt's and, once created or changed, waited for with boto3's ``function_active_v2`` /
``function_updated_v2`` waiters, bounded by ``update_timeout_s``: Lambda refuses a second update
while one is in progress, and an invocation sent meanwhile may still run the old configuration.
A function of the same name without smlt's tag is refused, never changed or deleted.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from smlt.backends.aws_lambda.config import LambdaConfig
from smlt.backends.aws_lambda.errors import translate_client_error
from smlt.backends.managed import JOB_KEY, MANAGED_KEY, MANAGED_VALUE, ManagedResource
from smlt.errors import BackendError, ConfigError

__all__ = ["FunctionControl"]

#: Seconds between two polls of a waiter (boto3's own cadence for these waiters).
_WAITER_DELAY_S = 1


class FunctionControl:
    """smlt's functions in one account and region, through ``client()`` (boto3's Lambda client,
    made on first use by the backend)."""

    def __init__(self, config: LambdaConfig, client: Callable[[], Any]) -> None:
        self.config = config
        self._client = client
        self._zip_bytes: bytes | None = None

    def ensure(self, name: str, job: str, memory_mb: int, timeout_s: int) -> None:
        """Create function ``name`` for ``job`` (tagged as smlt's), or bring it to ``memory_mb``,
        ``timeout_s`` and the configured code, and return once Lambda reports it ready."""
        from botocore.exceptions import BotoCoreError, ClientError, WaiterError

        client = self._client()
        where = f"aws_lambda: deploy {name}"
        try:
            current = self._get_function(client, name)
            if current is None:
                try:
                    client.create_function(**self._create_args(name, job, memory_mb, timeout_s))
                except ClientError as exc:
                    if _code(exc) != "ResourceConflictException":  # not created meanwhile
                        raise
                    current = self._get_function(client, name)
                else:
                    self._wait(client, "function_active_v2", name)
                    return
            if current is None:
                raise BackendError(f"{where}: the function vanished while being created")
            self._update(client, name, current, memory_mb, timeout_s)
        except WaiterError as exc:
            last = getattr(exc, "last_response", None) or {}
            config = last.get("Configuration") or {}
            reason = config.get("StateReason") or config.get("LastUpdateStatusReason") or exc
            raise BackendError(f"{where}: the function did not become ready: {reason}") from None
        except (BotoCoreError, ClientError) as exc:
            raise translate_client_error(exc, where) from None

    def _get_function(self, client: Any, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            found: dict[str, Any] = client.get_function(FunctionName=name)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise
        if "Tags" not in found:  # GetFunction leaves them out without lambda:ListTags
            arn = found["Configuration"]["FunctionArn"]
            found["Tags"] = client.list_tags(Resource=arn).get("Tags", {})
        return found

    def _update(
        self, client: Any, name: str, current: dict[str, Any], memory_mb: int, timeout_s: int
    ) -> None:
        """Bring an existing function to the wanted code and configuration, waiting for each
        update: Lambda refuses a second update while one is in progress."""
        config = current["Configuration"]
        if (current.get("Tags") or {}).get(MANAGED_KEY) != MANAGED_VALUE:
            raise ConfigError(
                f"a Lambda function named {name} exists and smlt did not create it (no "
                f"{MANAGED_KEY} tag); smlt leaves it alone: choose another function_prefix"
            )
        if config.get("State") == "Pending":
            self._wait(client, "function_active_v2", name)
        if config.get("LastUpdateStatus") == "InProgress":
            self._wait(client, "function_updated_v2", name)
        code = self._code_update(current)
        if code:
            client.update_function_code(FunctionName=name, **code)
            self._wait(client, "function_updated_v2", name)
        wanted_env = dict(self.config.environment)
        env = (config.get("Environment") or {}).get("Variables") or {}
        vpc = config.get("VpcConfig") or {}
        have_vpc = (sorted(vpc.get("SubnetIds") or ()), sorted(vpc.get("SecurityGroupIds") or ()))
        want_vpc = (sorted(self.config.subnet_ids), sorted(self.config.security_group_ids))
        if (config.get("MemorySize"), config.get("Timeout"), env, have_vpc) != (
            memory_mb,
            timeout_s,
            wanted_env,
            want_vpc,
        ):
            update: dict[str, Any] = {
                "FunctionName": name,
                "MemorySize": memory_mb,
                "Timeout": timeout_s,
                "Environment": {"Variables": wanted_env},
            }
            if have_vpc != want_vpc:
                update["VpcConfig"] = self._vpc()
            client.update_function_configuration(**update)
            self._wait(client, "function_updated_v2", name)

    def _code_update(self, current: dict[str, Any]) -> dict[str, Any]:
        """UpdateFunctionCode's arguments if the deployed code is not what is configured."""
        if self.config.zip_file:
            data = self._zip()
            digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
            if current["Configuration"].get("CodeSha256") != digest:
                return {"ZipFile": data}
            return {}
        if (current.get("Code") or {}).get("ImageUri") != self.config.image_uri:
            return {"ImageUri": self.config.image_uri}
        return {}

    def _create_args(self, name: str, job: str, memory_mb: int, timeout_s: int) -> dict[str, Any]:
        config = self.config
        config.require_deployable()
        args: dict[str, Any] = {
            "FunctionName": name,
            "Role": config.role_arn,
            "MemorySize": memory_mb,
            "Timeout": timeout_s,
            "Architectures": [config.architecture],
            "Environment": {"Variables": dict(config.environment)},
            "Description": f"smlt worker of job {job}"[:256],
            "Tags": {MANAGED_KEY: MANAGED_VALUE, JOB_KEY: job[:256]},
        }
        if config.zip_file:
            args.update(
                PackageType="Zip",
                Runtime=config.runtime,
                Handler=config.handler,
                Code={"ZipFile": self._zip()},
            )
        else:
            args.update(PackageType="Image", Code={"ImageUri": config.image_uri})
        if config.ephemeral_storage_mb is not None:
            args["EphemeralStorage"] = {"Size": config.ephemeral_storage_mb}
        if config.subnet_ids:
            args["VpcConfig"] = self._vpc()
        return args

    def _vpc(self) -> dict[str, list[str]]:
        return {
            "SubnetIds": list(self.config.subnet_ids),
            "SecurityGroupIds": list(self.config.security_group_ids),
        }

    def _zip(self) -> bytes:
        if self._zip_bytes is None:
            assert self.config.zip_file is not None
            self._zip_bytes = Path(self.config.zip_file).read_bytes()
        return self._zip_bytes

    def _wait(self, client: Any, waiter: str, name: str) -> None:
        attempts = max(1, math.ceil(self.config.update_timeout_s / _WAITER_DELAY_S))
        client.get_waiter(waiter).wait(
            FunctionName=name, WaiterConfig={"Delay": _WAITER_DELAY_S, "MaxAttempts": attempts}
        )

    def delete(self, names: list[str]) -> None:
        """Delete these functions; one that does not exist is not an error."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        for name in names:
            try:
                client.delete_function(FunctionName=name)
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise translate_client_error(exc, f"aws_lambda: delete {name}") from None
            except BotoCoreError as exc:
                raise translate_client_error(exc, f"aws_lambda: delete {name}") from None

    def remove_managed(self, older_than_s: float | None, dry_run: bool) -> list[ManagedResource]:
        """See :meth:`ServerlessBackend.remove_managed`; blocking."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        now = time.time()
        found: list[ManagedResource] = []
        try:
            for page in client.get_paginator("list_functions").paginate():
                for function in page.get("Functions", ()):
                    tags = client.list_tags(Resource=function["FunctionArn"]).get("Tags", {})
                    if tags.get(MANAGED_KEY) != MANAGED_VALUE:
                        continue
                    modified = _unix_s(function.get("LastModified"))
                    if older_than_s is not None and now - modified < older_than_s:
                        continue
                    name = function["FunctionName"]
                    if not dry_run:
                        self.delete([name])
                    found.append(ManagedResource(name, tags.get(JOB_KEY, ""), modified))
        except (BotoCoreError, ClientError) as exc:
            raise translate_client_error(exc, "aws_lambda: listing smlt's functions") from None
        return found


def _code(exc: BaseException) -> str:
    """A botocore ClientError's error code ("" for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "")
    return ""


def _unix_s(text: Any) -> float:
    """Lambda's ``LastModified`` ("2024-05-01T12:00:00.000+0000") in Unix seconds; 0 if
    unreadable, so an unreadable function counts as old."""
    if not isinstance(text, str):
        return 0.0
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0
