"""HTTP API of the VMix tab, under /vmix/v1 (registered by on_app_started; also with --nowebui).

    GET  /vmix/v1/make/defaults        the tab's settings with their defaults and hints, the default dimensions
    POST /vmix/v1/make                 start a job (JSON body: request.py); 200 {"task_id", ...} at once,
                                       422 + one sentence for a bad setting, 409 while another job runs
    GET  /vmix/v1/make                 the current (or last) job: state, step, loss, ETA, message;
                                       ?preview=true adds the newest λ-sweep preview as base64 PNG
    GET  /vmix/v1/make/{task_id}       the same for one job (404 when it is not the current or last one)
    POST /vmix/v1/make/interrupt       stop the running job after its current step (it saves; Resume continues)

With --api-auth the routes ask for the same HTTP basic credentials as the WebUI's own API.
"""
import base64
import io
import os
from typing import Any, Dict, Optional

from .job import BOARD, JobBoard, JobStatus
from .request import DEFAULT_ROWS, FIELDS, MakeError, from_json

PREFIX = "/vmix/v1/make"


def status_json(status: JobStatus, preview: bool = False) -> Dict[str, Any]:
    out = status.to_json()
    if preview:
        out["preview"] = None
        if status.preview_path and os.path.isfile(status.preview_path):
            with open(status.preview_path, "rb") as f:
                out["preview"] = base64.b64encode(f.read()).decode("ascii")
    return out


def defaults_json() -> Dict[str, Any]:
    from ...train.distill import builtin_prompts

    return {
        "settings": [{"key": f.key, "label": f.label, "default": f.default, "minimum": f.minimum, "maximum": f.maximum,
                      "hint": f.hint} for f in FIELDS],
        "dimensions": [{"name": r.name, "phrase": r.phrase, "contrast": r.contrast} for r in DEFAULT_ROWS],
        "builtin_prompts": len(builtin_prompts()),
    }


def register(app, board: JobBoard = BOARD, start=None, auth: Optional[str] = None) -> None:
    """Add the routes to ``app`` (FastAPI), once per app (Reload UI makes a new one)."""
    from fastapi import Depends, HTTPException, Request
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    if getattr(app, "_make_vmix_routes", False):
        return
    app._make_vmix_routes = True
    if start is None:
        from .service import start_api_job as start

    dependencies = []
    if auth:
        import secrets

        users = dict(item.split(":", 1) for item in auth.strip('"').replace("\n", "").split(",") if ":" in item)
        basic = HTTPBasic()

        def check(credentials: HTTPBasicCredentials = Depends(basic)):
            password = users.get(credentials.username)
            if password is None or not secrets.compare_digest(credentials.password, password):
                raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

        dependencies = [Depends(check)]

    def unprocessable(e: MakeError):
        return HTTPException(status_code=getattr(e, "status_code", 422), detail=str(e))

    @app.get(PREFIX + "/defaults", dependencies=dependencies)
    def make_defaults():
        return defaults_json()

    @app.post(PREFIX, dependencies=dependencies)
    async def make_start(request: Request):
        try:
            body = await request.json()
        except Exception:
            raise HTTPException(status_code=422, detail="The request body must be a JSON object of settings (see GET /vmix/v1/make/defaults).")
        try:
            status = start(from_json(body), board)
        except MakeError as e:
            raise unprocessable(e)
        return status_json(status)

    @app.get(PREFIX, dependencies=dependencies)
    def make_status(preview: bool = False):
        status = board.get()
        if status is None:
            raise HTTPException(status_code=404, detail="No VMix job has run since the WebUI started.")
        return status_json(status, preview)

    @app.post(PREFIX + "/interrupt", dependencies=dependencies)
    def make_interrupt(task_id: Optional[str] = None):
        stopped = board.request_stop(task_id)
        status = board.get()
        return {"interrupted": stopped, "task_id": status.task_id if status else None}

    @app.get(PREFIX + "/{task_id}", dependencies=dependencies)
    def make_task(task_id: str, preview: bool = False):
        status = board.get(task_id)
        if status is None:
            raise HTTPException(status_code=404, detail=f"No VMix job {task_id!r}: only the current or last job is kept.")
        return status_json(status, preview)


def on_app_started(demo, app) -> None:
    from modules import shared

    register(app, auth=getattr(shared.cmd_opts, "api_auth", None))
