"""The AWS Lambda backend (boto3): :class:`LambdaBackend`, its :class:`LambdaConfig`, and the
translation of Lambda's errors (:mod:`smlt.backends.aws_lambda.errors`)."""

from __future__ import annotations

from smlt.backends.aws_lambda.backend import INVOCATION_TYPE, LambdaBackend, LambdaInvocation
from smlt.backends.aws_lambda.config import LambdaConfig

__all__ = ["INVOCATION_TYPE", "LambdaBackend", "LambdaConfig", "LambdaInvocation"]
