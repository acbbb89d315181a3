"""The task registry: every task sdbatch runs, declared once (one module each, one line here).

Adding a task means adding one module that defines ``TASK = Task(...)`` (``batch.tasks.base``) and one
line below; the spec, the plan, the sampler stage and the model loader all read it from here.
"""

from __future__ import annotations

from batch.tasks import txt2img, upscale, variation
from batch.tasks.base import Task

TASKS: dict[str, Task] = {
    "txt2img": txt2img.TASK,
    "variation": variation.TASK,
    "upscale": upscale.TASK,
}
