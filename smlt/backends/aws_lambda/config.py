"""The Lambda backend's settings: backend options first, then ``SMLT_LAMBDA_*`` variables.

AWS itself is configured the way every boto3 program is (profiles, ``AWS_REGION``,
``AWS_ENDPOINT_URL_LAMBDA``, ``~/.aws/config``, instance roles): smlt adds nothing there and
never reads, logs or forwards credentials. What smlt needs on top is what to deploy:

- the worker **code**: a container image (``image_uri`` / ``SMLT_LAMBDA_IMAGE``, built from
  ``docker/Dockerfile`` and pushed to ECR; see docs/deploy-aws.md) or a zip package
  (``zip_file`` / ``SMLT_LAMBDA_ZIP``) where it fits Lambda's 250 MB unzipped limit, which a
  worker with PyTorch does not;
- the function's **execution role** (``role_arn`` / ``SMLT_LAMBDA_ROLE``): what the workers may
  reach (the S3 bucket of the object store);
- the **network**, when Redis is only reachable inside a VPC (ElastiCache): ``subnet_ids`` and
  ``security_group_ids`` (``SMLT_LAMBDA_SUBNETS``, ``SMLT_LAMBDA_SECURITY_GROUPS``, comma
  separated) attach the functions to it;
- optional: ``architecture`` (``x86_64`` or ``arm64``, which also picks the price), the name
  ``function_prefix``, extra ``environment`` for the functions (``AWS_ENDPOINT_URL_S3`` is
  passed on when set here, so workers reach the same object store), ``timeout_s`` (the
  function limit when a run gives no ``--function-timeout``), ``max_concurrency`` (the
  account's concurrent executions, ``SMLT_LAMBDA_MAX_CONCURRENCY``), ``ephemeral_storage_mb``
  (``/tmp``).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlt.backends.aws_lambda.limits import (
    DEFAULT_CONCURRENCY,
    MAX_TIMEOUT_S,
    ZIP_UNZIPPED_BYTES,
    ZIP_UPLOAD_BYTES,
)
from smlt.backends.retry import ThrottleRetry
from smlt.errors import ConfigError

__all__ = ["ARCHITECTURES", "DEFAULT_UPDATE_TIMEOUT_S", "LambdaConfig"]

ARCHITECTURES = ("x86_64", "arm64")
#: Longest wait for a function to become Active after CreateFunction, or for an update to
#: finish (the boto3 waiters poll GetFunction every second until then).
DEFAULT_UPDATE_TIMEOUT_S = float(os.environ.get("SMLT_LAMBDA_UPDATE_TIMEOUT_S", "300"))
#: Environment variables passed on to the functions when they are set where smlt runs: where
#: the object store's S3 API is, if not AWS's own endpoint.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3",)
# Lambda reserves these (its runtime sets them); a function may not be given them.
_RESERVED_ENV = re.compile(
    r"^(_HANDLER|_X_AMZN_TRACE_ID|AWS_(REGION|DEFAULT_REGION|EXECUTION_ENV|LAMBDA_.*|"
    r"ACCESS_KEY.*|SECRET_ACCESS_KEY|SESSION_TOKEN|XRAY_.*)|LAMBDA_(TASK|RUNTIME)_.*)$"
)
_ROLE_ARN = re.compile(r"^arn:aws[a-zA-Z-]*:iam::\d{12}:role/.+$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,30}$")


@dataclass(frozen=True)
class LambdaConfig:
    """Validated at construction; see the module docstring for each field."""

    image_uri: str | None = None
    zip_file: str | None = None
    role_arn: str | None = None
    handler: str = "smlt.worker.entrypoints.lambda_handler"
    runtime: str = "python3.11"
    architecture: str = "x86_64"
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    function_prefix: str = "smlt-"
    timeout_s: int = MAX_TIMEOUT_S
    max_concurrency: int = DEFAULT_CONCURRENCY
    environment: Mapping[str, str] = field(default_factory=dict)
    ephemeral_storage_mb: int | None = None
    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    update_timeout_s: float = DEFAULT_UPDATE_TIMEOUT_S
    throttle: ThrottleRetry = field(default_factory=ThrottleRetry)

    def __post_init__(self) -> None:
        if self.image_uri and self.zip_file:
            raise ConfigError("give the Lambda backend an image_uri or a zip_file, not both")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if not 1 <= self.timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(f"timeout_s must be in [1, {MAX_TIMEOUT_S}], got {self.timeout_s}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not _PREFIX.fullmatch(self.function_prefix):
            raise ConfigError(
                "function_prefix must be 1-30 letters, digits, '-' or '_', got "
                f"{self.function_prefix!r}"
            )
        if self.role_arn is not None and not _ROLE_ARN.fullmatch(self.role_arn):
            raise ConfigError(
                f"role_arn must be an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME), got "
                f"{self.role_arn!r}"
            )
        reserved = sorted(k for k in self.environment if _RESERVED_ENV.match(k))
        if reserved:
            raise ConfigError(f"Lambda reserves these environment variables: {reserved}")
        if self.ephemeral_storage_mb is not None and not 512 <= self.ephemeral_storage_mb <= 10240:
            raise ConfigError(
                f"ephemeral_storage_mb must be in [512, 10240], got {self.ephemeral_storage_mb}"
            )
        if bool(self.subnet_ids) != bool(self.security_group_ids):
            raise ConfigError(
                "a function in a VPC needs both subnet_ids and security_group_ids "
                "(SMLT_LAMBDA_SUBNETS, SMLT_LAMBDA_SECURITY_GROUPS)"
            )
        if self.update_timeout_s <= 0:
            raise ConfigError(f"update_timeout_s must be positive, got {self.update_timeout_s}")

    @classmethod
    def resolve(
        cls, options: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> LambdaConfig:
        """Backend options over ``SMLT_LAMBDA_IMAGE``, ``SMLT_LAMBDA_ZIP``, ``SMLT_LAMBDA_ROLE``,
        ``SMLT_LAMBDA_SUBNETS`` and ``SMLT_LAMBDA_SECURITY_GROUPS``; ``AWS_ENDPOINT_URL_S3``
        forwarded to the functions' environment.
        An unknown option is a ConfigError naming it."""
        env = os.environ if env is None else env
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) for the aws_lambda backend: {unknown}; known: {sorted(names)}"
            )
        values = dict(options)
        if "image_uri" not in values and "zip_file" not in values:
            values["image_uri"] = env.get("SMLT_LAMBDA_IMAGE") or None
            values["zip_file"] = env.get("SMLT_LAMBDA_ZIP") or None
        values.setdefault("role_arn", env.get("SMLT_LAMBDA_ROLE") or None)
        for name, variable in (
            ("subnet_ids", "SMLT_LAMBDA_SUBNETS"),
            ("security_group_ids", "SMLT_LAMBDA_SECURITY_GROUPS"),
        ):
            given = values.get(name, env.get(variable, ""))
            if isinstance(given, str):
                given = [part.strip() for part in given.split(",") if part.strip()]
            values[name] = tuple(given)
        if "max_concurrency" not in values and env.get("SMLT_LAMBDA_MAX_CONCURRENCY"):
            text = env["SMLT_LAMBDA_MAX_CONCURRENCY"]
            try:
                values["max_concurrency"] = int(text)
            except ValueError:
                raise ConfigError(
                    f"SMLT_LAMBDA_MAX_CONCURRENCY={text!r} is not a whole number"
                ) from None
        forwarded = {k: env[k] for k in FORWARDED_ENV if env.get(k)}
        values["environment"] = {**forwarded, **dict(values.get("environment") or {})}
        return cls(**values)

    @property
    def package_type(self) -> str:
        return "Zip" if self.zip_file else "Image"

    def require_deployable(self) -> None:
        """Raise ConfigError unless there is code and a role to create a function from (checked
        as a run starts; cleaning needs neither)."""
        if not (self.image_uri or self.zip_file):
            raise ConfigError(
                "the aws_lambda backend needs the worker's code: set SMLT_LAMBDA_IMAGE to the "
                "ECR image built from docker/Dockerfile (see docs/deploy-aws.md), or "
                "SMLT_LAMBDA_ZIP to a zip package that fits 250 MB unzipped"
            )
        if not self.role_arn:
            raise ConfigError(
                "the aws_lambda backend needs the functions' execution role: set "
                "SMLT_LAMBDA_ROLE to its ARN (see docs/deploy-aws.md for its policy)"
            )
        if self.zip_file:
            check_zip(Path(self.zip_file))


def check_zip(path: Path) -> None:
    """Refuse a zip package Lambda would: over 50 MB for a direct upload, or over 250 MB once
    unzipped (PyTorch alone is larger: use the container image)."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            unzipped = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read the Lambda zip package {path}: {exc}") from exc
    if size > ZIP_UPLOAD_BYTES:
        raise ConfigError(
            f"{path} is {size / 2**20:.0f} MB; a zip uploaded with CreateFunction may be at most "
            f"{ZIP_UPLOAD_BYTES // 2**20} MB: use the container image (docs/deploy-aws.md)"
        )
    if unzipped > ZIP_UNZIPPED_BYTES:
        raise ConfigError(
            f"{path} unzips to {unzipped / 2**20:.0f} MB; Lambda allows "
            f"{ZIP_UNZIPPED_BYTES // 2**20} MB: a worker with PyTorch needs the container image "
            "(docs/deploy-aws.md)"
        )
