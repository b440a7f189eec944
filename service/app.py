"""The HTTP and WebSocket surface of the streaming service (FastAPI).

    GET  /                      the web page (static files, no build step)
    GET  /health                {"status": "ok", model, device, active, stopping, queued, limits}
    POST /jobs                  {"prompt", "seed"?, "num_frames"?, "image"? (base64)} -> 202 {"job_id", ...}
    GET  /jobs/{id}             status, queue position, blocks done
    GET  /jobs/{id}/video.mp4   the finished video; /jobs/{id}/record its inference record
    DELETE /jobs/{id}           stop it
    WS   /ws                    first message: a request as for POST /jobs; then the server sends "queued",
                                "started", per block a JSON "block" message followed by one binary message
                                (uint8 RGB frames [f, H, W, 3]), and "done" / "stopped" / "error". The client
                                may send {"type": "switch_prompt", "prompt", "recache"} and {"type": "stop"}.
Bad requests get {"error": "<one line>"} with a 4xx status (over WebSocket: an "error" message, then close).

Only its own page may drive it: a request whose Host names another site (DNS rebinding) and a WebSocket or a
state-changing request whose Origin is another site's (cross-site WebSocket hijacking) get 403. A Host must be an
IP address, localhost, or one given with --allow_host; an Origin must be the page's own (http(s)://<Host>) or one
given with --allow_origin. Clients that send no Origin (scripts, curl) are not browsers and are served.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.jobs import MAX_PROMPT_CHARS, Job, JobManager, ServiceBusy, new_listener
from utils.errors import UserError

STATIC = Path(__file__).parent / "static"
WS_POLICY_VIOLATION = 1008  # WebSocket close code for a refused request


class GenerateRequest(BaseModel):
    """One generation request; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    seed: int = 0
    num_frames: Optional[int] = None
    image: Optional[str] = None  # base64 PNG, JPEG or WebP (a data: URL is accepted): the first frame (TI2V)


class SwitchMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    prompt: Optional[str] = None
    recache: bool = True


def _one_line(err: ValidationError | RequestValidationError) -> str:
    problems = []
    for item in err.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "request"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(problems)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


