"""The Storage REST API under /storage/v1, as far as the `supabase` client's storage calls need it.

    GET    /bucket                               list buckets
    POST   /bucket                               {"id"?, "name", "public"?, "file_size_limit"?,
                                                  "allowed_mime_types"?} → {"name"}
    GET    /bucket/{id}                          the bucket
    PUT    /bucket/{id}                          {"public"?, ...} → {"message": "Successfully updated"}
    POST   /object/sign/{bucket}/{path}          {"expiresIn"} → {"signedURL": "/object/sign/...?token=..."}
    GET    /object/sign/{bucket}/{path}?token=   the object, while the token is valid (no key needed)
    GET    /object/public/{bucket}/{path}        the object, when the bucket is public (no key needed)
    GET    /object/authenticated/{bucket}/{path} the object (as GET /object/{bucket}/{path})
    POST   /object/{bucket}/{path}               upload; `x-upsert: true` replaces → {"Id", "Key"}
    PUT    /object/{bucket}/{path}               upload that always replaces (storage3's `update`)
    GET    /object/{bucket}/{path}               download

Auth is Storage's own: `Authorization: Bearer <JWT>` signed with the project's JWT secret; anything
else is AccessDenied (HTTP 400, statusCode "403"). The service_role key bypasses row-level security;
any other role (the anon key) is refused writes and sees no buckets or objects, as with the default
policies. The `apikey` header is the gateway's business and is not checked here.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import errors
from .errors import RequestInvalid, StorageError
from .state import Bucket, StorageState
from .uploads import read_upload

SERVICE_ROLE = "service_role"
Handler = Callable[[Request, StorageState, str], Awaitable[Response]]
# Storage's bucket-name rule (`isValidBucketName`): printable, no slashes, at most 100 characters.
BUCKET_NAME = re.compile(r"^[\w!\-.*'() &$@=;:+,?]{1,100}$")


def state_of(request: Request) -> StorageState:
    state: StorageState = request.app.state.storage
    return state


def _key_of(request: Request) -> str:
    params = request.path_params
    if "path" in params:
        return f"{params['bucket']}/{params['path']}"
    return str(params.get("bucket_id", ""))


def endpoint(
    operation: str, *, authenticated: bool = True
) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Injected faults for `operation` (the gateway's answer, so before auth), then Storage's JWT
    check, then the handler; Storage's errors become their responses; every call is logged."""

    def decorate(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            state = state_of(request)
            response = await _answer(request, state, operation, authenticated, handler)
            state.record(operation, _key_of(request), response.status_code)
            return response

        return wrapper

    return decorate


async def _answer(
    request: Request, state: StorageState, operation: str, authenticated: bool, handler: Handler
) -> Response:
    fault = state.take_fault(operation)
    if fault is not None:
        await asyncio.sleep(fault.sleep_seconds)
        if fault.status is not None:
            await request.body()  # a gateway reads the request before it gives up on the upstream
            return errors.injected(fault.status)
    try:
        role = state.role_of(request.headers.get("authorization", "")) if authenticated else "anon"
        return await handler(request, state, role)
    except (StorageError, RequestInvalid) as exc:
        return exc.response()


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise RequestInvalid("Body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestInvalid("body must be object")
    return body


def _object_response(request: Request, state: StorageState, bucket_id: str, name: str) -> Response:
    stored = state.object(bucket_id, name)
    headers = {
        "Cache-Control": stored.cache_control,
        "ETag": stored.etag,
        "Last-Modified": formatdate(stored.updated_at, usegmt=True),
    }
    if "download" in request.query_params:
        filename = request.query_params["download"] or name.rsplit("/", 1)[-1]
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(stored.data, media_type=stored.mime_type, headers=headers)


# -- buckets ---------------------------------------------------------------------------------------
@endpoint("bucket")
async def list_buckets(request: Request, state: StorageState, role: str) -> Response:
    visible = state.buckets.values() if role == SERVICE_ROLE else []
    return JSONResponse([bucket.json() for bucket in visible])


@endpoint("bucket")
async def get_bucket(request: Request, state: StorageState, role: str) -> Response:
    if role != SERVICE_ROLE:
        raise errors.no_such_bucket()
    return JSONResponse(state.bucket(request.path_params["bucket_id"]).json())


def _bucket_options(body: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "public" in body:
        if not isinstance(body["public"], bool):
            raise RequestInvalid("body/public must be boolean")
        options["public"] = body["public"]
    if "file_size_limit" in body:
        limit = body["file_size_limit"]
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise RequestInvalid("body/file_size_limit must be integer")
        options["file_size_limit"] = limit
    if "allowed_mime_types" in body:
        types = body["allowed_mime_types"]
        if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
            raise RequestInvalid("body/allowed_mime_types must be array")
        options["allowed_mime_types"] = [t for t in types if t] if types is not None else None
    return options


@endpoint("bucket")
async def create_bucket(request: Request, state: StorageState, role: str) -> Response:
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise RequestInvalid("body must have required property 'name'")
    bucket_id = body.get("id") or name
    if not isinstance(bucket_id, str) or not BUCKET_NAME.fullmatch(bucket_id):
        raise errors.invalid_bucket_name()
    options = _bucket_options(body)
    if role != SERVICE_ROLE:
        raise errors.row_level_security("buckets")
    if bucket_id in state.buckets:
        raise errors.bucket_already_exists()
    state.buckets[bucket_id] = Bucket(
        id=bucket_id, name=name, created_at=state.now(), updated_at=state.now(), **options
    )
    return JSONResponse({"name": name})


@endpoint("bucket")
async def update_bucket(request: Request, state: StorageState, role: str) -> Response:
    body = await _json_body(request)
    options = _bucket_options(body)
    if role != SERVICE_ROLE:
        raise errors.no_such_bucket()
    bucket = state.bucket(request.path_params["bucket_id"])
    for name, value in options.items():
        setattr(bucket, name, value)
    bucket.updated_at = state.now()
    return JSONResponse({"message": "Successfully updated"})


# -- objects ---------------------------------------------------------------------------------------
def _upload(*, always_replace: bool) -> Handler:
    async def upload(request: Request, state: StorageState, role: str) -> Response:
        bucket_id, name = request.path_params["bucket"], request.path_params["path"]
        if not name or any(ord(c) < 32 for c in name):
            raise errors.invalid_key(name)
        upsert = always_replace or request.headers.get("x-upsert") == "true"
        file = read_upload(
            request.headers.get("content-type", ""),
            request.headers.get("cache-control"),
            await request.body(),
        )
        if role != SERVICE_ROLE:
            raise errors.row_level_security()
        stored = state.put(bucket_id, name, file.data, file.mime_type, file.cache_control, upsert=upsert)
        return JSONResponse({"Id": stored.id, "Key": f"{bucket_id}/{name}"})

    return upload


create_object = endpoint("upload")(_upload(always_replace=False))
update_object = endpoint("upload")(_upload(always_replace=True))


@endpoint("download")
async def download(request: Request, state: StorageState, role: str) -> Response:
    if role != SERVICE_ROLE:
        raise errors.no_such_key()
    return _object_response(request, state, request.path_params["bucket"], request.path_params["path"])


@endpoint("sign")
async def create_signed_url(request: Request, state: StorageState, role: str) -> Response:
    body = await _json_body(request)
    raw = body.get("expiresIn")
    try:  # storage3 sends it as a string; Fastify's schema coerces it to an integer
        expires_in = int(raw) if not isinstance(raw, bool) and raw is not None else None
    except (TypeError, ValueError):
        expires_in = None
    if raw is None:
        raise RequestInvalid("body must have required property 'expiresIn'")
    if expires_in is None:
        raise RequestInvalid("body/expiresIn must be integer")
    if expires_in < 1:
        raise RequestInvalid("body/expiresIn must be >= 1")
    bucket_id, name = request.path_params["bucket"], request.path_params["path"]
    if role != SERVICE_ROLE:
        raise errors.no_such_key()
    state.object(bucket_id, name)  # Storage signs only what exists
    token = state.sign_url(bucket_id, name, expires_in)
    return JSONResponse({"signedURL": f"/object/sign/{bucket_id}/{name}?token={token}"})


@endpoint("signed_download", authenticated=False)
async def signed_download(request: Request, state: StorageState, role: str) -> Response:
    token = request.query_params.get("token")
    if token is None:
        raise RequestInvalid("querystring must have required property 'token'")
    bucket_id, name = request.path_params["bucket"], request.path_params["path"]
    if state.signed_path(token) != f"{bucket_id}/{name}":
        raise errors.invalid_signature()
    return _object_response(request, state, bucket_id, name)


@endpoint("public_download", authenticated=False)
async def public_download(request: Request, state: StorageState, role: str) -> Response:
    bucket_id = request.path_params["bucket"]
    bucket = state.buckets.get(bucket_id)
    if bucket is None or not bucket.public:
        raise errors.no_such_bucket()
    return _object_response(request, state, bucket_id, request.path_params["path"])


OBJECT = "/{bucket}/{path:path}"
# The literal prefixes (sign, public, authenticated) come before the catch-all object routes.
ROUTES = [
    Route("/bucket", list_buckets, methods=["GET"]),
    Route("/bucket", create_bucket, methods=["POST"]),
    Route("/bucket/", list_buckets, methods=["GET"]),
    Route("/bucket/", create_bucket, methods=["POST"]),
    Route("/bucket/{bucket_id}", get_bucket, methods=["GET"]),
    Route("/bucket/{bucket_id}", update_bucket, methods=["PUT"]),
    Route(f"/object/sign{OBJECT}", create_signed_url, methods=["POST"]),
    Route(f"/object/sign{OBJECT}", signed_download, methods=["GET"]),
    Route(f"/object/public{OBJECT}", public_download, methods=["GET"]),
    Route(f"/object/authenticated{OBJECT}", download, methods=["GET"]),
    Route(f"/object{OBJECT}", create_object, methods=["POST"]),
    Route(f"/object{OBJECT}", update_object, methods=["PUT"]),
    Route(f"/object{OBJECT}", download, methods=["GET"]),
]
