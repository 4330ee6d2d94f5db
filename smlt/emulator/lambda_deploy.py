"""Checking and applying what CreateFunction, UpdateFunctionConfiguration and UpdateFunctionCode
send, and turning a function into what its containers run.

Every field is checked before anything changes, so a refused update leaves the function as it
was. The checks are Lambda's where they matter to a client (memory 128-10,240 MB, timeout
1-900 s, reserved environment variables, the 4 KB environment), plus the emulator's own limits,
said plainly: it runs Python only, and it cannot fetch code from S3.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smlt.emulator.config import EmulatorConfig, parse_handler
from smlt.emulator.containers import ContainerSpec
from smlt.emulator.lambda_model import (
    LambdaFunction,
    Version,
    check_environment,
    int_in,
    invalid,
    unpack_zip,
)
from smlt.errors import ConfigError

__all__ = ["apply_code", "apply_configuration", "version_of"]


def _check_handler(handler: str) -> None:
    try:
        parse_handler(handler)
    except ConfigError as exc:
        raise invalid(str(exc)) from None


def apply_configuration(function: LambdaFunction, body: Mapping[str, Any]) -> None:
    """Apply the configuration fields of ``body`` (those it has) to ``function``."""
    memory_mb = int_in(body, "MemorySize", 128, 10_240, function.memory_mb)
    timeout_s = int_in(body, "Timeout", 1, 900, function.timeout_s)
    environment = function.environment
    if "Environment" in body:
        environment = check_environment((body["Environment"] or {}).get("Variables", {}))
    runtime = body.get("Runtime", function.runtime)
    handler = body.get("Handler", function.handler)
    image_config = body.get("ImageConfig", function.image_config) or {}
    if not isinstance(image_config, dict):
        raise invalid("ImageConfig must be an object")
    if function.package_type == "Zip":
        if not isinstance(runtime, str) or not runtime:
            raise invalid("Runtime is required for .zip deployment packages")
        if not runtime.startswith("python"):
            raise invalid(
                f"the emulator runs Python functions only; Runtime {runtime!r} is not one"
            )
        if not isinstance(handler, str) or not handler:
            raise invalid("Handler is required for .zip deployment packages")
        _check_handler(handler)
    elif "Runtime" in body or "Handler" in body:
        raise invalid("Runtime and Handler are not supported for package type Image")
    if image_config.get("Command"):
        _check_handler(str(image_config["Command"][0]))
    storage = body.get("EphemeralStorage") or {"Size": function.ephemeral_storage_mb}
    storage_mb = int_in(storage, "Size", 512, 10_240, function.ephemeral_storage_mb)
    function.memory_mb, function.timeout_s = memory_mb, timeout_s
    function.environment, function.image_config = environment, dict(image_config)
    function.runtime, function.handler = runtime, handler
    function.ephemeral_storage_mb = storage_mb
    function.description = str(body.get("Description", function.description))
    function.role = str(body.get("Role", function.role))
    if "Architectures" in body:
        function.architectures = list(body["Architectures"])


def apply_code(function: LambdaFunction, code: Mapping[str, Any], folder: Path) -> None:
    """Take ``Code`` (or UpdateFunctionCode's body): a zip is unpacked into ``folder``, which
    becomes the containers' working directory and first import path; an image's folder stays
    empty (no image is pulled)."""
    if "S3Bucket" in code or "S3Key" in code:
        raise invalid(
            "the emulator takes a function's code as ZipFile or ImageUri; it cannot fetch "
            "code from S3 (S3Bucket/S3Key)"
        )
    if function.package_type == "Image":
        image_uri = code.get("ImageUri")
        if not isinstance(image_uri, str) or not image_uri:
            raise invalid(
                "Please provide ImageUri when updating a function with packageType Image."
            )
        folder.mkdir(parents=True, mode=0o700)
        function.image_uri, function.code_dir, function.code_size = image_uri, folder, 0
        function.code_sha256 = base64.b64encode(
            hashlib.sha256(image_uri.encode()).digest()
        ).decode()
        return
    if "ImageUri" in code:
        raise invalid(
            "Please don't provide ImageUri when updating a function with packageType Zip."
        )
    if "ZipFile" not in code:
        raise invalid("Code must have ZipFile (or ImageUri for package type Image)")
    function.code_sha256, function.code_size = unpack_zip(str(code["ZipFile"]), folder)
    function.code_dir = folder


def _image_handler(function: LambdaFunction, config: EmulatorConfig) -> str:
    """The handler an image runs (the rule is in :mod:`smlt.emulator.config`)."""
    command = function.image_config.get("Command")
    if command:
        return str(command[0])
    uri = function.image_uri or ""
    untagged = uri.split("@")[0]
    if ":" in untagged.rpartition("/")[2]:
        untagged = untagged.rpartition(":")[0]
    mapped = config.image_handlers
    return mapped.get(uri) or mapped.get(untagged) or config.lambda_handler


def version_of(function: LambdaFunction, config: EmulatorConfig) -> Version:
    """What the function's current configuration runs, with the variables Lambda sets."""
    assert function.code_dir is not None
    handler = function.handler
    if function.package_type == "Image":
        handler = _image_handler(function, config)
    assert handler is not None
    environment = {
        "AWS_LAMBDA_FUNCTION_NAME": function.name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function.name}",
        "AWS_REGION": function.region,
        "AWS_DEFAULT_REGION": function.region,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{function.runtime or 'Image'}",
        "LAMBDA_TASK_ROOT": str(function.code_dir),
        "_HANDLER": handler,
        "TZ": ":UTC",
        **function.environment,
    }
    spec = ContainerSpec(
        platform="lambda",
        function=function.key,
        revision=function.revision_id,
        handler=handler,
        memory_mb=function.memory_mb,
        code_dir=function.code_dir,
        environment=environment,
    )
    return Version(spec, function.timeout_s)
