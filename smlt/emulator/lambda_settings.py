"""The Lambda operations around a function rather than on it: tags (what ``clean`` finds smlt's
functions by), reserved concurrency, the event-invoke config (how many times Lambda retries a
failed ``Event``), and the account's limits.

Each operation is a function of the function table, the emulator's config, the request, the
region it was signed for and its path parameters; :data:`OPERATIONS` is what the API routes to.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from smlt.emulator.config import EmulatorConfig
from smlt.emulator.lambda_model import (
    FunctionTable,
    LambdaError,
    LambdaFunction,
    int_in,
    invalid,
    json_body,
    parse_reference,
)
from smlt.emulator.messages import Request, Response

__all__ = ["OPERATIONS"]


def _tagged(table: FunctionTable, region: str, arn: str) -> LambdaFunction:
    if not arn.startswith("arn:"):
        raise invalid(f"{arn} is not a function ARN")
    return table.get(*parse_reference(arn, region))


def _tags(request: Request) -> dict[str, str]:
    tags = json_body(request).get("Tags") or {}
    if not isinstance(tags, dict):
        raise invalid("Tags must be a map of strings")
    return {str(k): str(v) for k, v in tags.items()}


def tag(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, arn: str
) -> Response:
    tags = _tags(request)
    with table.lock:
        _tagged(table, region, arn).tags.update(tags)
    return Response(204)


def list_tags(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, arn: str
) -> Response:
    with table.lock:
        return Response.json(200, {"Tags": dict(_tagged(table, region, arn).tags)})


def untag(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, arn: str
) -> Response:
    with table.lock:
        function = _tagged(table, region, arn)
        for key in request.query.get("tagKeys", []):
            function.tags.pop(key, None)
    return Response(204)


def account_settings(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str
) -> Response:
    with table.lock:
        reserved = sum(f.reserved_concurrency or 0 for f in table.all())
        functions = table.in_region(region)
    limit = config.max_concurrency
    return Response.json(
        200,
        {
            "AccountLimit": {
                "TotalCodeSize": 80_530_636_800,
                "CodeSizeUnzipped": 262_144_000,
                "CodeSizeZipped": 52_428_800,
                "ConcurrentExecutions": limit,
                "UnreservedConcurrentExecutions": limit - reserved,
            },
            "AccountUsage": {
                "TotalCodeSize": sum(f.code_size for f in functions),
                "FunctionCount": len(functions),
            },
        },
    )


def put_concurrency(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, ref: str
) -> Response:
    value = int_in(json_body(request), "ReservedConcurrentExecutions", 0, 10**6, -1)
    with table.lock:
        function = table.get(*parse_reference(ref, region))
        others = sum(f.reserved_concurrency or 0 for f in table.all() if f is not function)
        if others + value > config.max_concurrency:
            raise invalid(
                "Specified ReservedConcurrentExecutions for function decreases account's "
                "UnreservedConcurrentExecution below its minimum value of [0]."
            )
        function.reserved_concurrency = value
    return Response.json(200, {"ReservedConcurrentExecutions": value})


def get_concurrency(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, ref: str
) -> Response:
    with table.lock:
        reserved = table.get(*parse_reference(ref, region)).reserved_concurrency
    answer = {} if reserved is None else {"ReservedConcurrentExecutions": reserved}
    return Response.json(200, answer)


def delete_concurrency(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, ref: str
) -> Response:
    with table.lock:
        table.get(*parse_reference(ref, region)).reserved_concurrency = None
    return Response(204)


def put_event_config(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, ref: str
) -> Response:
    body = json_body(request)
    retries = int_in(body, "MaximumRetryAttempts", 0, 2, 2)
    age_s = int_in(body, "MaximumEventAgeInSeconds", 60, 21_600, 21_600)
    with table.lock:
        function = table.get(*parse_reference(ref, region, request.query_value("Qualifier")))
        function.event_config = {
            "LastModified": time.time(),
            "FunctionArn": f"{function.arn}:$LATEST",
            "MaximumRetryAttempts": retries,
            "MaximumEventAgeInSeconds": age_s,
            "DestinationConfig": {"OnSuccess": {}, "OnFailure": {}},
        }
        return Response.json(200, function.event_config)


def get_event_config(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, ref: str
) -> Response:
    with table.lock:
        function = table.get(*parse_reference(ref, region, request.query_value("Qualifier")))
        if function.event_config is None:
            raise LambdaError(
                404,
                "ResourceNotFoundException",
                f"The function {function.arn} doesn't have an EventInvokeConfig",
            )
        return Response.json(200, function.event_config)


def delete_event_config(
    table: FunctionTable, config: EmulatorConfig, request: Request, region: str, ref: str
) -> Response:
    with table.lock:
        function = table.get(*parse_reference(ref, region, request.query_value("Qualifier")))
        function.event_config = None
    return Response(204)


#: Operation name (as the API's route table names it) -> its function.
OPERATIONS: dict[str, Callable[..., Response]] = {
    "tag": tag,
    "list_tags": list_tags,
    "untag": untag,
    "account_settings": account_settings,
    "put_concurrency": put_concurrency,
    "get_concurrency": get_concurrency,
    "delete_concurrency": delete_concurrency,
    "put_event_config": put_event_config,
    "get_event_config": get_event_config,
    "delete_event_config": delete_event_config,
}