@dataclass(frozen=True)
class AccessRules:
    """Which Host and Origin headers the server accepts (see the module docstring)."""

    allow_hosts: tuple[str, ...] = ()  # host names beyond IP addresses and localhost
    allow_origins: tuple[str, ...] = ()  # origins beyond the page's own, e.g. "https://my-front-end.example"

    def host_refusal(self, host_header: Optional[str]) -> Optional[str]:
        name = _host_name(host_header or "")
        if not name:
            return "the request names no Host"
        if name == "localhost" or name in self.allow_hosts or _is_ip(name):
            return None
        return f"Host {name!r} is not this server's (start it with --allow_host {name} to serve that name)"

    def origin_refusal(self, origin: Optional[str], host_header: Optional[str]) -> Optional[str]:
        if origin is None:  # not sent by a browser page
            return None
        own = {f"http://{host_header}", f"https://{host_header}"}
        if origin in own or origin in self.allow_origins:
            return None
        return f"requests from the page at {origin[:80]!r} are refused: only this server's own page may use it " \
               "(or an origin given with --allow_origin)"


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'; lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def create_app(manager: JobManager, info: dict, rules: AccessRules = AccessRules()) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # uvicorn's graceful shutdown ends here before it re-raises a SIGTERM/SIGINT (which would skip any code after
        # uvicorn.run): stop the jobs and remove the uploads now
        manager.shutdown()

    app = FastAPI(title="Self-Forcing streaming service", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.manager = manager

    @app.middleware("http")
    async def only_our_page(request: Request, call_next):
        host = request.headers.get("host")
        refusal = rules.host_refusal(host)
        if refusal is None and request.method in STATE_CHANGING:
            refusal = rules.origin_refusal(request.headers.get("origin"), host)
        return error(403, refusal) if refusal is not None else await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return error(422, _one_line(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:  # a body that cannot be parsed,
        return error(err.status_code, str(err.detail))  # an unknown path: the same one-line JSON as everything else

    def admit(body: GenerateRequest, listener=None) -> Job:
        request = manager.check(body.prompt, body.seed, body.num_frames, body.image)
        return manager.submit(request, listener)

    def find(job_id: str) -> Job | JSONResponse:
        job = manager.jobs.get(job_id)
        return job if job is not None else error(404, f"no job {job_id[:40]!r}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **info, **manager.status()}

    @app.get("/config")
    async def config() -> dict:
        """What the page needs to know: frames, size, fps, limits."""
        return {**info, "max_frames": manager.max_frames, "max_prompt_chars": MAX_PROMPT_CHARS}

    @app.post("/jobs", status_code=202)
    async def post_job(body: GenerateRequest):
        try:
            job = await asyncio.to_thread(admit, body)
        except UserError as err:
            return error(422, str(err))
        except ServiceBusy as err:
            return error(429, str(err))
        return JSONResponse(job.summary(manager.position(job)), status_code=202)

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str):
        job = find(job_id)
        return job if isinstance(job, JSONResponse) else job.summary(manager.position(job))

    @app.delete("/jobs/{job_id}")
    async def delete_job(job_id: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        manager.stop(job)
        return job.summary(manager.position(job))

    def finished(job_id: str, what: str) -> Job | JSONResponse:
        """The job when it is done; 404 for an unknown one, 409 while it is not done."""
        job = find(job_id)
        if isinstance(job, JSONResponse) or job.status == "done":
            return job
        return error(409, f"job {job_id} is {job.status}: the {what} exists once it is done")

    @app.get("/jobs/{job_id}/video.mp4")
    async def video(job_id: str):
        job = finished(job_id, "video")
        if isinstance(job, JSONResponse):
            return job
        return FileResponse(job.folder / "video.mp4", media_type="video/mp4", filename=f"{job.folder.name}.mp4")

    @app.get("/jobs/{job_id}/record")
    async def record(job_id: str):
        job = finished(job_id, "record")
        return job if isinstance(job, JSONResponse) else job.record

    @app.websocket("/ws")
    async def stream(socket: WebSocket) -> None:
        host = socket.headers.get("host")
        refusal = rules.host_refusal(host) or rules.origin_refusal(socket.headers.get("origin"), host)
        await socket.accept()
        if refusal is not None:  # accepted only to say why in one message, then closed: nothing was read or started
            await _refuse(socket, 403, refusal)
            return
        try:
            body = GenerateRequest.model_validate(await _receive_json(socket))
            listener = new_listener()
            job = await asyncio.to_thread(admit, body, listener)
        except ValidationError as err:
            await _refuse(socket, 422, _one_line(err))
            return
        except NotJson as err:
            await _refuse(socket, 422, f"the first message is {err}")
            return
        except UserError as err:
            await _refuse(socket, 422, str(err))
            return
        except ServiceBusy as err:
            await _refuse(socket, 429, str(err))
            return
        except WebSocketDisconnect:
            return
        try:
            await socket.send_json({"type": "queued", "job_id": job.id, "queue_position": manager.position(job)})
        except Exception:  # noqa: BLE001 - the client left before it heard back: the job must not run for nobody
            manager.stop(job)
            return
        await _relay(socket, manager, job, listener[1])

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


class NotJson(Exception):
    """A WebSocket message that is not a JSON text (its str says what it is instead)."""


async def _receive_json(socket: WebSocket) -> object:
    """The next message as parsed JSON; binary, malformed or too deeply nested ones raise NotJson."""
    message = await socket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise NotJson("binary: expected JSON text")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise NotJson("not JSON") from None
    except RecursionError:
        raise NotJson("JSON nested too deeply") from None


async def _refuse(socket: WebSocket, status: int, message: str) -> None:
    """The one-line error, then close; a client that already left hears nothing (and the log stays quiet)."""
    try:
        await socket.send_json({"type": "error", "status": status, "error": " ".join(message.split())})
        await socket.close(code=WS_POLICY_VIOLATION)
    except (WebSocketDisconnect, RuntimeError, OSError) as err:
        if not _client_gone(err):
            raise


def _client_gone(err: BaseException) -> bool:
    """A send to a socket whose client has closed it (uvicorn raises ClientDisconnected, starlette RuntimeError)."""
    return isinstance(err, (WebSocketDisconnect, OSError)) or "close" in str(err).lower()


async def _relay(socket: WebSocket, manager: JobManager, job: Job, events: asyncio.Queue) -> None:
    """Send the job's events until it ends; read the client's switches and stops; a disconnect stops the job."""

    async def send() -> None:
        while True:
            event = await events.get()
            if isinstance(event, bytes):
                await socket.send_bytes(event)
                continue
            await socket.send_json(event)
            if event["type"] in ("done", "stopped", "error"):
                return

    async def receive() -> None:
        while True:
            try:
                message = SwitchMessage.model_validate(await _receive_json(socket))
            except (ValidationError, NotJson) as err:
                text = _one_line(err) if isinstance(err, ValidationError) else f"a message that is {err}"
                await socket.send_json({"type": "warning", "status": 422, "error": text})
                continue
            if message.type == "stop":
                manager.stop(job)
            elif message.type == "switch_prompt" and message.prompt and message.prompt.strip():
                job.switches.append((message.prompt.strip()[:MAX_PROMPT_CHARS], message.recache))
            else:
                await socket.send_json({"type": "warning", "status": 422,
                                        "error": "expected {type: stop} or {type: switch_prompt, prompt, recache}"})

    sender, receiver = asyncio.create_task(send()), asyncio.create_task(receive())
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        send_failed = sender in done and sender.exception() is not None  # the client is gone: sending fails
        if receiver in done or send_failed:  # the client went away (or broke the socket): free its slot
            manager.stop(job)
            sender.cancel()
            if receiver in done:
                receiver.exception()  # retrieved: a disconnect is the normal end here
        else:
            receiver.cancel()
            await socket.close()
    except (WebSocketDisconnect, RuntimeError):
        manager.stop(job)
    finally:
        for task in (sender, receiver):
            task.cancel()
        job.listeners[:] = [entry for entry in job.listeners if entry[1] is not events]
