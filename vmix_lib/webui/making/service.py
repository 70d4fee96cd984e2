"""VMix tab jobs in the running WebUI: the queue lock, shared.state, the progress bar's task id.

Both ways in run the same ``job.run_job`` with the WebUI's loaded checkpoint:

- the tab's Train/Resume buttons: gradio calls ``ui_job`` through the WebUI's
  ``wrap_gradio_gpu_call`` (queue lock, ``shared.state.begin/end``, the task id that
  ``requestProgress`` polls), as A1111's own Train tab does;
- ``POST /vmix/v1/make``: ``start_api_job`` checks the request (HTTP 422 with one sentence), then a
  thread waits for the same queue lock, so training never runs beside a generation.

``StateSink`` shows the job in the WebUI's progress bar: ``job_count`` = steps and ``job_no`` = the
step give the bar and its ETA, ``textinfo`` the loss line, ``assign_current_image`` the newest
λ-sweep preview; the WebUI's Interrupt (``shared.state.interrupted``) and the tab's stop the run
after its current step.  ``current_latent`` stays None, so polling never decodes on the HTTP thread.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Optional

from .job import BOARD, JobBoard, JobStatus, run_job
from .request import MakeError, MakeRequest

JOB_NAME = "vmix_make"


class StateSink:
    def __init__(self, state):
        self.state = state

    def begin(self, max_steps: int) -> None:
        s = self.state
        s.job_count, s.job_no, s.sampling_step, s.sampling_steps = max(1, max_steps), 0, 0, 0
        s.textinfo, s.current_latent = "VMix: preparing the model", None

    def step(self, step: int, max_steps: int, text: str) -> None:
        s = self.state
        s.job_count, s.job_no, s.textinfo, s.current_latent = max(1, max_steps), step, f"VMix: {text}", None

    def image(self, image) -> None:
        self.state.assign_current_image(image)

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))


def _console(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_in_webui(request: MakeRequest, status: JobStatus, board: JobBoard = BOARD) -> JobStatus:
    """The job body; the queue lock is held and shared.state begun by the caller."""
    from modules import shared

    from .. import default_library, host
    from .models import loaded_model

    library = default_library()
    folder = library.folder()
    try:
        model = loaded_model()
    except Exception as e:  # a checkpoint that fails to load is the WebUI's own error, said in one line here
        status.state, status.message = "failed", f"The checkpoint could not be loaded ({type(e).__name__}: {e})."
        _console(f"[VMix] {status.message}")
        return status
    if folder is None:
        status.state, status.message = "failed", "The WebUI has no VMix adapter folder (models/VMix); start it normally or with --vmix-dir."
        return status
    return run_job(request, model, folder, status, board, StateSink(shared.state), host.shown_folder, _console,
                   on_adapter=library.refresh)


def ui_job(id_task: str, request: Optional[MakeRequest], error: Optional[str], board: JobBoard = BOARD) -> JobStatus:
    """Train/Resume from the tab (inside wrap_gradio_gpu_call: lock held, state begun)."""
    if error is not None:
        status = JobStatus(task_id=id_task, state="failed", message=error)
        return status
    try:
        status = board.new_task(task_id=id_task, name=request.name)
    except MakeError as e:
        return JobStatus(task_id=id_task, state="failed", message=str(e))
    return run_in_webui(request, status, board)


def preview_image(status: JobStatus):
    """The newest λ-sweep preview for the tab's ``gr.Image`` (None without one).  The picture carries
    ``already_saved_as`` (its file), the WebUI's mark for a picture already on disk: its
    ``save_pil_to_file`` then serves that file instead of writing a temporary copy.  Forge Neo writes
    such copies to Settings > temp_dir, by default ``<webui>/tmp``, a folder it does not create, so
    the copy failed there (FileNotFoundError) and the tab showed neither preview nor result."""
    path = status.preview_path
    if not path:
        return None
    from PIL import Image

    with Image.open(path) as im:
        image = im.copy()
    image.already_saved_as = path
    return image


def precheck(request: MakeRequest) -> None:
    """Check an API request against the checkpoint loaded now (if any) and the adapter folder; raises
    MakeError with one sentence.  A checkpoint the job itself must load is checked by the job."""
    from ...train.errors import TrainError
    from .. import default_library, host
    from .job import plan_job
    from .models import current_model

    model = current_model()
    folder = default_library().folder()
    if model is None or folder is None:
        return
    try:
        plan_job(request, model, folder, host.shown_folder)
    except TrainError as e:
        raise MakeError(str(e).rstrip(".") + ".") from None


def start_api_job(request: MakeRequest, board: JobBoard = BOARD, runner: Callable = run_in_webui,
                  check: Callable[[MakeRequest], None] = precheck) -> JobStatus:
    """Check ``request`` (MakeError: 422), then queue it behind the WebUI's queue lock in a thread;
    returns its status at once.  Raises BusyError (409) while another VMix job is queued or running."""
    board.check_free()
    check(request)
    status = board.new_task(name=request.name)

    def work():
        from modules import progress, shared
        from modules.call_queue import queue_lock

        progress.add_task_to_queue(status.task_id)
        with queue_lock:
            shared.state.begin(job=JOB_NAME)
            progress.start_task(status.task_id)
            try:
                runner(request, status, board)
            finally:
                progress.finish_task(status.task_id)
                shared.state.end()
                # as the WebUI's own wrap_gradio_call does after each job
                shared.state.skipped = shared.state.interrupted = False
                shared.state.job_count = 0

    threading.Thread(target=work, name=f"vmix-make-{status.task_id}", daemon=True).start()
    return status
