"""Running a job: orchestration in named steps, the Ray pipeline and its stages."""
